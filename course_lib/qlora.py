"""QLoRA by hand: blockwise NF4 quantization with double quantization, a frozen 4-bit Linear, and its bytes.

QLoRA (Dettmers et al. 2023) stores a frozen pretrained weight in 4 bits and trains a LoRA adapter on top;
the weight is dequantized on the fly in every forward. The storage format, in bitsandbytes' order:

1. **NF4, blocks of 64.** Flatten the weight ``W`` (n numbers) into blocks of ``blocksize`` (64; the last
   block may be shorter). Per block ``b``: ``absmax_b = max |w|``, ``s = clamp(w / absmax_b, -1, 1)`` and the
   code ``q = argmin_k |s - NF4[k]|`` over the 16 NF4 values (quantiles of a standard normal, scaled to
   [-1, 1], with an exact 0). Ties go to the lower code (``bucketize`` against the 15 midpoints).
2. **Packing.** Two codes per byte, the first in the high nibble: ``byte = q[2i] << 4 | q[2i+1]``; an odd
   n is padded with the code of 0.0 (7). ``ceil(n / 2)`` bytes.
3. **Double quantization** of the n/64 fp32 ``absmax`` values: subtract their mean ``offset`` (one fp32),
   then quantize blockwise to 8 bits (blocks of ``stats_blocksize`` = 256) with bitsandbytes' signed
   *dynamic* map (``dynamic_map()``: 256 values, one fp32 scale per block of 256; the nearest value of the
   point of a 65,536-point grid next to ``x / scale``, as bitsandbytes' CPU kernel rounds).

Dequantization: ``absmax_b = DYN[qa_b] * scale_{b // 256} + offset`` and ``w = NF4[q] * absmax_b``, in fp32,
cast to the weight's dtype. Bits per parameter (the paper's 4.127)::

    4 + 8 / 64 + 32 / (64 * 256) = 4.127   (double quantization)      4 + 32 / 64 = 4.5   (fp32 absmax)

against 32 (fp32), 16 (bf16) and 8 + 32 / 256 = 8.125 (blockwise 8-bit). ``predicted_bits_per_param`` gives
the asymptotic figure, ``nf4_nbytes`` the exact bytes of one tensor (partial blocks and the offset included).

Everything here is native torch; ``tests/test_qlora.py`` checks the codes, the quantized statistics and the
dequantized weights bit for bit against ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit``
(``quant_type="nf4"``, ``compress_statistics=True``, ``blocksize=64``), fp32 and bf16.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "NF4_CODE",
    "dynamic_map",
    "nf4_quantize_block",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4",
    "nf4_nbytes",
    "predicted_bits_per_param",
    "Linear4bit",
    "quantize_model_4bit",
    "linear4bit_layers",
]

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
"""The 16 NF4 values (fp32, sorted), bitsandbytes' table: quantiles of N(0, 1) scaled to [-1, 1], exact 0 at
code 7. Code ``k`` of a packed nibble means ``NF4_CODE[k]`` times the block's absmax."""

_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # 15 midpoints: s <= bound[k] -> code k (ties go down)
_BYTE_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # byte -> (hi, lo) values
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed *dynamic* 8-bit map: 256 sorted fp32 values in [-1, 1] (Dettmers 2015).

    For exponent ``i = 0 .. 6`` it holds ``2**i`` fraction values ``10**(i - 6) * m`` and their negatives,
    where ``m`` are the midpoints of ``linspace(0.1, 1, 2**i + 1)``; plus 0 and 1.0, and one extra 0 to fill
    256 (bitsandbytes' construction, kept for bit-exact codes). Dense near 0, coarse near 1: the right shape
    for absmax values minus their mean.
    """
    data: list[float] = []
    non_sign = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign - max_exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


_DYNAMIC = dynamic_map()
_DYNAMIC_BOUNDS = (_DYNAMIC[:-1] + _DYNAMIC[1:]) / 2


def _check_float(x, arg: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"{arg} must be float32, bfloat16 or float16, got {x.dtype}: call {arg}.float() first")
    if x.numel() == 0:
        raise ValueError(f"{arg} is empty (shape {tuple(x.shape)}): there is nothing to quantize")
    if not torch.isfinite(x).all():
        raise ValueError(f"{arg} contains inf or nan: quantize a finite weight")


def _check_blocksize(blocksize, arg: str = "blocksize") -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"{arg} must be an even int >= 2 (QLoRA uses 64 for weights, 256 for statistics), "
                         f"got {blocksize!r}")


def _blockwise_scaled(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, absmax)`` for flat fp32 ``x``: ``s = clamp(x / absmax_block, -1, 1)`` (n,), ``absmax`` (blocks,).

    bitsandbytes' arithmetic, kept for bit-exact codes: full blocks multiply by ``1 / absmax`` (absmax
    clamped at 1e-38, so an all-zero block gives codes of 0.0), the short last block divides by its absmax.
    """
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    s = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).unsqueeze(1)), -1, 1).reshape(-1)
    if full < n:
        tail = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail.unsqueeze(0)])
        s = torch.cat([s, torch.clamp(x[full:] / tail, -1, 1)])
    return s, absmax


