"""LoRA variants by hand: DoRA (a learned magnitude per output row) and LoRA+ (B at a higher LR).

rsLoRA is only another scaling, ``alpha / sqrt(r)``: ``LoRALinear(..., use_rslora=True)`` (``lora.lora_scaling``).

**DoRA** (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation") splits the adapted weight into a
direction and a magnitude, and learns both::

    W' = m * (W + s B A) / ||W + s B A||_row,        m: (out,), one number per output row

``||.||_row`` is the L2 norm of each row (over the input dimension), ``s`` the LoRA scaling. ``m`` starts at
``||W||_row``, so with ``B = 0`` the layer starts exactly at ``W``. As in the paper (section 4.3) and in peft,
the norm is treated as a constant in backward (detached): ``m`` and ``B A`` get gradients, the norm does not.
The forward never builds ``W'``: ``y = (m / n) * (x W^T + s (x A^T) B^T) + b`` with ``n`` the row norms.

**LoRA+** (Hayou et al. 2024) trains ``B`` with a learning rate ``ratio`` times that of ``A`` (16 in the
paper's experiments): ``loraplus_param_groups`` gives the parameter groups for any torch optimizer.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .lora import LoRALinear, lora_layers

__all__ = ["DoRALinear", "loraplus_param_groups"]


class DoRALinear(LoRALinear):
    """DoRA: ``y = (m / ||W + s B A||_row) * (x W^T + s x A^T B^T) + b`` around a frozen ``base: nn.Linear``.

    Shapes as ``LoRALinear`` (input ``(*, in)``, ``lora_A (r, in)``, ``lora_B (out, r)``), plus the trainable
    magnitude ``lora_magnitude`` of shape ``(out,)``, initialised to the row norms of ``base.weight``; the
    row norms ``n`` of ``W + s B A`` are recomputed every forward and detached (not differentiated).
    ``s`` is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). A new layer computes ``base(x)`` (up to
    rounding: ``m / n`` is 1 in exact arithmetic).

    Dropout (training mode, ``dropout > 0``) acts on the adapter's input only, as in peft:
    ``y = base(x) + (m / n - 1) * dropout(x) W^T + (m / n) s dropout(x) A^T B^T``.

    Merging: ``merge()`` writes ``W' = (m / n)[:, None] * (W + s B A)`` into ``base.weight`` and keeps ``n``
    (computed from the unmerged weight, as the forward does); ``unmerge()`` inverts it,
    ``W = W' / (m / n)[:, None] - s B A`` (equal up to rounding). Same rules as ``LoRALinear`` otherwise.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, *, use_rslora: bool = False):
        super().__init__(base, r, alpha, dropout, use_rslora=use_rslora)
        with torch.no_grad():
            self.lora_magnitude = nn.Parameter(torch.linalg.vector_norm(base.weight, dim=1))
        self._merged_norm: torch.Tensor | None = None

    def _row_norm(self) -> torch.Tensor:
        """``||W + s B A||_row``, shape ``(out,)``, detached (DoRA's constant in backward)."""
        with torch.no_grad():
            w = self.base.weight
            delta = self.lora_B.to(w.dtype) @ self.lora_A.to(w.dtype)  # (out, in)
            return torch.linalg.vector_norm(w + self.scaling * delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        x, lead = self._flat_input(x)  # (N, in)
        w, bias = self.base.weight, self.base.bias
        ratio = self.lora_magnitude / self._row_norm()  # (out,): m / n, n detached
        if self.lora_dropout is not None and self.training:
            out = self.base(x)  # (N, out) on the clean input
            xd = self.lora_dropout(x)
            h = F.linear(xd, self.lora_A).to(out.dtype)
            low = F.linear(h, self.lora_B.to(out.dtype))
            out = out + (ratio - 1).to(out.dtype) * F.linear(xd, w) + ratio.to(out.dtype) * self.scaling * low
            return out.view(*lead, self.out_features)
        out = F.linear(x, w)  # (N, out): x W^T, a fresh tensor, updated in place below
        h = F.linear(x, self.lora_A).to(out.dtype)  # (N, r)
        # a row-major (r, out) copy of B^T: the faster backward for B (see LoRALinear.forward)
        out.addmm_(h, self.lora_B.t().to(out.dtype).contiguous(), alpha=self.scaling)  # x W^T + s h B^T
        ratio = ratio.to(out.dtype)
        out = out * ratio if bias is None else torch.addcmul(bias.to(out.dtype), out, ratio)  # ratio * out + b
        return out.view(*lead, self.out_features)

    @torch.no_grad()
    def merge(self) -> None:
        """``base.weight = (m / n)[:, None] * (W + s B A)``; then the forward is ``base(x)`` only."""
        w = self._weight_to_merge()
        norm = self._row_norm()
        self._add_delta(w, 1.0)
        w.mul_((self.lora_magnitude / norm).to(w.dtype).unsqueeze(1))
        self._merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``base.weight = W' / (m / n)[:, None] - s B A`` with the ``n`` kept by ``merge()``."""
        w = self._weight_to_unmerge()
        w.div_((self.lora_magnitude / self._merged_norm).to(w.dtype).unsqueeze(1))
        self._add_delta(w, -1.0)
        self._merged_norm = None
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict]:
    """LoRA+ parameter groups: every ``lora_B`` at ``ratio * lr``, every other trainable parameter at ``lr``.

    Hayou, Ghosh and Yu 2024 ("LoRA+: Efficient Low Rank Adaptation of Large Models") show that with one LR
    for both factors the feature learning of ``B`` is too slow at large width, and set ``lr_B = ratio * lr_A``
    with ``ratio`` 16 in their experiments (``ratio = 1`` is plain LoRA). Returns two groups for any torch
    optimizer (``AdamW(loraplus_param_groups(model, 2e-4))``): ``{"params": [...], "lr": lr, "weight_decay":
    weight_decay, "name": "A and the rest"}`` and ``{"params": [every lora_B], "lr": ratio * lr, ...,
    "name": "lora_B"}``, parameters in ``named_parameters`` order; frozen parameters are left out.

    peft's ``create_loraplus_optimizer`` also moves every 1-D trainable parameter (biases, DoRA magnitudes)
    into the fast group; here only ``lora_B`` is, as the paper states it. Errors: no LoRA layer, ``lr`` or
    ``ratio`` not a number > 0, a negative ``weight_decay``.
    """
    for arg, value in (("lr", lr), ("ratio", ratio)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{arg} must be a number > 0, got {value!r}")
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers: call add_lora(model, ...) before loraplus_param_groups")
    b_ids = {id(layer.lora_B) for layer in layers.values()}
    slow, fast = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (fast if id(p) in b_ids else slow).append(p)
    return [{"params": slow, "lr": float(lr), "weight_decay": float(weight_decay), "name": "A and the rest"},
            {"params": fast, "lr": float(ratio * lr), "weight_decay": float(weight_decay), "name": "lora_B"}]
