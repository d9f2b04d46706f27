"""The per-learner diagnosis of notebook 04: three unlabeled runs, one planted bottleneck each, in a seed's order.

Each of the three runs (named ``"A"``, ``"B"``, ``"C"``) carries exactly one of the course's bottlenecks
(``course_lib.BOTTLENECKS``); which letter carries which is drawn from the notebook's ``seed``
(:func:`planted`), so two learners with different seeds get different answers. All three runs train on the same
small split (``digits_split(seed, n_train=100)``, batch 16, the same number of epochs in fast and full mode), so
the data and the length of training say nothing; only the evidence does:

* ``"optimization"``: ``MLP(hidden=(512,))`` with Adam at a constant ``lr=0.1`` (notebook 00's broken run). The
  per-step loss jumps far above its start (``ln 10 = 2.30``) within the first steps, the gradient norm by two
  orders of magnitude, and most hidden units die.
* ``"regularization"``: notebook 01's memorizing run (the same MLP, AdamW 3e-3, no weight decay). The training
  loss falls to ~1e-3 while the validation loss bottoms out early and climbs back: the kept epoch is early.
* ``"adaptation"``: a frozen feature extractor with a small trainable head: ``MLP(hidden=(512, 8))`` whose
  blocks are frozen at their (random, not-for-this-task) initial weights, so only the 90 weights of the head
  train (AdamW 3e-2, a usual LR for a head alone). The training loss stays high (1.2-1.9 after 100 epochs on
  seeds 0-19, falling by only 7-22% over the second half) with the validation loss right next to it: nothing
  spikes, nothing memorizes, and the part of the model that is allowed to learn is too small (more epochs only
  creep). The move is to train more of the model (unfreeze), not to change the LR or add regularization.

:func:`evidence_of` reduces one run's history to the numbers the notebook shows; :func:`identify` is a reading
of those numbers (spike first, then memorization, then a high plateau) that the tests use to prove, over seeds
and both modes, that the evidence singles out each planted bottleneck with a margin. Learners read the same
numbers and curves themselves; the notebook's graded answer is compared with :func:`planted` of its seed.
"""
from __future__ import annotations

import itertools
import math
import random

from .. import BOTTLENECKS
from ..data import digits_split, make_loaders
from ..freezing import freeze
from ..models import MLP
from ..runtime import seed_everything
from ..train import History, fit
from .recipe import dead_relu_fraction

__all__ = ["LETTERS", "DATA", "RUNS", "ORDERS", "planted", "make_run", "train_run", "evidence_of", "identify",
           "run", "evidence_table"]

LETTERS = ("A", "B", "C")
"""The names the runs are shown under, in the order they are shown."""

DATA = {"n_train": 100, "batch_size": 16, "epochs": 100}
"""Shared by the three runs, the same in fast and full mode (the answer cannot depend on the mode)."""

RUNS = {
    "optimization": {"hidden": (512,), "frozen": False, "optimizer": "adam", "lr": 0.1, "weight_decay": 0.0},
    "regularization": {"hidden": (512,), "frozen": False, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0},
    "adaptation": {"hidden": (512, 8), "frozen": True, "optimizer": "adamw", "lr": 3e-2, "weight_decay": 0.0},
}
"""The planted configuration of each bottleneck (``frozen``: only ``head`` trains). Shown only after the decision."""

ORDERS = tuple(itertools.permutations(BOTTLENECKS))
"""The 6 possible assignments of the bottlenecks to ``LETTERS``."""


