"""Numbers and arm order as the report, its figures and its verdicts print them."""

from __future__ import annotations

import numpy as np

from mda.intervene.arms import ARMS


def fmt(value, digits: int = 3) -> str:
    """A number for a table cell; "—" for a missing one (None or NaN)."""
    if value is None or not np.isfinite(value):
        return "—"
    return f"{value:,.{digits}f}"


def fmt_p(p) -> str:
    """A p-value to two significant digits; "—" for a missing one."""
    return "—" if p is None or not np.isfinite(p) else f"{p:.2g}"


def with_ci(mean, low, high, digits: int = 3) -> str:
    """`+m [+lo, +hi]`; the mean alone without an interval; "—" without a mean."""
    if mean is None or not np.isfinite(mean):
        return "—"
    if low is None or not np.isfinite(low):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def in_arm_order(by_arm: dict) -> dict:
    """A per-arm dict (JSON sorts keys) back in `ARMS` order."""
    return dict(sorted(by_arm.items(), key=lambda item: ARMS.index(item[0]) if item[0] in ARMS else len(ARMS)))
