"""Counterfactual training: set selection, stream edits, synthetic motifs, retraining arms."""
