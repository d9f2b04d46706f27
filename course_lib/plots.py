"""Plots people would rather look at than read: loss curves with the LR, gradient norms, comparisons."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

__all__ = ["plot_history", "plot_steps", "plot_comparison", "save_figure"]


def _frame(history):
    import pandas as pd

    return history.to_frame() if hasattr(history, "to_frame") else pd.DataFrame(history)


def plot_history(history, *, metric: str = "val_acc", title: str | None = None, axes=None):
    """Three panels: train/val loss with the LR on a second axis, the metric, and the pre-clip grad norm.

    The kept checkpoint (``history.best_epoch``) is marked with a dashed line. Returns the figure.
    """
    df = _frame(history)
    if df.empty:
        raise ValueError("history is empty: train for at least one epoch before plotting")
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    else:
        fig = axes[0].figure
    ax = axes[0]
    ax.plot(df["epoch"], df["train_loss"], label="train loss")
    ax.plot(df["epoch"], df["val_loss"], label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    lr_ax = ax.twinx()
    lr_ax.plot(df["epoch"], df["lr"], color="grey", linestyle=":", label="lr")
    lr_ax.set_ylabel("lr", color="grey")
    ax.legend(loc="upper right", fontsize=8)
    if metric in df:
        axes[1].plot(df["epoch"], df[metric], color="tab:green")
        axes[1].set_ylabel(metric)
    axes[1].set_xlabel("epoch")
    axes[2].plot(df["epoch"], df["grad_norm"], label="mean grad norm")
    if "grad_norm_max" in df:
        axes[2].plot(df["epoch"], df["grad_norm_max"], label="max grad norm", alpha=0.6)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("epoch")
    axes[2].legend(fontsize=8)
    best = getattr(history, "best_epoch", None)
    if best is not None:
        for a in axes:
            a.axvline(best, color="black", linestyle="--", linewidth=0.8)
    fig.suptitle(title or getattr(history, "name", None) or "training history")
    fig.tight_layout()
    return fig


def plot_steps(history, *, title: str | None = None, clip: float | None = None):
    """Per optimizer step: loss, LR and pre-clip gradient norm (with the clip threshold if given)."""
    import pandas as pd

    df = pd.DataFrame(history.steps)
    if df.empty:
        raise ValueError("history has no step log: it was not produced by course_lib.train.fit")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    axes[0].plot(df["step"], df["loss"])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("train loss")
    axes[1].plot(df["step"], df["lr"])
    axes[1].set_ylabel("lr")
    axes[2].plot(df["step"], df["grad_norm"])
    axes[2].set_yscale("log")
    axes[2].set_ylabel("grad norm (before clipping)")
    if clip is not None:
        axes[2].axhline(clip, color="red", linestyle="--", label=f"clip {clip}")
        axes[2].legend(fontsize=8)
    for a in axes:
        a.set_xlabel("step")
    fig.suptitle(title or getattr(history, "name", None) or "steps")
    fig.tight_layout()
    return fig


def plot_comparison(runs, *, keys=("val_loss", "val_acc"), title: str | None = None):
    """Overlay ``keys`` for several runs (dict ``{name: history}`` or named histories); best epochs marked."""
    if not isinstance(runs, dict):
        runs = {getattr(h, "name", None) or f"run{i}": h for i, h in enumerate(runs)}
    if not runs:
        raise ValueError("runs is empty: pass at least one history")
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, h in runs.items():
            df = _frame(h)
            if key not in df:
                raise KeyError(f"run {name!r} has no column {key!r}; available: {list(df.columns)}")
            (line,) = ax.plot(df["epoch"], df[key], label=name)
            best = getattr(h, "best_epoch", None)
            if best is not None and best in set(df["epoch"]):
                ax.plot([best], [df.loc[df["epoch"] == best, key].iloc[0]], "o", color=line.get_color())
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend(fontsize=8)
    fig.suptitle(title or "comparison (dots: kept checkpoint)")
    fig.tight_layout()
    return fig


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
