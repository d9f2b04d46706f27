"""The LoRA rank sweep of notebook 06: plain LoRA, rsLoRA and DoRA across ranks, on the transfer scenario.

Every arm is ``transfer.adapt``'s ``adapter`` strategy with one thing changed (the rank, the scaling rule, DoRA
or the LR): the same pretrained model, fresh head, targets (all six projections), epochs, schedule, batches
and checkpoint rule (``transfer.RULE``, best ``val_acc``). ``adapt_lora(pretrained, target, 4, arm="lora")``
*is* ``transfer.adapt(pretrained, "adapter", target)`` (``tests/test_scenario_lora_rank.py`` checks it).

Arms (``ARMS``), named by how the factor ``s`` in front of ``B A`` depends on the rank ``r``; all three
scaling rules give ``s = 2`` at ``r = 1``:

* ``lora``: ``alpha = 2 r``, so ``s = alpha / r = 2`` at every rank (the course's default, as in notebook 08);
* ``lora_fixed_alpha``: ``alpha = 2``, ``s = 2 / r`` (LoRA's formula with alpha held fixed);
* ``rslora``: ``alpha = 2``, ``s = 2 / sqrt(r)`` (rank-stabilized LoRA, ``use_rslora``);
* ``dora``: ``lora``'s scaling with DoRA's learned magnitude (``use_dora``).

``RANK_SWEEP`` holds the settings: the ranks (the same in fast and full mode, so a rank answer from either
mode exists in the other), the training seeds of the noise spread (``seed + offset``: a new head, LoRA ``A``
and batch order on the same data and pretrained model), and the LR probe of rsLoRA's claim (the best LR stops
moving with ``r`` under ``alpha / sqrt(r)``, and moves up under ``alpha / r``).
"""
from __future__ import annotations

import copy

from torch import nn

from ..data import Split
from ..lora import add_lora
from ..runtime import seed_everything
from ..train import History
from .transfer import TRANSFER, _train, fit_kwargs

__all__ = ["ARMS", "RANK_SWEEP", "adapt_lora", "rank_sweep", "best_lr"]

ARMS: dict = {
    # arm: (alpha as a function of r, add_lora flags)
    "lora": (lambda r: 2 * r, {}),
    "lora_fixed_alpha": (lambda r: 2, {}),
    "rslora": (lambda r: 2, {"use_rslora": True}),
    "dora": (lambda r: 2 * r, {"use_dora": True}),
}
"""The adapter arms of notebook 06: ``(alpha(r), flags for add_lora)``; see the module docstring."""

RANK_SWEEP: dict = {
    "ranks": (1, 2, 4, 8),          # the same in fast and full mode
    "spread_offsets": (0, 100, 200),  # training seeds seed + offset: the noise of one rank's result
    "lr_grid": (3e-3, 1e-2, 3e-2),  # the LR probe (TRANSFER["lr"] = 1e-2 in the middle)
    "lr_ranks": (1, 8),
    "lr_arms": ("lora", "lora_fixed_alpha", "rslora"),  # lora first: its r = 1 runs serve all three
}
"""Settings of the sweep; the notebook reads them from here."""


def adapt_lora(pretrained: nn.Module, target: Split, r: int, *, arm: str = "lora", lr: float | None = None,
               seed: int = 0, fast: bool = True, device="cpu", progress=None) -> tuple[nn.Module, History]:
    """Adapt a copy of ``pretrained`` with a rank-``r`` adapter of ``arm``; returns (kept model, history).

    ``transfer.adapt``'s ``adapter`` strategy with the rank, the arm (``ARMS``) and the LR (default
    ``TRANSFER["lr"]``) as arguments; ``seed`` seeds the fresh head and ``A`` (``seed + 1``) and the batches.
    The history is named ``"<arm> r=<r>"`` (plus ``" lr=<lr>"`` when ``lr`` is given).
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {tuple(ARMS)}, got {arm!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a number > 0 (or None for TRANSFER['lr']), got {lr!r}")
    alpha, flags = ARMS[arm]
    model = copy.deepcopy(pretrained)
    seed_everything(seed + 1)  # as transfer.adapt: the same fresh head (and LoRA A) for every arm of this seed
    model.head.reset_parameters()
    add_lora(model, TRANSFER["lora_targets"], r=r, alpha=alpha(r), train_modules=("head",), **flags)
    kwargs = fit_kwargs(model, "adapter", fast)
    name = f"{arm} r={r}"
    if lr is not None:
        kwargs["lr"], name = lr, f"{name} lr={lr:g}"
    history = _train(model, target, TRANSFER["batch_size"], seed, name, device=device, progress=progress, **kwargs)
    return model, history


def rank_sweep(pretrained: nn.Module, target: Split, ranks=None, *, arm: str = "lora", lr: float | None = None,
               seed: int = 0, fast: bool = True, device="cpu", progress=None) -> tuple[dict, dict]:
    """``adapt_lora`` at every rank (default ``RANK_SWEEP["ranks"]``): ``({r: history}, {r: kept model})``."""
    ranks = RANK_SWEEP["ranks"] if ranks is None else tuple(ranks)
    histories, models = {}, {}
    for r in ranks:
        models[r], histories[r] = adapt_lora(pretrained, target, r, arm=arm, lr=lr, seed=seed, fast=fast,
                                             device=device, progress=progress)
    return histories, models


def best_lr(histories: dict) -> float:
    """The LR of ``{lr: history}`` with the highest kept ``val_acc``; a tie goes to the lower kept ``val_loss``.

    Kept values are compared at the precision the notebook prints (3 decimals), so a difference no table
    shows cannot pick the winner.
    """
    if not histories:
        raise ValueError("histories is empty: pass {lr: History} for at least one LR")
    return min(histories, key=lambda lr: (-round(histories[lr].best_value, 3),
                                          round(histories[lr].kept("val_loss"), 3), lr))
