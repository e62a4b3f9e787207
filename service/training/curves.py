"""Loss and accuracy curves of a run, saved as a PNG next to it (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt


def save_curves(history: Sequence[dict[str, float]], path: Path, title: str) -> Path:
    """Two panels, training loss and training accuracy per epoch; returns the PNG path."""
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [row["loss"] for row in history], marker="o")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    right.plot(epochs, [100 * row["acc"] for row in history], marker="o", color="tab:green")
    right.set_xlabel("epoch")
    right.set_ylabel("training accuracy (%)")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
