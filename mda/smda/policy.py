"""Features and the symbolic policy over them (pure functions of arrays; float64).

- Features: per SAE latent, mean activation on harmful minus harmless (training) prompts;
  keep |difference| > threshold, labelled by its sign.
- Policy: ridge without intercept or standardisation, closed form W = (XᵀX + λI)⁻¹XᵀY, with Y
  the log-probability of the refusal prefix. A decision threshold on X·W is chosen to
  maximise training accuracy against the refused / not-refused labels; test accuracy is
  compared with the majority-class baseline (the training set's majority label).
"""

from __future__ import annotations

import numpy as np

from mda.core.errors import ConfigError


def mean_difference(z: np.ndarray, harmful: np.ndarray) -> np.ndarray:
    """(d_sae,) mean activation on harmful prompts minus on harmless ones."""
    harmful = np.asarray(harmful, dtype=bool)
    return z[harmful].mean(0) - z[~harmful].mean(0)


def select_features(diff: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of the latents with |diff| > threshold, or a ConfigError naming the key."""
    kept = np.flatnonzero(np.abs(diff) > threshold)
    if kept.size == 0:
        raise ConfigError(f"params: smda.policy.feature_threshold: {threshold} keeps no SAE latent "
                          f"(largest |mean difference| is {np.abs(diff).max():.4g})")
    return kept


def ridge(X: np.ndarray, Y: np.ndarray, lam: float) -> np.ndarray:
    """W = (XᵀX + λI)⁻¹XᵀY (no intercept), solved, not inverted."""
    U = X.T @ X + lam * np.eye(X.shape[1])
    return np.linalg.solve(U, X.T @ Y)


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, training accuracy) of the rule `score > threshold ⇒ refused` that maximises
    accuracy; candidates are the midpoints between sorted scores and both ends (first best wins)."""
    labels = np.asarray(labels, dtype=bool)
    s = np.sort(np.unique(scores))
    candidates = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2, [s[-1] + 1.0]])
    acc = [(np.asarray(scores > t) == labels).mean() for t in candidates]
    best = int(np.argmax(acc))
    return float(candidates[best]), float(acc[best])


def accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(((scores > threshold) == np.asarray(labels, dtype=bool)).mean())


def majority_baseline(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Test accuracy of always predicting the training set's majority label (ties: refused)."""
    train_labels = np.asarray(train_labels, dtype=bool)
    majority = train_labels.mean() >= 0.5
    return float((np.asarray(test_labels, dtype=bool) == majority).mean())


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of test rows: `test_fraction` of each label's rows (at least one if it has two)."""
    labels = np.asarray(labels, dtype=bool)
    rng = np.random.default_rng([seed, 11])
    test = np.zeros(len(labels), dtype=bool)
    for value in (True, False):
        rows = np.flatnonzero(labels == value)
        n = int(round(test_fraction * len(rows)))
        n = min(max(n, 1 if len(rows) >= 2 else 0), len(rows) - 1 if len(rows) else 0)
        test[rng.choice(rows, size=n, replace=False)] = True
    return test
