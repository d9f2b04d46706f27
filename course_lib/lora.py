"""LoRA by hand: a low-rank adapter around a frozen ``nn.Linear``, and helpers to add, save and merge it.

LoRA (Hu et al. 2021) keeps a pretrained weight ``W (out, in)`` frozen and learns a rank-``r`` update::

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,      A: (r, in),  B: (out, r)

``A`` starts like a Linear weight (kaiming uniform, a=sqrt(5)) and ``B`` at zero, so the adapted model
starts exactly at the pretrained one. Only ``r * (in + out)`` numbers are trained instead of ``in * out``.
After training, ``W + (alpha / r) B A`` is a plain weight again (``merge``): inference costs nothing extra.

Variants (flags of ``LoRALinear`` and ``add_lora``, named like peft's ``LoraConfig``): ``use_rslora=True``
scales by ``alpha / sqrt(r)`` instead (rank-stabilized LoRA, Kalajievic 2023); ``use_dora=True`` learns a
per-row magnitude on top (DoRA, Liu et al. 2024: ``course_lib.lora_variants.DoRALinear``). LoRA+ (B at a
higher LR) is an optimizer setting: ``course_lib.lora_variants.loraplus_param_groups``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "LoRALinear",
    "add_lora",
    "lora_layers",
    "lora_state_dict",
    "load_lora_state_dict",
    "merge_lora",
    "lora_parameter_count",
    "lora_scaling",
]


def _check_r_alpha_dropout(r, alpha, dropout) -> None:
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"r must be an int, got {type(r).__name__} ({r!r})")
    if r <= 0:
        raise ValueError(f"r must be >= 1, got {r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0 (a common choice is alpha = r or 2 * r), got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor in front of ``B A``: ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora`` (rsLoRA).

    With ``alpha / r`` and a fixed alpha, a larger rank shrinks the update: at initialisation each entry of
    ``B A x`` sums ``r`` terms, so it grows like ``sqrt(r)``, and ``alpha / r`` leaves it ``~ 1 / sqrt(r)``
    (Kalajievic 2023). ``alpha / sqrt(r)`` keeps it of the same size for every rank. Recipes that scale alpha
    with r (``alpha = 2 r``) get a constant ``alpha / r = 2`` instead: the update then *grows* with r.
    """
    _check_r_alpha_dropout(r, alpha, 0.0)
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be True or False, got {use_rslora!r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """``y = base(x) + scaling * dropout(x) @ A^T @ B^T`` around a frozen ``base: nn.Linear``.

    Shapes: input ``(*, in)`` (any leading dimensions), output ``(*, out)``; ``lora_A`` is ``(r, in)``,
    ``lora_B`` is ``(out, r)``, both trainable, in the dtype and on the device of ``base.weight``; ``scaling``
    is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora=True``, see ``lora_scaling``). ``A`` starts like
    a Linear weight (kaiming uniform, a=sqrt(5)) and ``B`` at zero, so a new layer computes exactly ``base(x)``.
    The base weight and bias are frozen (``requires_grad=False``).

    Merging: ``merge()`` adds ``scaling * B A`` into ``base.weight`` (in place, no grad) and sets
    ``merged = True``; the forward is then ``base(x)`` alone, a plain Linear's cost. ``unmerge()`` subtracts
    it back (equal up to rounding). ``merge()`` on a merged layer and ``unmerge()`` on an unmerged one raise
    ``RuntimeError`` (adding the update twice would silently corrupt the weight). Train unmerged: while
    merged, ``lora_A``/``lora_B`` receive no gradient.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, *, use_rslora: bool = False):
        super().__init__()
        if isinstance(base, LoRALinear):
            raise TypeError("base is already a LoRALinear: wrap the plain nn.Linear once (or merge_lora first)")
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        _check_r_alpha_dropout(r, alpha, dropout)
        self.base = base
        self.r = r
        self.alpha = alpha
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.use_rslora = use_rslora
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear does to its weight
        self.merged = False
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        x, lead = self._flat_input(x)
        # Performance. The low-rank path is added *in place* into the frozen path's output, with one addmm_
        # whose alpha applies the scaling inside the matrix product: no (N, out) temporary for the product,
        # the scaling or the sum, in forward or backward (addmm_'s backward passes the output gradient
        # through untouched and scales only (N, r)- and (r, out)-sized products). Autograd allows it because
        # a Linear's backward needs its input and weight, not its output. It works on the 2-D (N, out)
        # tensor itself: an in-place op on a view of a 3-D output makes autograd copy the whole output
        # gradient in backward. With dropout == 0 no dropout call touches x.
        out = self.base(x)  # (N, out): a fresh tensor (not a view), so it can be updated in place
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        # .to() is free when dtypes agree; under autocast base(x) and h are bf16/fp16 while B is fp32
        h = F.linear(x, self.lora_A).to(out.dtype)  # (N, r): small
        # B^T as a row-major (r, out) copy (r * out numbers), not the transposed view lora_B.t(): for a
        # column-major second factor autograd computes B's gradient as grad^T @ h, (out, N) @ (N, r), which
        # ran about 5x slower on CPU (MKL, N=512, out=1024, r=8) than the same numbers as h^T @ grad
        bt = self.lora_B.t().to(out.dtype).contiguous()
        out.addmm_(h, bt, alpha=self.scaling)  # out += scaling * h B^T
        return out.view(*lead, self.out_features)

    def _flat_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """``x`` of shape ``(*, in)`` as ``(N, in)`` (a free view for a contiguous x) and its leading shape."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x must have shape (*, {self.in_features}), got {tuple(x.shape)}")
        return x.reshape(-1, self.in_features), x.shape[:-1]

    @torch.no_grad()
    def merge(self) -> None:
        """``base.weight += scaling * B A`` in place; then the forward is ``base(x)`` only."""
        self._add_delta(self._weight_to_merge(), 1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``base.weight -= scaling * B A``: undo ``merge()`` (exact up to floating-point rounding)."""
        self._add_delta(self._weight_to_unmerge(), -1.0)
        self.merged = False

    def _weight_to_merge(self) -> torch.Tensor:
        """``base.weight``, after checking that a merge is possible (not merged yet, a float base)."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged: call unmerge() before merging again")
        if callable(getattr(self.base, "quantized", None)):  # qlora.Linear4bit: weight is a dequantized copy
            raise RuntimeError("the base layer is quantized (qlora.Linear4bit): its weight is not stored in float, so "
                               "a merge would be lost; merge into a float copy instead: nn.Linear with "
                               "qlora.dequantize_nf4(base.quantized()) as its weight")
        return self.base.weight

    def _weight_to_unmerge(self) -> torch.Tensor:
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged: there is nothing to unmerge")
        return self.base.weight

    def _add_delta(self, w: torch.Tensor, sign: float) -> None:
        """``w += sign * scaling * B A`` in place, in ``w``'s dtype."""
        w.addmm_(self.lora_B.to(w.dtype), self.lora_A.to(w.dtype), alpha=sign * self.scaling)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout_p}, merged={self.merged}"
                + (", use_rslora=True" if self.use_rslora else ""))


