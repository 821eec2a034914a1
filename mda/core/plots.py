"""Shared plot conventions: one look for every stage's figures."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI or GPU nodes
import matplotlib.pyplot as plt  # noqa: E402

from mda.core.io import atomic_file  # noqa: E402


def step_axis(ax, label: str = "training step (symlog)") -> None:
    """Pythia's checkpoints are log-spaced early and linear later: symlog shows both (and step 0)."""
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel(label)
    ax.grid(True, which="major", alpha=0.3)


def shade_window(ax, start: int, end: int, label: str = "formation window") -> None:
    ax.axvspan(start, end, color="tab:orange", alpha=0.12, label=label)


def save(fig, path: str | os.PathLike) -> None:
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
