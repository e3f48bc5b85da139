"""loss.png: training and validation loss against step (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from apr.atomic import atomic_file


def plot_losses(records: Iterable[dict[str, Any]], png_path: Path, title: str = "") -> None:
    """Train loss as a line, validation loss as a line with dots; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    records = list(records)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig = Figure(figsize=(8, 4.8), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), lw=0.8, color="tab:blue", label="train")
    if val:
        ax.plot(*zip(*val), "o-", ms=4, color="tab:orange", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if train or val:
        ax.legend()
    fig.tight_layout()
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, format="png")
