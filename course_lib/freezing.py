"""Freezing, partial unfreezing and optimizer parameter groups for transfer learning.

Course models have ``model.blocks`` (an ``nn.ModuleList``, bottom to top) and ``model.head`` (the
classifier). A frozen parameter has ``requires_grad=False``: no gradient, no optimizer state, no update.
Adaptation depth goes from "frozen backbone + trained head" (a linear probe, ``unfreeze_top_k(model, 0)``)
through "top k blocks + head" to full fine-tuning.
"""
from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
from torch import nn

__all__ = ["freeze", "unfreeze", "unfreeze_top_k", "trainable_names", "param_groups", "NORM_LAYERS"]

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


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, backbone_lr: float | None = None,
                 head: str | None = "head", no_decay: Iterable[str] = ("bias", "norm")) -> list[dict]:
    """Optimizer parameter groups: head vs backbone learning rate, decay vs no-decay.

    Only trainable parameters are included. A parameter gets ``weight_decay=0`` when it is 0-D or 1-D
    (biases, norm scales), belongs to a normalization layer (a ``NORM_LAYERS`` type), or its name
    contains one of the ``no_decay`` substrings (case-insensitive); the others get ``weight_decay``.
    Parameters under ``head`` use ``lr``, the rest ``backbone_lr`` (default ``lr``; a smaller backbone
    LR keeps pretrained features closer to where they were). Groups, each with a ``"name"`` key, in this
    order and only when non-empty: ``backbone_decay``, ``backbone_no_decay``, ``head_decay``,
    ``head_no_decay``. Pass the list to any torch optimizer, e.g. ``torch.optim.AdamW(groups)``.
    """
    for arg, value in (("lr", lr), ("backbone_lr", lr if backbone_lr is None else backbone_lr)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{arg} must be a number > 0, got {value!r}")
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if isinstance(no_decay, str):
        no_decay = (no_decay,)
    keys = [s.lower() for s in no_decay]
    head = _head_name(model, head)
    backbone_lr = lr if backbone_lr is None else backbone_lr

    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters()}
    groups: dict[str, list[torch.Tensor]] = {k: [] for k in
                                             ("backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay")}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "head" if head is not None and (name == head or name.startswith(head + ".")) else "backbone"
        skip = p.ndim <= 1 or id(p) in norm_params or any(k in name.lower() for k in keys)
        groups[f"{part}_{'no_decay' if skip else 'decay'}"].append(p)
    if not any(groups.values()):
        raise ValueError("model has no trainable parameter (all requires_grad=False): unfreeze something first")
    return [{"name": name, "params": params, "lr": lr if name.startswith("head") else backbone_lr,
             "weight_decay": 0.0 if name.endswith("no_decay") else weight_decay}
            for name, params in groups.items() if params]
