"""The optimization scenario of notebooks 00 (recipe demo) and 03 (clipping and stability).

An MLP ``64-256-256-10`` on digits, batch 64. At a constant LR of 0.1 with Adam the loss explodes in the first
few steps and most ReLU units die; the recipe (AdamW at 3e-3, 5% linear warmup then cosine decay, global-norm
clipping at 1.0) trains cleanly. Notebook 03 changes one thing at a time from the too-high-LR run:

* ``clip_only``: clip the gradient norm at 1.0. Adam divides each update by a running gradient scale, so a
  smaller gradient gives the *same* step: the first update is ``lr * sign(g)`` with or without clipping.
* ``schedule_only``: same peak LR 0.1, reached after a 5% warmup and decayed with a cosine.
* ``lower_lr``: constant LR 3e-3, no warmup, no clipping.

``RUNS`` holds the ``fit`` arguments of every arm (the notebooks show and use them); ``run(seed, fast)``
replays the arms for one seed and returns the evidence the notebooks read, so tests can prove over seeds that
the graded answers hold with a margin.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data import digits_split, make_loaders
from ..models import MLP
from ..runtime import seed_everything
from ..train import TrainingDiverged, fit
from . import by_mode

__all__ = ["MODEL", "BATCH_SIZE", "RUNS", "FIXES", "FIX_OF_RUN", "epochs", "clip_global_norm_",
           "dead_relu_fraction", "kept_val_acc", "clip_fraction", "evidence", "train_arm", "run", "NAN_RUN",
           "run_until_nan"]

MODEL = {"in_features": 64, "hidden": (256, 256), "n_classes": 10}
"""``MLP(**MODEL)``: two hidden ReLU layers of 256 units."""

BATCH_SIZE = 64

RUNS = {
    # the symptom: Adam at a constant LR far above what this model tolerates, nothing else
    "too_high_lr": {"optimizer": "adam", "lr": 0.1},
    # the recipe of notebook 00: AdamW, lower peak LR, 5% warmup + cosine decay, clip the global norm at 1
    "recipe": {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.01, "scheduler": "cosine",
               "warmup_ratio": 0.05, "clip_grad_norm": 1.0},
    # notebook 03: one change each, starting from too_high_lr
    "clip_only": {"optimizer": "adam", "lr": 0.1, "clip_grad_norm": 1.0},
    "schedule_only": {"optimizer": "adam", "lr": 0.1, "scheduler": "cosine", "warmup_ratio": 0.05},
    "lower_lr": {"optimizer": "adam", "lr": 3e-3},
}
"""``fit`` keyword arguments of each arm."""

FIXES = ("clip", "schedule", "lower_lr")
"""The single changes notebook 03 tries (its ``first_fix`` decision is one of these)."""

FIX_OF_RUN = {"clip_only": "clip", "schedule_only": "schedule", "lower_lr": "lower_lr"}

NAN_RUN = {"optimizer": "sgd", "lr": 1e5}
"""The symptom table's NaN row, for real (notebook 00): plain SGD at an absurd LR overflows to NaN within a few
steps (step 3 on seeds 0-19; at 1e4 one seed of 20 stays finite) and ``fit`` stops with ``TrainingDiverged``
instead of training on garbage. (Adam at 0.1 never gets there: the ReLU units die first, the loss stays finite.)"""

def epochs(fast: bool) -> int:
    """Epochs per run: 20 in fast mode (about 340 optimizer steps), 40 otherwise."""
    return by_mode(fast, fast=20, full=40)


@torch.no_grad()
def clip_global_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``parameters`` in place so that their global L2 norm is at most ``max_norm``.

    ``||g|| = sqrt(sum over all gradient entries of g_i^2)``; when ``||g|| > max_norm`` every gradient is
    multiplied by ``max_norm / (||g|| + 1e-6)``, the rule of ``torch.nn.utils.clip_grad_norm_`` (the reference
    of notebook 03's exercise). Tensors whose ``.grad`` is None are skipped.

    Returns:
        the global norm *before* clipping, a 0-dim float tensor (0.0 when no tensor has a gradient).
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
    if torch.is_tensor(parameters):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return total


@torch.no_grad()
def dead_relu_fraction(model: nn.Module, X: torch.Tensor) -> float:
    """Fraction of hidden ReLU units that output 0 for *every* example of ``X`` (a dead unit never fires).

    Every ``nn.ReLU`` module of ``model`` counts, one unit per output feature: for an output ``(n, units)``
    unit ``j`` is dead when ``max_i out[i, j] <= 0``. Runs in eval mode (the mode is restored afterwards).
    A dead unit has zero gradient on these inputs, so training cannot bring it back.

    Args:
        model: a model with ``nn.ReLU`` modules (e.g. ``course_lib.models.MLP``).
        X: inputs ``(n, ...)``, e.g. the validation images ``split.X_val`` of shape ``(n, 64)``.
    """
    if not torch.is_tensor(X) or X.ndim < 2 or len(X) == 0:
        raise ValueError(f"X must be a non-empty batch of inputs (n, ...), got {getattr(X, 'shape', X)!r}")
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(f"{type(model).__name__} has no nn.ReLU module: dead units are defined for ReLU layers")
    fired = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: fired.append((out > 0).flatten(1).any(0))) for m in relus]
    was_training = model.training
    model.eval()
    try:
        model(X.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    alive = torch.cat(fired)
    return 1.0 - alive.float().mean().item()


def kept_val_acc(history) -> float:
    """Validation accuracy of the checkpoint kept under the run's rule (the row of ``history.best_epoch``)."""
    return history.kept("val_acc")


