"""Freezing, partial unfreezing and optimizer parameter groups for transfer learning.

Course models have ``model.blocks`` (an ``nn.ModuleList``, bottom to top) and ``model.head`` (the
classifier). A frozen parameter has ``requires_grad=False``: no gradient, no optimizer state, no update.
Adaptation depth goes from "frozen backbone + trained head" (a linear probe, ``unfreeze_top_k(model, 0)``)
through "top k blocks + head" to full fine-tuning. ``param_groups`` gives the pretrained backbone its own,
smaller learning rate (discriminative LRs), optionally decayed block by block (``layer_decay``);
``fit_stages`` unfreezes in stages (head first, then the top block, ...), one ``fit`` and one schedule per stage.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

__all__ = ["freeze", "unfreeze", "unfreeze_top_k", "trainable_names", "param_groups", "fit_stages", "NORM_LAYERS"]

#: Module types whose parameters never get weight decay (decaying a scale towards 0 shrinks the features).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _patterns(patterns) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise ValueError("patterns is empty: pass None for all parameters, or globs like 'blocks.1.*', 'head'")
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise TypeError(f"patterns must be non-empty strings like 'blocks.1.*', got {pat!r}")
    return patterns


def _matches(name: str, pattern: str) -> bool:
    """fnmatch glob on the parameter name; a plain module name also matches everything under it."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def _set_requires_grad(model: nn.Module, patterns, flag: bool) -> list[str]:
    pats = _patterns(patterns)
    named = list(model.named_parameters())
    if pats is not None:
        for pat in pats:
            if not any(_matches(n, pat) for n, _ in named):
                raise ValueError(f"pattern {pat!r} matches no parameter; parameter names look like "
                                 f"{[n for n, _ in named[:4]]} (globs: 'blocks.1.*'; module names: 'head')")
    changed = []
    for name, p in named:
        if (pats is None or any(_matches(name, pat) for pat in pats)) and p.requires_grad != flag:
            p.requires_grad_(flag)
            changed.append(name)
    return changed


def freeze(model: nn.Module, patterns: str | Iterable[str] | None = None) -> list[str]:
    """Set ``requires_grad=False`` on the parameters whose qualified names match ``patterns``.

    ``patterns``: None (every parameter), a glob or a list of globs on names from
    ``model.named_parameters()`` (``"blocks.1.*"``, ``"*.bias"``); a module name (``"head"``,
    ``"blocks.0"``) matches every parameter under it. Returns the names whose flag changed (already
    frozen ones are not listed). A pattern that matches no parameter raises ``ValueError``.
    """
    return _set_requires_grad(model, patterns, False)


def unfreeze(model: nn.Module, patterns: str | Iterable[str] | None = None) -> list[str]:
    """Set ``requires_grad=True`` on the matching parameters; same rules and return value as ``freeze``."""
    return _set_requires_grad(model, patterns, True)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad=True``, in ``named_parameters`` order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _blocks(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"model must have `blocks` (an nn.ModuleList of blocks, bottom to top); "
                        f"{type(model).__name__} has {type(blocks).__name__}")
    return blocks


def _head_name(model: nn.Module, head: str | None) -> str | None:
    if head is None:
        return None
    try:
        model.get_submodule(head)
    except AttributeError:
        raise ValueError(f"head={head!r} is not a submodule of {type(model).__name__}; its children are "
                         f"{[n for n, _ in model.named_children()]} (head=None for no head)") from None
    return head


def unfreeze_top_k(model: nn.Module, k: int, *, head: str | None = "head") -> list[str]:
    """Freeze everything, then make the top ``k`` of ``model.blocks`` and the head trainable.

    ``k=0`` trains the head only (frozen backbone: a linear probe); ``k=len(model.blocks)`` trains all
    blocks, while parameters outside blocks and head (embeddings, a final norm) stay frozen: call
    ``unfreeze(model, "norm")`` for those. Returns the names now trainable.
    """
    blocks = _blocks(model)
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__} ({k!r})")
    if not 0 <= k <= len(blocks):
        raise ValueError(f"k must be in [0, {len(blocks)}] (the model has {len(blocks)} blocks), got {k}")
    head = _head_name(model, head)
    if k == 0 and head is None:
        raise ValueError("k=0 with head=None would leave nothing trainable")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(blocks)[len(blocks) - k:]:
        for p in block.parameters():
            p.requires_grad_(True)
    if head is not None:
        for p in model.get_submodule(head).parameters():
            p.requires_grad_(True)
    return trainable_names(model)


