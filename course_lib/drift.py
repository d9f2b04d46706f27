"""How far adaptation moved the pretrained weights: per-layer relative drift ``||W - W0|| / ||W0||``.

A fine-tuned backbone that moves a lot has rewritten what it learned in pretraining (and forgets the source
task); one that barely moves reuses it. ``weight_drift`` measures that per layer, for any adapted copy of a
model: plain fine-tuning, a partial unfreeze, or LoRA (whose effective weight ``W + scaling * B @ A`` is
what it compares).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from .lora import lora_layers, merge_lora

__all__ = ["effective_state", "weight_drift"]


def effective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s parameters as a plain model would name them, LoRA merged in (the model is not changed).

    For a model without ``LoRALinear`` layers this is ``dict(model.named_parameters())`` (detached); with them,
    a merged deep copy's parameters: ``...q_proj.weight = W + scaling * B @ A`` under the name the layer had
    before ``add_lora``.
    """
    if lora_layers(model):
        model = merge_lora(copy.deepcopy(model))
    return {n: p.detach() for n, p in model.named_parameters()}


def _layer(name: str, blocks: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == blocks and len(parts) > 2 else parts[0]


def weight_drift(before: nn.Module | dict, after: nn.Module | dict, *, exclude: Iterable[str] = ("head",),
                 blocks: str = "blocks") -> dict[str, float]:
    """Relative drift per layer: ``sqrt(sum ||W - W0||^2) / sqrt(sum ||W0||^2)`` over each layer's parameters.

    ``before``: the pretrained model (or its ``state_dict``); ``after``: the adapted one (LoRA layers are
    merged first, see ``effective_state``). Layers are ``"blocks.0"``, ``"blocks.1"``, ... for the parameters
    of each block and the top-level module name (``"embed"``, ``"pos"``, ``"norm"``) for the others, in model
    order; parameters under ``exclude`` (the replaced head) are left out. ``0.0``: the layer did not move;
    ``0.1``: it moved by a tenth of its size. Raises ``ValueError`` when the two do not have the same
    parameters (names and shapes).
    """
    w0 = before if isinstance(before, dict) else effective_state(before)
    w1 = after if isinstance(after, dict) else effective_state(after)
    if isinstance(exclude, str):
        exclude = (exclude,)
    skip = tuple(exclude)
    names = [n for n in w0 if not any(n == e or n.startswith(e + ".") for e in skip)]
    missing = [n for n in names if n not in w1]
    if missing:
        raise ValueError(f"after has no parameter {missing[:4]}: pass the adapted copy of the same model as before")
    sums: dict[str, list[float]] = {}
    for n in names:
        a, b = w0[n].float().cpu(), w1[n].float().cpu()
        if a.shape != b.shape:
            raise ValueError(f"parameter {n!r} has shape {tuple(a.shape)} before and {tuple(b.shape)} after")
        acc = sums.setdefault(_layer(n, blocks), [0.0, 0.0])
        acc[0] += float((b - a).pow(2).sum())
        acc[1] += float(a.pow(2).sum())
    return {layer: (d ** 0.5) / (s ** 0.5) if s > 0 else float(d > 0) for layer, (d, s) in sums.items()}