def clip_fraction(steps) -> float:
    """Fraction of optimizer steps whose gradient was clipped (``history.steps`` entries with ``clipped``)."""
    if len(steps) == 0:
        raise ValueError("steps is empty: pass history.steps of a run that trained")
    return sum(bool(s["clipped"]) for s in steps) / len(steps)


def evidence(history, model: nn.Module, X_val: torch.Tensor) -> dict:
    """The numbers the notebooks compare: worst step, dead units, kept accuracy and val loss, clip fractions.

    ``late_clip_frac`` is the clip fraction over the second half of the optimizer steps: healthy clipping fades
    as training settles, clipping that fights a too-high LR does not.
    """
    steps = history.steps
    return {"max_loss": max(s["loss"] for s in steps),
            "max_grad_norm": max(s["grad_norm"] for s in steps),
            "dead_frac": dead_relu_fraction(model, X_val),
            "val_acc": kept_val_acc(history),
            "val_loss": float(history.best_value),
            "final_val_acc": float(history[-1]["val_acc"]),
            "best_epoch": history.best_epoch,
            "clip_frac": clip_fraction(steps),
            "late_clip_frac": clip_fraction(steps[len(steps) // 2:])}


def train_arm(arm: str, split, *, seed: int, fast: bool, device="cpu", progress: bool | None = False):
    """One run of notebooks 00/03: ``MLP(**MODEL)`` with ``RUNS[arm]`` on ``split``; returns ``(history, model)``.

    ``seed_everything(seed)`` right before the model is built, so every arm starts from the same weights and sees
    the same batches; ``progress`` is passed to ``fit`` (the notebooks show bars, the tests do not).
    """
    if arm not in RUNS:
        raise ValueError(f"arm must be one of {tuple(RUNS)}, got {arm!r}")
    seed_everything(seed)
    model = MLP(**MODEL)
    train_loader, val_loader, _ = make_loaders(split, BATCH_SIZE, seed=seed)
    history = fit(model, train_loader, val_loader, epochs=epochs(fast), device=device, name=arm,
                  split_hash=split.split_hash, progress=progress, **RUNS[arm])
    return history, model


def run(seed: int = 0, fast: bool = True, arms=tuple(RUNS), device="cpu") -> dict:
    """Train the given arms on the digits split of ``seed``; return ``{arm: evidence(...)}``.

    Every arm starts from the same initial weights (``seed_everything(seed)`` before building the model) and
    sees the same batches, exactly as in the notebooks.
    """
    unknown = [a for a in arms if a not in RUNS]
    if unknown:
        raise ValueError(f"arms must be names from RUNS {tuple(RUNS)}, got {unknown}")
    split = digits_split(seed)
    out = {}
    for arm in arms:
        history, model = train_arm(arm, split, seed=seed, fast=fast, device=device)
        out[arm] = evidence(history, model, split.X_val)
    return out


def run_until_nan(seed: int = 0, device="cpu", max_epochs: int = 1) -> TrainingDiverged | None:
    """Train :data:`NAN_RUN` on the split of ``seed`` and return the ``TrainingDiverged`` that stops it (None if
    ``max_epochs`` pass without a non-finite loss). ``err.step`` is the optimizer step that produced it,
    ``err.history.steps`` the steps logged before."""
    split = digits_split(seed)
    seed_everything(seed)
    model = MLP(**MODEL)
    train_loader, val_loader, _ = make_loaders(split, BATCH_SIZE, seed=seed)
    try:
        fit(model, train_loader, val_loader, epochs=max_epochs, device=device, name="nan_run",
            split_hash=split.split_hash, progress=False, **NAN_RUN)
    except TrainingDiverged as err:
        return err
    return None
