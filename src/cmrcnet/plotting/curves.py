"""Training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cmrcnet.atomic import atomic_path


def plot_loss_curve(history: Sequence[dict], path: str | Path, *, title: str = "training") -> None:
    """Train and validation loss per epoch as a PNG (atomically written)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label in (
        ("train_loss", "train"),
        ("val_loss", "validation"),
        ("val_loss_ema", "validation (EMA)"),
    ):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax.plot(epochs, values, marker="o", ms=3, label=label)
    best = [h for h in history if h.get("is_best")]
    if best:
        ax.axvline(best[-1]["epoch"], color="grey", ls=":", label=f"best epoch {best[-1]['epoch']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