def nf4_quantize_block(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes of one block: ``(codes (n,) uint8 in 0..15, absmax () fp32)``, unpacked.

    ``absmax = max |block|``; ``codes[i] = argmin_k |block[i] / absmax - NF4_CODE[k]|`` (ties to the lower
    code). Dequantize with ``NF4_CODE[codes] * absmax``. ``block`` is 1-D (a block of 64 in QLoRA).
    """
    _check_float(block, "block")
    if block.dim() != 1:
        raise ValueError(f"block must be 1-D (one block of values, e.g. 64), got shape {tuple(block.shape)}")
    s, absmax = _blockwise_scaled(block.detach().float(), block.numel())
    return torch.bucketize(s, _NF4_BOUNDS.to(s.device)).to(torch.uint8), absmax[0]


def _dynamic_lut() -> torch.Tensor:
    """The 65,536-entry table bitsandbytes' CPU kernel rounds through: bin ``i`` holds ``v_i = -1 + 2 i / 65535``
    and the index of the nearest ``dynamic_map()`` value (ties down), so ``code(s) = lut[round((s + 1) / 2 *
    65535)]``; nearest up to one bin width (3e-5), bit-exact with bitsandbytes on CPU."""
    i = torch.arange(65536, dtype=torch.float32)
    return torch.bucketize(-1.0 + (2.0 * i) / 65535, _DYNAMIC_BOUNDS).to(torch.uint8)


_LUT = _dynamic_lut()


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with ``dynamic_map()``: ``(codes uint8 like x, absmax (blocks,) fp32)``.

    Per block of ``blocksize`` (the last may be shorter): ``absmax = max |x|``, ``s = clamp(x * (1 / absmax),
    -1, 1)`` and ``code = lut[trunc((s + 1) * 0.5 * 65535 + 0.5)]`` (``_dynamic_lut``: the nearest map value of
    the 1/65535-grid point next to ``s``), all in fp32 as bitsandbytes' CPU kernel does; an all-zero block
    gets code 0 (its absmax is 0, so it dequantizes to 0).
    """
    _check_float(x, "x")
    _check_blocksize(blocksize)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    absmax = F.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize).abs().amax(dim=1)
    inv = (1.0 / absmax).repeat_interleave(blocksize)[:n]
    s = torch.clamp(flat * inv, -1, 1)
    idx = ((s + 1.0) * 0.5 * 65535.0 + 0.5).long()  # the grid point; s = nan (zero block) is handled below
    codes = _LUT.to(idx.device)[idx.clamp(0, 65535)]
    codes = torch.where(absmax.repeat_interleave(blocksize)[:n] == 0, torch.zeros_like(codes), codes)
    return codes.view(x.shape), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """Inverse of ``quantize_blockwise_8bit``: ``dynamic_map()[codes] * absmax[block]``, fp32, ``codes``' shape."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8 (from quantize_blockwise_8bit), got {codes.dtype}")
    _check_blocksize(blocksize)
    n = codes.numel()
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"absmax has {absmax.numel()} values, but {n} codes in blocks of {blocksize} need "
                         f"{-(-n // blocksize)}")
    values = _DYNAMIC.to(codes.device).index_select(0, codes.reshape(-1).long())
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).view(codes.shape)


@dataclass
class NF4Weight:
    """A tensor in NF4 with (optional) double quantization; ``dequantize_nf4`` turns it back.

    ``packed``: (ceil(n / 2),) uint8, two codes a byte (high nibble first). ``absmax``: (blocks,) uint8
    codes of ``absmax - offset`` (double quantization) or fp32 absmax (without). ``absmax_scale``:
    (ceil(blocks / stats_blocksize),) fp32, ``offset``: () fp32 (double quantization only, else None).
    """
    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    offset: torch.Tensor | None
    shape: tuple
    dtype: torch.dtype
    blocksize: int = 64
    stats_blocksize: int = 256

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored for this tensor (the shared code books, 16 + 256 fp32 values, not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax, self.absmax_scale, self.offset)
                   if t is not None)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 stats_blocksize: int = 256) -> NF4Weight:
    """NF4-quantize ``weight`` (any shape, fp32/bf16/fp16) in blocks of ``blocksize`` over its flattened values.

    With ``double_quant`` the fp32 block absmax are stored as ``offset = mean(absmax)`` plus 8-bit codes of
    ``absmax - offset`` in blocks of ``stats_blocksize`` (bitsandbytes' ``compress_statistics=True``).
    """
    _check_float(weight, "weight")
    _check_blocksize(blocksize)
    _check_blocksize(stats_blocksize, "stats_blocksize")
    w = weight.detach().reshape(-1).float()
    s, absmax = _blockwise_scaled(w, blocksize)
    if s.numel() % 2:
        s = F.pad(s, (0, 1))  # scaled 0.0 -> code 7, bitsandbytes' padding
    q = torch.bucketize(s, _NF4_BOUNDS.to(s.device)).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    scale = offset = None
    if double_quant:
        offset = absmax.mean()
        absmax, scale = quantize_blockwise_8bit(absmax - offset, stats_blocksize)
    return NF4Weight(packed, absmax, scale, offset, tuple(weight.shape), weight.dtype, blocksize, stats_blocksize)


def _block_absmax(q: NF4Weight) -> torch.Tensor:
    if q.offset is None:
        return q.absmax.float()
    return dequantize_blockwise_8bit(q.absmax, q.absmax_scale, q.stats_blocksize) + q.offset


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``NF4_CODE[codes] * absmax[block]`` in fp32, in ``q.shape``, cast to ``dtype`` (default ``q.dtype``)."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"q must be an NF4Weight (from quantize_nf4), got {type(q).__name__}")
    n, bs = q.numel, q.blocksize
    # Performance: one row per byte from a (256, 2) table of (high, low) nibble values instead of two shifts, a
    # stack and a lookup per code, with index_select (about 3x faster on CPU than advanced indexing ``t[idx]``);
    # the scale broadcasts over (blocks, blocksize) instead of being repeated.
    values = _BYTE_PAIRS.to(q.packed.device).index_select(0, q.packed.long()).view(-1)  # (2 ceil(n / 2),) fp32
    absmax = _block_absmax(q)
    blocks = absmax.numel()
    if values.numel() < blocks * bs:  # a short last block
        values = F.pad(values, (0, blocks * bs - values.numel()))
    out = (values.view(blocks, bs) * absmax[:, None]).view(-1)[:n]
    return out.view(q.shape).to(q.dtype if dtype is None else dtype)


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True, stats_blocksize: int = 256) -> int:
    """Exact bytes ``quantize_nf4`` stores for ``numel`` values (``NF4Weight.nbytes``), predicted from the format:

    ``ceil(n / 2)`` packed bytes + ``blocks = ceil(n / blocksize)`` absmax (1 byte each with double
    quantization, else 4) + ``4 * ceil(blocks / stats_blocksize)`` scales + 4 for the offset.
    """
    if not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be an int >= 1, got {numel!r}")
    blocks = -(-numel // blocksize)
    if not double_quant:
        return -(-numel // 2) + 4 * blocks
    return -(-numel // 2) + blocks + 4 * -(-blocks // stats_blocksize) + 4


def predicted_bits_per_param(blocksize: int = 64, double_quant: bool = True, stats_blocksize: int = 256) -> float:
    """Asymptotic bits per parameter: ``4 + 8 / blocksize + 32 / (blocksize * stats_blocksize)`` with double
    quantization (4.127 at 64 / 256, the QLoRA paper's figure), ``4 + 32 / blocksize`` without (4.5)."""
    _check_blocksize(blocksize)
    _check_blocksize(stats_blocksize, "stats_blocksize")
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * stats_blocksize)
    return 4 + 32 / blocksize


class Linear4bit(nn.Linear):
    """A frozen ``nn.Linear`` stored in NF4: ``y = x @ dequantize(W)^T + b``, dequantized on the fly.

    Built from a trained ``linear`` (``Linear4bit(linear)``); keeps the packed codes and statistics as
    buffers (they follow ``.to(device)`` and ``state_dict``) and the bias as a frozen parameter. It *is* an
    ``nn.Linear`` (as bitsandbytes' ``Linear4bit`` is), so ``lora.LoRALinear`` / ``add_lora`` wrap it;
    ``weight`` is a property returning a fresh dequantized ``(out, in)`` tensor in the original dtype:
    writing into it changes nothing stored, so do not ``merge`` a LoRA into a 4-bit base (merge into a
    dequantized copy instead). Nothing here receives a gradient; the input's gradient flows as in a Linear.
    Shapes: input ``(*, in)``, output ``(*, out)``.
    """

    def __init__(self, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                 stats_blocksize: int = 256):
        if not isinstance(linear, nn.Linear) or isinstance(linear, Linear4bit):
            kind = "already a Linear4bit" if isinstance(linear, Linear4bit) else f"a {type(linear).__name__}"
            raise TypeError(f"linear must be a plain nn.Linear to quantize, got {kind}")
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q = quantize_nf4(linear.weight, blocksize, double_quant, stats_blocksize)
        self.blocksize, self.stats_blocksize, self.double_quant = blocksize, stats_blocksize, double_quant
        self.weight_dtype = linear.weight.dtype
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("absmax_scale", q.absmax_scale)
        self.register_buffer("absmax_offset", q.offset)
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.register_parameter("bias", bias)

    def quantized(self) -> NF4Weight:
        """The stored weight as an ``NF4Weight`` (views of the buffers, no copy)."""
        return NF4Weight(self.packed, self.absmax, self.absmax_scale, self.absmax_offset,
                         (self.out_features, self.in_features), self.weight_dtype, self.blocksize,
                         self.stats_blocksize)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``(out, in)``, a fresh tensor each call (no grad)."""
        return dequantize_nf4(self.quantized())

    @property
    def nbytes(self) -> int:
        """Bytes of the 4-bit weight (codes and statistics), without the bias."""
        return self.quantized().nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x must have shape (*, {self.in_features}), got {tuple(x.shape)}")
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, double_quant={self.double_quant}")


def linear4bit_layers(model: nn.Module) -> dict[str, Linear4bit]:
    """``{qualified name: Linear4bit}`` for every 4-bit layer of ``model`` (inside LoRA wrappers too)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}


