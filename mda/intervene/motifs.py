"""Synthetic motif rows for `augment-synthetic`: the repeated-span structure of the top set (span
lengths, distances, coverage, token marginal), none of its rows."""

from __future__ import annotations

import numpy as np


def repeated_spans(row: np.ndarray, min_len: int = 2) -> list[tuple[int, int]]:
    """Maximal spans (length, distance) that repeat an earlier stretch of the same row,
    scanned left to right (at each position the longest match, nearest on ties)."""
    n = len(row)
    match = np.zeros((n + 1, n + 1), dtype=np.int32)  # match[i, j]: equal run from i and j
    for i in range(n - 1, -1, -1):
        match[i, :n] = (row[i] == row) * (match[i + 1, 1:] + 1)
    spans, t = [], 1
    while t < n:
        lengths = match[t, :t]  # from each earlier start j
        j = int(np.flatnonzero(lengths == lengths.max())[-1]) if t else 0
        length = int(min(lengths[j], n - t))
        if length >= min_len:
            spans.append((length, t - j))
            t += length
        else:
            t += 1
    return spans


def motif_profile(rows: np.ndarray) -> dict:
    """What `motif_rows` reproduces: repeated-span (length, distance) pairs, the share of tokens
    inside repeats, and the token marginal."""
    spans, covered = [], 0
    for row in rows:
        s = repeated_spans(row)
        spans += s
        covered += sum(length for length, _ in s)
    values, counts = np.unique(rows, return_counts=True)
    return {"spans": np.asarray(spans, dtype=np.int64).reshape(-1, 2),
            "coverage": covered / rows.size, "tokens": values, "token_p": counts / counts.sum()}


def motif_rows(profile: dict, n: int, row_len: int, seed: int) -> np.ndarray:
    """New rows: tokens drawn from the marginal, then repeated spans (sampled length and
    distance pairs) pasted in until the measured repeat coverage is reached."""
    rng = np.random.default_rng([seed, 13])
    rows = rng.choice(profile["tokens"], size=(n, row_len), p=profile["token_p"]).astype(np.int32)
    spans = profile["spans"]
    if len(spans) == 0:
        return rows
    target = profile["coverage"] * row_len
    for row in rows:
        covered = 0
        for _ in range(4 * row_len):
            if covered >= target:
                break
            length, dist = spans[rng.integers(len(spans))]
            start_hi = row_len - length
            if start_hi < dist:
                continue
            t = int(rng.integers(dist, start_hi + 1))
            row[t:t + length] = row[t - dist:t - dist + length].copy() if dist >= length else \
                np.array([row[t - dist + i % dist] for i in range(length)], dtype=np.int32)
            covered += length
    return rows
