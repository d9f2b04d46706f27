"""8-bit AdamW with block-wise dynamic quantization of both moments, in native torch.

After Dettmers et al. 2021, "8-bit Optimizers via Block-wise Quantization" (bitsandbytes' AdamW8bit).
Adam keeps two fp32 moments per parameter: 8 bytes per element. Here each moment is stored as

* ``codes`` (uint8, one per element): the index of the nearest entry of a 256-entry code map, and
* ``absmax`` (float32, one per block of ``block_size`` elements): the block's largest ``|value|``,

so a moment costs ``1 + 4 / block_size`` bytes per element (about 0.26x of fp32 Adam for both).

    quantize:    q_i = argmin_j |x_i / absmax_b - map_j|       for element i of block b
    dequantize:  x_i ~= map[q_i] * absmax_b

The map is "dynamic" (non-linear): a sign bit, an exponent written as a run of zero bits (one decade
per bit, 1e-6 .. 1) and the remaining bits as a linear fraction in [0.1, 1]. Small values keep their
relative precision, which matters for the second moment whose entries span many decades.

One step for an 8-bit tensor (t = step count, g = gradient, lr = learning rate, wd = weight decay):

    m, v = dequantize(m), dequantize(v)
    m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g^2
    p = p * (1 - lr * wd) - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)
    m, v = quantize(m), quantize(v)          (new absmax per block)

One departure from plain nearest rounding, for v only: a v that would round to the code of 0 (below
1.6e-7 * absmax) takes the smallest positive code (3.25e-7 * absmax) instead. Rounded to 0, the
denominator would be eps and the step m / eps would explode; rounded up, the step only shrinks.
(bitsandbytes' CPU kernel has a coarser floor of the same kind: nothing below about 1.5e-5 * absmax.)
"""
from __future__ import annotations

import copy
import math
import os
from typing import NamedTuple

import torch

from .optimizers import optimizer_state_bytes

