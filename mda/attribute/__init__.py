"""Influence of training samples on a unit: per-sample capture, EK-FAC, factors, the gradient cache, scoring, the trajectory and exact estimators, the token split."""