def quantize_model_4bit(model: nn.Module, target_modules: str | Iterable[str], blocksize: int = 64,
                        double_quant: bool = True) -> list[str]:
    """Replace every ``nn.Linear`` named like a target by a frozen ``Linear4bit`` (in place); returns the names.

    Names match as in ``lora.add_lora`` (the qualified name *ends with* the entry). Quantize first, then
    ``add_lora`` on the same targets: that is QLoRA. Checked before the model is touched: an empty target
    list, an entry that matches nothing, a match that is not a plain ``nn.Linear`` (a ``LoRALinear``: quantize
    before adding LoRA; a ``Linear4bit``: already quantized).
    """
    from .lora import LoRALinear, _as_names, _ends_with

    _check_blocksize(blocksize)
    targets = _as_names(target_modules, "target_modules")
    if not targets:
        raise ValueError("target_modules is empty: name the Linear layers to quantize, e.g. ['q_proj', 'v_proj']")
    modules = dict(model.named_modules())
    names: list[str] = []
    for target in targets:
        hits = [n for n in modules if n and _ends_with(n, target)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)})
            raise ValueError(f"target_modules entry {target!r} matches no module; Linear layers here are "
                             f"named {short[:12]}")
        for name in hits:
            m = modules[name]
            if isinstance(m, Linear4bit):
                raise TypeError(f"{name!r} is already a Linear4bit: quantize a model once")
            if isinstance(m, LoRALinear):
                raise TypeError(f"{name!r} is a LoRALinear: call quantize_model_4bit before add_lora")
            if not isinstance(m, nn.Linear):
                raise TypeError(f"target_modules entry {target!r} matches {name!r}, a {type(m).__name__}: "
                                "only nn.Linear layers are quantized")
        names += [n for n in hits if n not in names]
    order = {n: i for i, n in enumerate(modules)}
    names.sort(key=order.__getitem__)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child,
                Linear4bit(modules[name], blocksize=blocksize, double_quant=double_quant))
    return names