__all__ = ["AdamW8bit", "dynamic_map", "quantize_blockwise", "dequantize_blockwise"]


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 sorted float32 values of the dynamic code map (the same values as bitsandbytes' map).

    Decade ``e`` in 0..6 covers magnitudes ``10**(e - 6) * [0.1, 1]``, split into ``2**e`` equal
    intervals (``2**(e + 1)`` when unsigned: no sign bit, one more fraction bit); each interval gives
    its midpoint (and its negative when ``signed``). Add 0 and 1: 2 * 127 + 2 = 256 values (signed,
    from -0.993 to 1) or 254 + 2 = 256 (unsigned, from 0 to 1).
    """
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__} ({signed!r})")
    values = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, (2**e if signed else 2 ** (e + 1)) + 1)
        mids = (edges[:-1] + edges[1:]) / 2.0 * (10.0 ** (e - 6))
        values += [mids, -mids] if signed else [mids]
    return torch.sort(torch.cat(values)).values


def _check_map(code_map: torch.Tensor) -> None:
    if not isinstance(code_map, torch.Tensor) or code_map.shape != (256,):
        got = tuple(code_map.shape) if isinstance(code_map, torch.Tensor) else type(code_map).__name__
        raise ValueError(f"code_map must be a sorted tensor of 256 values (dynamic_map()), got {got}")


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__} ({block_size!r})")
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0 (e.g. 256), got {block_size}")


def _blocks(flat: torch.Tensor, block_size: int, fill=0) -> torch.Tensor:
    """(n,) -> (ceil(n / block_size), block_size); the short last block is padded with ``fill`` (a copy
    is made only then). Zero padding changes no block's absmax."""
    pad = -flat.numel() % block_size
    return (torch.nn.functional.pad(flat, (0, pad), value=fill) if pad else flat).view(-1, block_size)


def quantize_blockwise(x: torch.Tensor, code_map: torch.Tensor, block_size: int = 256):
    """Block-wise absmax quantization: returns ``(codes, absmax)``.

    ``x`` (any shape, n elements) is flattened and cut into blocks of ``block_size`` (the last may be
    shorter). ``absmax`` (float32, ``(ceil(n / block_size),)``) holds max |x| per block; ``codes``
    (uint8, ``(n,)``) the index of the map entry nearest to ``x / absmax`` (torch.bucketize on the
    midpoints between neighbouring map entries). An all-zero block has absmax 0 and the code of 0.
    """
    _check_map(code_map)
    _check_block_size(block_size)
    flat = x.detach().reshape(-1).float()
    blocks = _blocks(flat, block_size)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    code_map = code_map.to(flat.device, torch.float32)
    codes = torch.bucketize(normed.view(-1)[: flat.numel()], (code_map[1:] + code_map[:-1]) / 2)
    return codes.to(torch.uint8), absmax


def dequantize_blockwise(codes, absmax, code_map, shape, block_size: int = 256) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``map[codes] * absmax`` per block, reshaped to ``shape``."""
    _check_map(code_map)
    _check_block_size(block_size)
    n = math.prod(shape)
    if codes.numel() != n or absmax.numel() != -(-n // block_size):
        raise ValueError(f"shape {tuple(shape)} with block_size {block_size} needs {n} codes and "
                         f"{-(-n // block_size)} absmax values, got {codes.numel()} and {absmax.numel()}")
    values = code_map.to(absmax.device, torch.float32)[codes.reshape(-1).long()]
    return (_blocks(values, block_size) * absmax.float()[:, None]).view(-1)[:n].view(shape)


# --- fast exact nearest code ------------------------------------------------------------------------
# bucketize is a branchy binary search (8 levels for 256 codes). Instead: the top 16 bits of a float32
# (sign, exponent, 7 mantissa bits) cut [-1, 1] into narrow "buckets" of consecutive floats. A bucket is
# narrower than the gap between two midpoints of either map, so it holds at most one midpoint: the
# nearest code is the code of the bucket's lowest value, plus 1 when x lies above that code's midpoint.
class _Tables(NamedTuple):
    code_map: torch.Tensor  # (256,) float32
    bucket_code: torch.Tensor  # (65536,) uint8: nearest code of each bucket's lowest value
    bucket_threshold: torch.Tensor  # (65536,) float32: midpoint above that code (inf for code 255)
    zero_code: int  # the code of 0.0
    signed: bool


_TABLES: dict = {}  # (signed, device) -> _Tables, shared by every parameter (never stored in the state)


def _tables(signed: bool, device: torch.device) -> _Tables:
    key = (signed, torch.device(device))
    if key not in _TABLES:
        code_map = dynamic_map(signed)
        mids = (code_map[1:] + code_map[:-1]) / 2
        top = torch.arange(65536, dtype=torch.int64) << 16
        negative = top >= 2**31  # for a negative float the lowest value has all 16 low bits set
        lowest = ((top | torch.where(negative, 0xFFFF, 0)) - torch.where(negative, 2**32, 0)).int()
        code = torch.bucketize(lowest.view(torch.float32).nan_to_num(0.0).clamp(-1.0, 1.0), mids)
        if not signed:  # a second moment never rounds down to the code of 0 (module docstring)
            code = code.clamp_min(1)
        threshold = torch.cat([mids, torch.tensor([math.inf])])[code]
        zero = int(torch.nonzero(code_map == 0)[0])
        _TABLES[key] = _Tables(code_map.to(device), code.to(torch.uint8).to(device), threshold.to(device), zero, signed)
    return _TABLES[key]


def _dequantize_blocks(codes: torch.Tensor, absmax: torch.Tensor, tables: _Tables, block_size: int) -> torch.Tensor:
    """(nblocks, block_size) fp32 values of flat uint8 ``codes``; the padding gets the value 0."""
    index = _blocks(codes.int(), block_size, fill=tables.zero_code).view(-1)
    return tables.code_map.index_select(0, index).view(-1, block_size).mul_(absmax[:, None])


def _requantize_(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, tables: _Tables) -> None:
    """Quantize ``x`` (nblocks, block_size), overwritten, into flat ``codes`` (n,) and ``absmax`` (nblocks,)."""
    amax = (x.abs() if tables.signed else x).amax(dim=1)  # v >= 0 needs no abs pass
    absmax.copy_(amax)
    x = x.div_(amax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).view(-1)[: codes.numel()]
    bucket = torch.bitwise_right_shift(x.view(torch.int32), 16).bitwise_and_(0xFFFF)
    above = x > tables.bucket_threshold.index_select(0, bucket)
    codes.copy_(tables.bucket_code.index_select(0, bucket).add_(above))


def _adamw8bit_update_(p, g, m_codes, m_absmax, v_codes, v_absmax, m_tables, v_tables, hp, block_size):
    """One AdamW step on flat fp32 ``p`` (n,) (in place) and its 8-bit moments (in place).

    ``hp`` = (lr, beta1, beta2, eps, weight_decay, bias_correction1, sqrt(bias_correction2)), Python
    floats (eager) or a float32 tensor on p's device (compiled: changing values then need no recompile).
    """
    lr, beta1, beta2, eps, weight_decay, bc1, bc2_sqrt = hp
    n = p.numel()
    g = _blocks(g, block_size)  # (nblocks, block_size), like m and v
    m = _dequantize_blocks(m_codes, m_absmax, m_tables, block_size)
    v = _dequantize_blocks(v_codes, v_absmax, v_tables, block_size)
    m.lerp_(g, 1 - beta1)  # m + (1 - beta1) (g - m) = beta1 m + (1 - beta1) g
    v.lerp_(g.square(), 1 - beta2)
    denom = v.sqrt().div_(bc2_sqrt).add_(eps).div_(lr / bc1)  # the step size lr / bc1 folded into denom
    p.mul_(1 - lr * weight_decay).addcdiv_(m.view(-1)[:n], denom.view(-1)[:n], value=-1.0)
    _requantize_(m, m_codes, m_absmax, m_tables)
    _requantize_(v, v_codes, v_absmax, v_tables)


_COMPILED = {"fn": None, "failed": False}
_STATE_8BIT = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
CHUNK = {"cpu": 1 << 18}  # elements per update call by device type (others: 1 << 24): bounds the fp32 temporaries


def _compiled_update():
    if _COMPILED["fn"] is None:
        _COMPILED["fn"] = torch.compile(_adamw8bit_update_)
    return _COMPILED["fn"]


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with both moments stored in 8 bits, block-wise.

    Tensors with at least ``min_8bit_size`` elements keep ``exp_avg_codes`` / ``exp_avg_absmax`` and
    ``exp_avg_sq_codes`` / ``exp_avg_sq_absmax`` (uint8 ``(n,)``, float32 ``(ceil(n / block_size),)``);
    smaller ones keep fp32 ``exp_avg`` / ``exp_avg_sq`` and follow torch.optim.AdamW exactly.

    ``compile``: None (auto) uses a ``torch.compile``d fused update on CUDA, or anywhere when the
    environment variable ``COURSE_COMPILE=1``; True asks for it; False never. When compilation fails
    the eager update runs instead, silently; ``self.compiled`` says whether the last 8-bit update ran
    compiled.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 block_size=256, min_8bit_size=4096, *, compile=None):
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0.0:
            raise ValueError(f"lr must be a number >= 0 (e.g. 1e-3), got {lr!r}")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2) such as (0.9, 0.999), got {betas!r}")
        for i, beta in enumerate(betas):
            if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1) (e.g. 0.9, 0.999), got {beta!r}")
        if not isinstance(eps, (int, float)) or not eps >= 0.0:
            raise ValueError(f"eps must be >= 0 (e.g. 1e-8), got {eps!r}")
        if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0 (0 turns it off), got {weight_decay!r}")
        _check_block_size(block_size)
        if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0 (0 quantizes every tensor), got {min_8bit_size!r}")
        if compile not in (None, True, False):
            raise ValueError(f"compile must be None (auto), True or False, got {compile!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        block_size=block_size, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)
        self.compile = compile
        self.compiled = False

    def _wants_compile(self, device: torch.device) -> bool:
        if _COMPILED["failed"] or self.compile is False:
            return False
        return self.compile is True or device.type == "cuda" or os.environ.get("COURSE_COMPILE", "") == "1"

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state: every tensor in ``self.state`` (codes, absmax, fp32 moments)."""
        return optimizer_state_bytes(self)

    def load_state_dict(self, state_dict) -> None:
        """Like torch's, but every state tensor keeps its dtype (the base class would cast uint8 codes
        and fp32 absmax to the parameter's dtype) and is copied onto its parameter's device."""
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(saved_ids, params):
            if i in state_dict["state"]:
                self.state[p] = {k: v.to(p.device, copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                                 for k, v in state_dict["state"][i].items()}

    def _init_state(self, p, state, group):
        n = _real(p).numel()
        state["step"] = 0
        if n < group["min_8bit_size"]:
            state["exp_avg"] = torch.zeros(_real(p).shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            return
        blocks = -(-n // group["block_size"])
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            zero_code = _tables(signed, p.device).zero_code
            state[f"{name}_codes"] = torch.full((n,), zero_code, dtype=torch.uint8, device=p.device)
            state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient; returns ``closure()``'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            small = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"AdamW8bit does not support sparse gradients (group {gi}, parameter {pi}): "
                                    "use dense gradients or torch.optim.SparseAdam")
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group)
                state["step"] += 1
                if "exp_avg" in state:
                    small.append((p, state))
                else:
                    self._step_8bit(p, state, group)
            if small:
                self._step_fp32(small, group)
        return loss

    def _step_8bit(self, p, state, group):
        lr, (beta1, beta2), t, bs = float(group["lr"]), group["betas"], state["step"], group["block_size"]
        hp = (lr, beta1, beta2, group["eps"], group["weight_decay"], 1 - beta1**t, math.sqrt(1 - beta2**t))
        rp = _real(p)
        flat = rp.view(-1) if rp.is_contiguous() and rp.dtype == torch.float32 else rp.reshape(-1).float()
        g = _real(p.grad).reshape(-1).float()
        mc, ma, vc, va = (state[k] for k in _STATE_8BIT)
        tables = (_tables(True, p.device), _tables(False, p.device))
        compiled = self._wants_compile(p.device)
        hp_t = torch.tensor(hp, dtype=torch.float32, device=p.device) if compiled else None
        # in chunks of whole blocks: the fp32 temporaries stay small (and, on CPU, in cache)
        n, chunk = flat.numel(), max(1, CHUNK.get(p.device.type, 1 << 24) // bs) * bs
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            args = (flat[s:e], g[s:e], mc[s:e], ma[s // bs : -(-e // bs)], vc[s:e], va[s // bs : -(-e // bs)], *tables)
            if compiled:
                try:
                    _compiled_update()(*args, hp_t, bs)
                    continue
                except Exception:  # no working compiler here: this chunk and all later updates run eager
                    _COMPILED["failed"], compiled = True, False
            _adamw8bit_update_(*args, hp, bs)
        self.compiled = compiled
        if flat.data_ptr() != rp.data_ptr():
            rp.copy_(flat.view_as(rp))

    def _step_fp32(self, items, group):
        """torch.optim.AdamW's update, batched with torch._foreach_* ops, on fp32 moments."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        params = [_real(p) if _real(p).dtype == torch.float32 else _real(p).float() for p, _ in items]
        grads = [_real(p.grad).float() for p, _ in items]
        m = [s["exp_avg"] for _, s in items]
        v = [s["exp_avg_sq"] for _, s in items]
        steps = [s["step"] for _, s in items]
        torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - beta1**t) for t in steps])
        for (p, _), q in zip(items, params):
            if q.data_ptr() != _real(p).data_ptr():
                _real(p).copy_(q)
