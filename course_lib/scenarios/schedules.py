"""Notebook 02 (schedules and the LR finder): the configuration it shows and the evidence it reads, for one seed.

The story: the LR range test on the MLP gives a *range* of usable LRs. At the finder's LR (``minimum/10``)
a constant and a cosine schedule end up close, and which one wins depends on the seed. At the top of the
range (``AGGRESSIVE_FACTOR`` x that LR: half the LR of the loss minimum) the constant schedule keeps
bouncing while cosine decays into a good checkpoint: the cosine run keeps the lower best val loss on most seeds
(17-18 of seeds 0-19 under each CPU kernel setting, mean margin 0.04-0.06; where it loses, by at most 0.033).
The LR is the first-order choice; the schedule buys tolerance.

``run(seed)`` reproduces the notebook's numbers; ``tests/test_scenario_schedules.py`` checks them over seeds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import digits_split, make_loaders
from ..lr_finder import LRFinderResult, lr_range_test
from ..models import MLP
from ..runtime import seed_everything
from ..train import fit

__all__ = ["MODEL", "BATCH_SIZE", "OPTIMIZER", "FINDER", "EPOCHS", "AGGRESSIVE_FACTOR", "SCHEDULES",
           "GALLERY", "SPREAD_SEEDS", "make_model", "lr_finder", "sensible_lr_range", "train", "pair_spread", "run"]

MODEL = {"hidden": (256, 256)}
"""The MLP of notebook 00: 64 -> 256 -> 256 -> 10."""
BATCH_SIZE = 64
OPTIMIZER = "adamw"
FINDER = {"start_lr": 1e-6, "end_lr": 10.0, "num_steps": 100}
"""LR range test: 100 steps from 1e-6 to 10 (stops early once the smoothed loss is 4x its minimum)."""
EPOCHS = 10
"""A short budget, the same in fast and full mode: the comparison is the lesson, not the last 0.1%."""
AGGRESSIVE_FACTOR = 5
"""Top of the range: 5 x (minimum / 10) = half the LR where the finder's loss was lowest."""
SCHEDULES = ("constant", "cosine")

GALLERY = {
    "total_steps": 100,
    "constant": {},
    "constant_with_warmup": {"warmup_steps": 10},
    "linear": {"warmup_steps": 10, "total_steps": 100},
    "cosine": {"warmup_steps": 10, "total_steps": 100},
    "cosine_with_restarts": {"warmup_steps": 10, "total_steps": 100, "num_cycles": 3},
    "polynomial": {"warmup_steps": 10, "total_steps": 100, "power": 2.0, "lr_end": 0.05},
}
"""The arguments of each schedule in the notebook's gallery figure (LR 1.0, so the curve is the multiplier)."""

SPREAD_SEEDS = 3
"""Seeds of the noise estimate notebook 02 shows in both modes: the learner's seed and the next two."""


def make_model() -> MLP:
    return MLP(**MODEL)


def lr_finder(split, seed: int, device="cpu") -> LRFinderResult:
    """The LR range test of a fresh MLP (AdamW) on the training loader of ``split``."""
    seed_everything(seed)
    train_loader, _, _ = make_loaders(split, BATCH_SIZE, seed=seed)
    model = make_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=FINDER["start_lr"])
    return lr_range_test(model, optimizer, F.cross_entropy, train_loader, **FINDER, device=device, progress=False)


def sensible_lr_range(result: LRFinderResult) -> tuple[float, float]:
    """``(low, high)``: the LRs the finder's curve supports as a first choice.

    From a third of the smaller suggestion to three times the larger one, but never above a third of the LR at
    the loss minimum (``10 * minimum/10``), which is already at the edge of divergence; a "steepest" point
    found past that (noise in the blow-up) does not widen the range.
    """
    m10, steep = result.suggestion("minimum/10"), result.suggestion("steepest")
    lr_at_min = 10 * m10
    low = min(m10, steep) / 3
    high = min(3 * max(m10, steep), lr_at_min / 3)
    return low, high


def train(split, seed: int, lr: float, schedule: str, *, device="cpu", name: str | None = None):
    """One MLP run of ``EPOCHS`` epochs under ``schedule`` (the default rule: best val_loss)."""
    seed_everything(seed)
    train_loader, val_loader, _ = make_loaders(split, BATCH_SIZE, seed=seed)
    return fit(make_model(), train_loader, val_loader, epochs=EPOCHS, optimizer=OPTIMIZER, lr=lr,
               scheduler=schedule, device=device, name=name, split_hash=split.split_hash, progress=False)


def run(seed: int = 0, fast: bool = True, device="cpu") -> dict:
    """The notebook's evidence for ``seed`` (``fast`` changes nothing here: the budget is already small).

    Returns the suggestions, the sensible range, both LRs, and the best val loss of the four runs
    ``{schedule} @ finder`` / ``{schedule} @ top``.
    """
    split = digits_split(seed)
    finder = lr_finder(split, seed, device)
    lr = finder.suggestion("minimum/10")
    top = AGGRESSIVE_FACTOR * lr
    best = {}
    for where, rate in (("finder", lr), ("top", top)):
        for schedule in SCHEDULES:
            history = train(split, seed, rate, schedule, device=device)
            best[f"{schedule} @ {where}"] = history.best_value
    low, high = sensible_lr_range(finder)
    return {"seed": seed, "steepest": finder.suggestion("steepest"), "minimum/10": lr, "lr": lr, "top_lr": top,
            "range": (low, high), "best_val_loss": best,
            "top_margin": best["constant @ top"] - best["cosine @ top"]}


def pair_spread(lr: float, seeds, *, device="cpu", known: dict | None = None) -> list[dict]:
    """The constant-vs-cosine pair at one ``lr`` on several seeds (each its own split and initial weights).

    Returns one row per seed: ``{"seed", "constant", "cosine", "constant - cosine"}`` (best val loss of each run
    under the default rule). ``known``: ``{seed: {"constant": value, "cosine": value}}`` for runs already trained
    (the notebook's own seed), reused instead of training again. The spread of ``constant - cosine`` over the
    seeds is the noise a single seed's difference must be read against.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: pass at least one seed")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    rows = []
    for seed in seeds:
        if known and seed in known:
            best = dict(known[seed])
        else:
            split = digits_split(seed)
            best = {schedule: train(split, seed, lr, schedule, device=device).best_value for schedule in SCHEDULES}
        rows.append({"seed": seed, **best, "constant - cosine": best["constant"] - best["cosine"]})
    return rows