def _as_names(value, arg: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    try:
        names = list(value)
    except TypeError:
        raise TypeError(f"{arg} must be a string or a list of strings, got {type(value).__name__}") from None
    for name in names:
        if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
            raise ValueError(f"{arg} entries must be module names like 'q_proj' or 'attn.q_proj', got {name!r}")
    return names


def _ends_with(qualified_name: str, suffix: str) -> bool:
    """True when the last dot-separated components of ``qualified_name`` are those of ``suffix``."""
    parts, want = qualified_name.split("."), suffix.split(".")
    return len(parts) >= len(want) and parts[-len(want):] == want


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """``{qualified name: LoRALinear}`` for every LoRA layer in ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, target_modules: str | Iterable[str], r: int, alpha: float,
             dropout: float = 0.0, train_modules: str | Iterable[str] = (), *, use_rslora: bool = False,
             use_dora: bool = False) -> list[str]:
    """Replace every ``nn.Linear`` named like a target by a ``LoRALinear`` (in place); freeze the rest.

    A module matches an entry when its qualified name *ends with* the entry's dot-separated components:
    ``"q_proj"`` matches ``"blocks.0.attn.q_proj"`` but not ``"blocks.0.attn.xq_proj"``; ``"attn.q_proj"``
    also works. ``train_modules`` (e.g. ``"head"``) match the same way; their parameters stay trainable
    (fully fine-tuned). Every other parameter gets ``requires_grad=False``. ``use_rslora`` scales by
    ``alpha / sqrt(r)``; ``use_dora`` wraps with ``lora_variants.DoRALinear`` (a learned magnitude per row).

    Returns the wrapped names in module order. Everything is checked before the model is touched, so an
    error leaves it unchanged. Errors: r/alpha/dropout out of range, empty ``target_modules``, an entry
    of ``target_modules`` or ``train_modules`` that matches nothing, a matched module that is not an
    ``nn.Linear``, a model that already has LoRA layers (add all targets in one call, or ``merge_lora``
    first), a train module that overlaps a LoRA target.
    """
    _check_r_alpha_dropout(r, alpha, dropout)
    lora_scaling(r, alpha, use_rslora)  # checks use_rslora
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
    if use_dora:
        from .lora_variants import DoRALinear as layer_cls  # the variants module builds on this one
    else:
        layer_cls = LoRALinear
    targets = _as_names(target_modules, "target_modules")
    if not targets:
        raise ValueError("target_modules is empty: name the Linear layers to adapt, e.g. ['q_proj', 'v_proj']")
    trains = _as_names(train_modules, "train_modules")
    existing = list(lora_layers(model))
    if existing:
        raise ValueError(f"model already has LoRA layers ({', '.join(existing[:4])}): add all targets in one "
                         "add_lora call, or call merge_lora(model) first")
    modules = dict(model.named_modules())
    linear_names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    wrapped = []
    for target in targets:
        hits = [n for n in modules if n and _ends_with(n, target)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
            raise ValueError(f"target_modules entry {target!r} matches no module; Linear layers here are named "
                             f"{short[:12]} (e.g. {linear_names[:3]})")
        for name in hits:
            if not isinstance(modules[name], nn.Linear):
                inside = [n for n in linear_names if n.startswith(name + ".")]
                raise TypeError(f"target_modules entry {target!r} matches {name!r}, a {type(modules[name]).__name__}:"
                                f" LoRALinear wraps nn.Linear only (Linear layers inside it: {inside[:4]})")
        wrapped += [n for n in hits if n not in wrapped]
    order = {n: i for i, n in enumerate(modules)}
    wrapped.sort(key=order.__getitem__)
    train_names = []
    for entry in trains:
        hits = [n for n in modules if n and _ends_with(n, entry)]
        if not hits:
            raise ValueError(f"train_modules entry {entry!r} matches no module; top-level modules are "
                             f"{[n for n, _ in model.named_children()]}")
        for name in hits:
            for w in wrapped:
                if w == name or w.startswith(name + ".") or name.startswith(w + "."):
                    raise ValueError(f"train_modules entry {entry!r} ({name!r}) overlaps LoRA target {w!r}: "
                                     "a module is either adapted with LoRA or fully trained, not both")
        train_names += hits

    for p in model.parameters():
        p.requires_grad_(False)
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, layer_cls(modules[name], r, alpha, dropout, use_rslora=use_rslora))
    for name in train_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return wrapped


def _adapter_param_names(model: nn.Module) -> list[str]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers: call add_lora(model, ...) first")
    lora_names = {f"{n}.{p}" for n, m in layers.items() for p, _ in m.named_parameters() if p.startswith("lora_")}
    return [n for n, p in model.named_parameters() if p.requires_grad or n in lora_names]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every ``lora_A``/``lora_B`` and every other trainable parameter (e.g. the trained head).

    Together with the pretrained checkpoint this is all that training changed, so it is enough to restore
    the adapted model (``load_lora_state_dict`` on a model prepared with the same ``add_lora`` call).
    Keys are ``model.named_parameters()`` names. Buffers (e.g. BatchNorm running statistics) are not
    included: the course models use LayerNorm, which has none.
    """
    params = dict(model.named_parameters())
    return {name: params[name].detach().clone() for name in _adapter_param_names(model)}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy a ``lora_state_dict`` into ``model`` (strict: same keys and shapes, LoRA layers unmerged)."""
    expected = _adapter_param_names(model)
    merged = [n for n, m in lora_layers(model).items() if m.merged]
    if merged:
        raise RuntimeError(f"LoRA layers {merged[:4]} are merged: unmerge them before loading adapter weights")
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    if missing or unexpected:
        raise ValueError(f"state does not fit this model: missing keys {missing[:6]}, unexpected keys "
                         f"{unexpected[:6]}; prepare the model with the same add_lora(...) call that was saved")
    params = dict(model.named_parameters())
    for name in expected:
        if tuple(state[name].shape) != tuple(params[name].shape):
            raise ValueError(f"shape of {name!r} is {tuple(state[name].shape)} in state but "
                             f"{tuple(params[name].shape)} in model: was it saved with another rank r?")
    with torch.no_grad():
        for name in expected:
            params[name].copy_(state[name])
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRALinear and put its plain ``base`` nn.Linear back in its place; returns the model.

    The result has no LoRA parameters and gives the same outputs (up to rounding). Requires_grad flags
    stay as they were (the merged weights frozen). Raises ``ValueError`` if there is no LoRA layer.
    """
    if isinstance(model, LoRALinear):
        if not model.merged:
            model.merge()
        return model.base
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers to merge (already merged, or add_lora never called)")
    for name, layer in layers.items():
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model


def lora_parameter_count(in_features: int, out_features: int, r: int) -> int:
    """Trainable numbers of one LoRA adapter on an ``(in -> out)`` Linear: ``r * (in + out)``."""
    for arg, value in (("in_features", in_features), ("out_features", out_features), ("r", r)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
    return r * (in_features + out_features)