def _check_positive(arg: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{arg} must be a number > 0, got {value!r}")


def _layer_of(names: list[str], blocks_name: str, n_blocks: int, head: str | None) -> dict[str, str]:
    """``name -> layer``: ``"blocks.i"`` for a block's parameters, ``"pre_blocks"`` / ``"post_blocks"`` for
    backbone parameters registered before the first / after the last block parameter, ``"head"``."""
    in_block = [next((i for i in range(n_blocks) if n.startswith(f"{blocks_name}.{i}.")), None) for n in names]
    first = next((j for j, b in enumerate(in_block) if b is not None), len(names))
    layers = {}
    for j, (name, b) in enumerate(zip(names, in_block)):
        if head is not None and (name == head or name.startswith(head + ".")):
            layers[name] = "head"
        elif b is not None:
            layers[name] = f"{blocks_name}.{b}"
        else:
            layers[name] = "pre_blocks" if j < first else "post_blocks"
    return layers


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, backbone_lr: float | None = None,
                 head: str | None = "head", no_decay: Iterable[str] = ("bias", "norm"),
                 layer_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups: head vs backbone learning rate, decay vs no-decay, optional layer-wise decay.

    Only trainable parameters are included. A parameter gets ``weight_decay=0`` when it is 0-D or 1-D
    (biases, norm scales), belongs to a normalization layer (a ``NORM_LAYERS`` type), or its name
    contains one of the ``no_decay`` substrings (case-insensitive); the others get ``weight_decay``.
    Parameters under ``head`` use ``lr``, the rest ``backbone_lr`` (default ``lr``; a smaller backbone
    LR keeps pretrained features closer to where they were). Groups, each with a ``"name"`` key, in this
    order and only when non-empty: ``backbone_decay``, ``backbone_no_decay``, ``head_decay``,
    ``head_no_decay``. Pass the list to any torch optimizer, e.g. ``torch.optim.AdamW(groups)``.

    ``layer_decay`` (a number in (0, 1], needs ``model.blocks``, bottom to top) splits the backbone by layer
    (layer-wise LR decay, as in ULMFiT / BEiT): with ``n`` blocks, block ``i`` (0 = bottom) trains at
    ``backbone_lr * layer_decay ** (n - 1 - i)``, so each block gets ``layer_decay`` times the LR of the block
    above; backbone parameters registered before the blocks (embeddings) get ``backbone_lr * layer_decay ** n``,
    those after them (a final norm) ``backbone_lr``. Groups are then named ``pre_blocks_decay``,
    ``blocks.0_decay``, ..., ``post_blocks_no_decay``, ``head_decay``, ``head_no_decay`` (bottom to top,
    non-empty ones only). ``layer_decay=1`` gives every backbone layer ``backbone_lr``.
    """
    _check_positive("lr", lr)
    _check_positive("backbone_lr", lr if backbone_lr is None else backbone_lr)
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if layer_decay is not None and (not isinstance(layer_decay, (int, float)) or isinstance(layer_decay, bool)
                                    or not 0 < layer_decay <= 1):
        raise ValueError(f"layer_decay must be a number in (0, 1] (each block gets layer_decay times the LR of "
                         f"the block above) or None, got {layer_decay!r}")
    if isinstance(no_decay, str):
        no_decay = (no_decay,)
    keys = [s.lower() for s in no_decay]
    head = _head_name(model, head)
    backbone_lr = lr if backbone_lr is None else backbone_lr

    named = list(model.named_parameters())
    if layer_decay is None:
        layer = {n: "head" if head is not None and (n == head or n.startswith(head + ".")) else "backbone"
                 for n, _ in named}
        order = ["backbone", "head"]
        layer_lr = {"backbone": backbone_lr, "head": lr}
    else:
        blocks = _blocks(model)
        blocks_name = next(n for n, m in model.named_children() if m is blocks)
        n = len(blocks)
        layer = _layer_of([n_ for n_, _ in named], blocks_name, n, head)
        order = ["pre_blocks", *(f"{blocks_name}.{i}" for i in range(n)), "post_blocks", "head"]
        layer_lr = {"pre_blocks": backbone_lr * layer_decay ** n, "post_blocks": backbone_lr, "head": lr,
                    **{f"{blocks_name}.{i}": backbone_lr * layer_decay ** (n - 1 - i) for i in range(n)}}

    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters()}
    groups: dict[tuple[str, str], list[torch.Tensor]] = {(part, kind): [] for part in order
                                                         for kind in ("decay", "no_decay")}
    for name, p in named:
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or id(p) in norm_params or any(k in name.lower() for k in keys)
        groups[(layer[name], "no_decay" if skip else "decay")].append(p)
    if not any(groups.values()):
        raise ValueError("model has no trainable parameter (all requires_grad=False): unfreeze something first")
    return [{"name": f"{part}_{kind}", "params": params, "lr": layer_lr[part],
             "weight_decay": 0.0 if kind == "no_decay" else weight_decay}
            for (part, kind), params in groups.items() if params]


def fit_stages(model: nn.Module, stages: Sequence[tuple[int, int]], train_loader, val_loader, *, lr: float,
               backbone_lr: float | None = None, layer_decay: float | None = None, weight_decay: float = 0.0,
               checkpoint=None, restore_best: bool = True, name: str | None = None, head: str | None = "head",
               **fit_kwargs):
    """Staged (gradual) unfreezing: one ``train.fit`` per stage, each with its own optimizer and schedule.

    ``stages``: ``[(k, epochs), ...]``, e.g. ``[(0, 5), (1, 15)]``: the head alone for 5 epochs, then the top
    block too for 15 (ULMFiT's gradual unfreezing; fastai's ``fine_tune`` is ``[(0, e1), (n_blocks, e2)]``).
    Stage ``s`` calls ``unfreeze_top_k(model, k)``, builds ``torch.optim.AdamW(param_groups(model, lr=lr,
    backbone_lr=backbone_lr, layer_decay=layer_decay, weight_decay=weight_decay))`` and continues from the
    weights the previous stage ended with (its last epoch). ``fit_kwargs`` (``scheduler``, ``warmup_ratio``,
    ``device``, ``split_hash``, ...) go to every ``fit``: a named scheduler restarts with each stage.

    Every stage keeps its best epoch under the same rule (``checkpoint``: a ``BestCheckpoint`` giving the
    metric, mode and patience; default ``BestCheckpoint()``), and the returned ``History`` has one row per
    epoch over all stages (epochs numbered on, a ``stage`` column from 1), ``best_epoch`` / ``best_value`` /
    ``best_state`` of the best stage (ties keep the earlier one), and the largest trainable count and
    optimizer state of any stage. ``restore_best`` loads that checkpoint into ``model``.
    """
    from torch.optim import AdamW

    from .checkpoint import BestCheckpoint
    from .train import History, fit

    stages = list(stages)
    if not stages:
        raise ValueError("stages is empty: pass [(k, epochs), ...], e.g. [(0, 5), (1, 15)]")
    for stage in stages:
        if (not isinstance(stage, (tuple, list)) or len(stage) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in stage) or stage[1] < 1):
            raise ValueError(f"each stage must be a pair (k top blocks, epochs >= 1) of ints, got {stage!r}")
    rule = BestCheckpoint() if checkpoint is None else checkpoint
    if not isinstance(rule, BestCheckpoint):
        raise TypeError(f"checkpoint must be a BestCheckpoint (the rule every stage keeps its best epoch by), "
                        f"got {type(rule).__name__}")
    for k, _ in stages:  # check every k before training anything
        if not 0 <= k <= len(_blocks(model)):
            raise ValueError(f"stage k must be in [0, {len(_blocks(model))}] (the model has "
                             f"{len(_blocks(model))} blocks), got {k}")
    combined = History(name=name, split_hash=fit_kwargs.get("split_hash"), rule=rule.rule)
    combined.trainable_params = combined.optimizer_state_bytes = 0
    offset = 0
    for s, (k, epochs) in enumerate(stages, start=1):
        unfreeze_top_k(model, k, head=head)
        groups = param_groups(model, lr=lr, backbone_lr=backbone_lr, layer_decay=layer_decay,
                              weight_decay=weight_decay, head=head)
        history = fit(model, train_loader, val_loader, epochs=epochs, optimizer=AdamW(groups),
                      checkpoint=BestCheckpoint(rule.metric, rule.mode, rule.patience), restore_best=False,
                      name=f"{name or 'fit'} stage {s} (top {k})", **fit_kwargs)
        combined.extend({**row, "epoch": row["epoch"] + offset, "stage": s} for row in history)
        combined.steps.extend(history.steps)
        if history.best_epoch is not None and (combined.best_value is None or (
                history.best_value > combined.best_value if rule.mode == "max"
                else history.best_value < combined.best_value)):
            combined.best_epoch, combined.best_value = history.best_epoch + offset, history.best_value
            combined.best_state = history.best_state
        combined.trainable_params = max(combined.trainable_params, history.trainable_params)
        combined.total_params = history.total_params
        combined.optimizer_state_bytes = max(combined.optimizer_state_bytes, history.optimizer_state_bytes)
        combined.seconds += history.seconds
        offset += len(history)
    if restore_best and combined.best_state is not None:
        model.load_state_dict(combined.best_state)
    return combined