def planted(seed: int) -> dict:
    """``{"A": bottleneck, "B": ..., "C": ...}``: which run carries which bottleneck for ``seed``.

    A plain function of the seed, independent of torch, the mode and the device, so a grader can recompute it
    from the seed the notebook ran with. Each block of 6 consecutive seeds (``6k .. 6k+5``) gets the 6 orders of
    :data:`ORDERS` once each, shuffled by ``random.Random(f"diagnosis-{k}")``: any fixed answer is right for at
    most one seed in six.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int (the notebook's seed parameter), got {seed!r}")
    block = random.Random(f"diagnosis-{seed // len(ORDERS)}").sample(range(len(ORDERS)), len(ORDERS))
    return dict(zip(LETTERS, ORDERS[block[seed % len(ORDERS)]]))


def make_run(seed: int, bottleneck: str):
    """``(split, model, loaders, fit_kwargs)`` of the run that carries ``bottleneck`` for ``seed``.

    ``seed_everything(seed)`` runs right before the model is built, so the same seed gives the same run.
    """
    if bottleneck not in RUNS:
        raise ValueError(f"bottleneck must be one of {tuple(RUNS)}, got {bottleneck!r}")
    cfg = RUNS[bottleneck]
    split = digits_split(seed, n_train=DATA["n_train"])
    seed_everything(seed)
    model = MLP(hidden=cfg["hidden"])
    if cfg["frozen"]:
        freeze(model, "blocks")
    loaders = make_loaders(split, DATA["batch_size"], seed=seed)
    kwargs = {k: cfg[k] for k in ("optimizer", "lr", "weight_decay")}
    return split, model, loaders, kwargs


def train_run(seed: int, letter: str, device="cpu", progress=None):
    """Train the run shown as ``letter`` for ``seed``; return ``(history, model, split)``.

    The history is named after the letter only: nothing in it names the planted bottleneck.
    """
    if letter not in LETTERS:
        raise ValueError(f"letter must be one of {LETTERS}, got {letter!r}")
    split, model, (train_loader, val_loader, _), kwargs = make_run(seed, planted(seed)[letter])
    history = fit(model, train_loader, val_loader, epochs=DATA["epochs"], device=device, name=f"run {letter}",
                  split_hash=split.split_hash, progress=progress, **kwargs)
    return history, model, split


def evidence_of(history: History, model=None, X_val=None) -> dict:
    """The numbers a diagnosis reads from one run (all from ``history`` and ``history.steps``).

    * ``first_loss``, ``max_loss``: the first and the largest per-step training loss; ``spike = max / first``
      (1.0 when no step was worse than the start);
    * ``max_grad_norm``: the largest per-step gradient norm;
    * ``final_train_loss``, ``final_val_loss``; ``val_over_train = final_val_loss / final_train_loss``;
    * ``best_epoch`` (kept by best ``val_loss``), ``best_frac = best_epoch / final_epoch``,
      ``val_rise = final_val_loss / best val_loss`` (1.0: no rise after the kept epoch);
    * ``late_drop``: relative fall of the training loss over the second half of training
      (``1 - loss(end) / loss(middle)``, 0 on a plateau);
    * ``trainable_frac``: trainable / total parameters; ``dead_frac`` (when ``model`` and ``X_val`` are given):
      the fraction of hidden ReLU units that output 0 for every validation image.
    """
    if len(history) == 0 or not history.steps:
        raise ValueError("history is empty: train for at least one epoch")
    losses = [float(s["loss"]) for s in history.steps]
    rows = list(history)
    vals = [float(r["val_loss"]) for r in rows]
    best_i = min(range(len(vals)), key=lambda i: (vals[i], i))
    mid = rows[len(rows) // 2 - 1] if len(rows) > 1 else rows[0]
    final_train = float(rows[-1]["train_loss"])
    out = {"first_loss": losses[0], "max_loss": max(losses), "spike": max(losses) / losses[0],
           "max_grad_norm": max(float(s["grad_norm"]) for s in history.steps),
           "final_train_loss": final_train, "final_val_loss": vals[-1],
           "val_over_train": vals[-1] / max(final_train, 1e-12),
           "best_epoch": int(rows[best_i]["epoch"]), "best_frac": int(rows[best_i]["epoch"]) / int(rows[-1]["epoch"]),
           "val_rise": vals[-1] / vals[best_i],
           "late_drop": 1.0 - final_train / float(mid["train_loss"]),
           "final_val_acc": float(rows[-1]["val_acc"]),
           "trainable_frac": (history.trainable_params / history.total_params
                              if history.trainable_params and history.total_params else math.nan)}
    if model is not None and X_val is not None:
        out["dead_frac"] = dead_relu_fraction(model, X_val)
    return out


def identify(ev: dict) -> str:
    """One reading of :func:`evidence_of`'s numbers, in the order of the symptom table.

    1. a step far worse than the start (``spike >= 3``): ``"optimization"`` (the LR), whatever follows;
    2. training loss ~0 (``< 0.01``) while val loss climbed back (``val_rise >= 1.05``) after an early kept epoch
       (``best_frac <= 0.5``): ``"regularization"``;
    3. training loss stuck high (``>= 0.3``, falling slowly: ``late_drop < 0.35``) with val right next to it
       (``val_over_train < 1.5``): ``"adaptation"`` (too little of the model learns);
    anything else: ``"unclear"``.
    """
    if ev["spike"] >= 3.0:
        return "optimization"
    if ev["final_train_loss"] < 0.01 and ev["val_rise"] >= 1.05 and ev["best_frac"] <= 0.5:
        return "regularization"
    if ev["final_train_loss"] >= 0.3 and ev["late_drop"] < 0.35 and ev["val_over_train"] < 1.5:
        return "adaptation"
    return "unclear"


def run(seed: int = 0, fast: bool = True, device="cpu") -> dict:
    """Notebook 04's three diagnosis runs for ``seed``: ``{letter: evidence_of(...) | {"planted": bottleneck}}``.

    ``fast`` is accepted for symmetry with the other scenarios: the runs are the same in both modes.
    """
    labels = planted(seed)
    out = {}
    for letter in LETTERS:
        history, model, split = train_run(seed, letter, device=device, progress=False)
        out[letter] = {**evidence_of(history, model, split.X_val), "planted": labels[letter]}
    return out


def evidence_table(evidence: dict, digits: int = 3):
    """A ``pandas.DataFrame`` with one row per run (index ``run``) of the evidence the notebook shows."""
    import pandas as pd

    cols = ["first_loss", "max_loss", "max_grad_norm", "dead_frac", "final_train_loss", "final_val_loss",
            "best_epoch", "val_rise", "late_drop", "trainable_frac"]
    rows = {letter: {c: ev[c] for c in cols if c in ev} for letter, ev in evidence.items()}
    df = pd.DataFrame(rows).T.astype({"best_epoch": int})
    df.index.name = "run"
    return df.round(digits)
