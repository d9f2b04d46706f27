"""Training memory: predict the bytes of weights, gradients and optimizer state, measure them, pick a lever.

What one training step holds, for ``P`` parameters of which ``P_t`` are trainable::

    weights      P   * bytes(weight dtype)          (4 in float32, 2 in bf16/fp16)
    grads        P_t * bytes(grad dtype)             (frozen parameters get no .grad)
    optimizer    P_t * state bytes per parameter     (SGD 0, SGD+momentum 4, Adam/AdamW 8, 8-bit AdamW ~2)
    activations  tensors saved for backward           (grow with batch size; checkpointing, autocast)

``predict_memory`` computes the first three exactly from shapes (it works on a meta-device model, so an
LLM-sized model costs no memory), ``measure_training_step`` measures all four after a real step, and
``memory_table`` puts them side by side. ``choose_levers`` answers "which lever fits a memory budget".
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .optimizers import check_name, optimizer_state_bytes

__all__ = [
    "STEP_BYTES", "optimizer_state_bytes_per_param", "tensor_state_bytes", "predict_memory", "optimizer_state_bytes",
    "measure_activation_bytes", "measure_training_step", "memory_table", "fits_budget", "choose_levers",
    "human_bytes",
]

STEP_BYTES = 4
"""torch's Adam, AdamW and Adafactor keep ``state["step"]`` as a float32 scalar tensor per parameter tensor."""
PARTS = ("weights", "grads", "optimizer", "activations", "total")


def _itemsize(dtype, arg: str) -> int:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{arg} must be a torch.dtype such as torch.float32, got {dtype!r}")
    return dtype.itemsize


def _check_8bit(block_size, min_8bit_size) -> None:
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")


def optimizer_state_bytes_per_param(name: str, dtype: torch.dtype = torch.float32, *,
                                    block_size: int = 256) -> float:
    """Bytes of optimizer state per trainable parameter element, the number to multiply ``P_t`` by.

    ``sgd`` 0; ``sgd_momentum`` one buffer (``bytes(dtype)``); ``adam``/``adamw`` two moments
    (``2 * bytes(dtype)``); ``adamw8bit`` two uint8 codes plus one float32 absmax per block for each moment,
    ``2 + 2 * 4 / block_size`` (large tensors; tensors below ``min_8bit_size`` keep float32 moments).
    The per-tensor ``step`` scalar (``STEP_BYTES``) is left out: it does not scale with ``P_t``.
    ``adafactor`` has no per-element figure: its factored second moment stores one number per row plus one
    per column of each matrix, so the bytes depend on shapes. Use ``tensor_state_bytes`` for it.
    """
    check_name(name)
    size = _itemsize(dtype, "dtype")
    _check_8bit(block_size, 0)
    if name == "adafactor":
        raise ValueError("optimizer 'adafactor' has no per-parameter figure (rows + columns per matrix, it "
                         "depends on shapes): use tensor_state_bytes('adafactor', shape) or predict_memory")
    return {"sgd": 0.0, "sgd_momentum": float(size), "adam": 2.0 * size, "adamw": 2.0 * size,
            "adamw8bit": 2.0 + 2 * 4 / block_size}[name]


def tensor_state_bytes(name: str, shape, dtype: torch.dtype = torch.float32, *, block_size: int = 256,
                       min_8bit_size: int = 4096) -> int:
    """Exact optimizer-state bytes for one trainable parameter of ``shape``, as held after a step.

    With ``n = prod(shape)`` and ``s = bytes(dtype)`` (the parameter's dtype for Adam, its gradient's for
    SGD momentum and Adafactor, which is the same dtype in torch):

    - ``sgd``: 0.  ``sgd_momentum``: ``n * s`` (``momentum_buffer``).
    - ``adam``/``adamw``: ``2 n s + 4`` (``exp_avg``, ``exp_avg_sq`` and the float32 ``step``).
    - ``adafactor`` (``torch.optim.Adafactor``): ``4`` for ``step`` plus, for ``ndim >= 2``, ``row_var`` of
      shape ``(..., rows, 1)`` and ``col_var`` of shape ``(..., 1, cols)``, i.e. ``(n / cols + n / rows) s``;
      a vector keeps a full ``variance`` of ``n s``. A ``(4096, 4096)`` matrix: 32 KiB instead of 128 MiB.
    - ``adamw8bit`` (``course_lib.optim8bit.AdamW8bit``): if ``n >= min_8bit_size``, two uint8 code tensors
      and two float32 absmax vectors of ``ceil(n / block_size)`` blocks, ``2 n + 8 ceil(n / block_size)``;
      otherwise float32 moments, ``8 n``. Its ``step`` is a Python int and its two 256-entry code maps
      are shared tables, so neither counts as state.
    """
    check_name(name)
    s = _itemsize(dtype, "dtype")
    _check_8bit(block_size, min_8bit_size)
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    n = math.prod(shape)
    if name == "sgd":
        return 0
    if name == "sgd_momentum":
        return n * s
    if name in ("adam", "adamw"):
        return 2 * n * s + STEP_BYTES
    if name == "adafactor":
        if len(shape) < 2:
            return n * s + STEP_BYTES
        rows = math.prod(shape[:-1])                    # row_var: shape[-1] -> 1
        cols = math.prod(shape[:-2]) * shape[-1]        # col_var: shape[-2] -> 1
        return (rows + cols) * s + STEP_BYTES
    if n >= min_8bit_size:                              # adamw8bit
        return 2 * n + 2 * 4 * math.ceil(n / block_size)
    return 8 * n


def predict_memory(model: nn.Module, optimizer: str = "adamw", *, weight_dtype: torch.dtype | None = None,
                   grad_dtype: torch.dtype | None = None, block_size: int = 256, min_8bit_size: int = 4096,
                   activation_bytes: int = 0) -> dict:
    """Predicted bytes ``{"weights", "grads", "optimizer", "activations", "total"}`` of one training step.

    Only shapes and ``requires_grad`` are read, so ``model`` may live on the meta device. ``weights`` counts
    every parameter (shared ones once) in ``weight_dtype`` (default: each parameter's own dtype);
    ``grads`` and ``optimizer`` count trainable parameters only, in ``grad_dtype`` (default: the weight
    dtype), with ``tensor_state_bytes`` per tensor, so the figure equals what ``optimizer.state`` holds
    after one step. ``activation_bytes`` (measured with ``measure_activation_bytes``, e.g. for a smaller
    micro-batch) is passed through so that ``total`` is the whole step.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_name(optimizer)
    _check_8bit(block_size, min_8bit_size)
    if weight_dtype is not None:
        _itemsize(weight_dtype, "weight_dtype")
    if grad_dtype is not None:
        _itemsize(grad_dtype, "grad_dtype")
    if not isinstance(activation_bytes, int) or activation_bytes < 0:
        raise ValueError(f"activation_bytes must be an int >= 0, got {activation_bytes!r}")
    out = dict.fromkeys(PARTS, 0)
    for p in model.parameters():
        w_dtype = p.dtype if weight_dtype is None else weight_dtype
        out["weights"] += p.numel() * w_dtype.itemsize
        if p.requires_grad:
            g_dtype = w_dtype if grad_dtype is None else grad_dtype
            out["grads"] += p.numel() * g_dtype.itemsize
            state_dtype = w_dtype if optimizer in ("adam", "adamw") else g_dtype  # zeros_like(p) vs grad
            out["optimizer"] += tensor_state_bytes(optimizer, p.shape, state_dtype, block_size=block_size,
                                                   min_8bit_size=min_8bit_size)
    out["activations"] = activation_bytes
    out["total"] = out["weights"] + out["grads"] + out["optimizer"] + out["activations"]
    return out


class _SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the storages autograd saves for backward, each once, leaving out the model's parameters."""

    def __init__(self, model: nn.Module):
        params = list(model.parameters())
        if any(p.is_meta for p in params):
            raise ValueError("measuring needs a model with real tensors, got one on the meta device: "
                             "use predict_memory for meta models")
        self._params = {(p.device, p.untyped_storage().data_ptr()) for p in params}
        self._storages: dict = {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key, nbytes = (t.device, storage.data_ptr()), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
            key, nbytes = ("id", id(t)), t.numel() * t.element_size()
        if key not in self._params:
            self._storages[key] = nbytes
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())


def _forward_loss(model, x, loss_fn, y, autocast_dtype):
    if autocast_dtype is None:
        out = model(x)
        return out if loss_fn is None else loss_fn(out, y)
    with torch.autocast(x.device.type, dtype=autocast_dtype):
        out = model(x)
        return out if loss_fn is None else loss_fn(out, y)


def measure_activation_bytes(model: nn.Module, x: torch.Tensor, loss_fn=None, y=None, *,
                             autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes of the tensors autograd saves for backward during one forward (and loss) pass.

    Every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` is counted by its storage, each
    storage once (views such as ``q.transpose`` share one). Parameters and views of them are left out:
    they are counted as ``weights``. Everything else is counted, including the input batch and the
    targets when an op saves them, and, under ``autocast_dtype``, the low-precision copies of the weights
    that autocast makes (they live until backward). With ``model.set_activation_checkpointing(True)`` in
    train mode only each block's input is saved, the rest is recomputed in backward. The model's
    train/eval mode is left as it is. Nothing is run backward; the graph is freed on return.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if loss_fn is not None and y is None:
        raise ValueError("y must be given with loss_fn (the targets of the loss), got None")
    counter = _SavedTensorBytes(model)
    with torch.enable_grad(), counter:
        _forward_loss(model, x, loss_fn, y, autocast_dtype)
    return counter.nbytes


def measure_training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y,
                          loss_fn=F.cross_entropy, *, autocast_dtype: torch.dtype | None = None) -> dict:
    """Run one real step (train mode, zero_grad, forward, backward, step) and measure its bytes.

    Returns ``{"weights", "grads", "optimizer", "activations", "total"}`` in the layout of
    ``predict_memory``: parameter bytes, bytes of the ``.grad`` tensors that exist after backward, the
    optimizer's state after the step, and the saved-for-backward bytes of ``measure_activation_bytes``.
    The gradients are left in place (the next ``zero_grad`` frees them).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    model.train()
    optimizer.zero_grad(set_to_none=True)
    counter = _SavedTensorBytes(model)
    with torch.enable_grad():
        with counter:
            loss = _forward_loss(model, x, loss_fn, y, autocast_dtype)
        loss.backward()
    optimizer.step()
    params = list(model.parameters())
    out = {"weights": sum(p.numel() * p.element_size() for p in params),
           "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
           "optimizer": optimizer_state_bytes(optimizer),
           "activations": counter.nbytes}
    out["total"] = sum(out.values())
    return out


def memory_table(predicted: Mapping, measured: Mapping) -> pd.DataFrame:
    """One row per part (weights, grads, optimizer, activations, total) present in either dict.

    Columns ``predicted``, ``measured`` (bytes), ``ratio`` = measured / predicted (1.0 when both are 0,
    NaN when one is missing), and ``predicted_h``/``measured_h`` in human units.
    """
    for arg, d in (("predicted", predicted), ("measured", measured)):
        if not isinstance(d, Mapping):
            raise TypeError(f"{arg} must be a dict of bytes (from predict_memory / measure_training_step), "
                            f"got {type(d).__name__}")
    keys = [k for k in PARTS if k in predicted or k in measured]
    keys += [k for k in (*predicted, *measured) if k not in keys]
    rows = []
    for k in dict.fromkeys(keys):
        p, m = predicted.get(k), measured.get(k)
        if p is None or m is None:
            ratio = math.nan
        else:
            ratio = 1.0 if p == m == 0 else (math.inf if p == 0 else m / p)
        rows.append({"part": k, "predicted": p, "measured": m, "ratio": ratio,
                     "predicted_h": None if p is None else human_bytes(p),
                     "measured_h": None if m is None else human_bytes(m)})
    return pd.DataFrame(rows).set_index("part")


def _total(value, arg: str) -> float:
    if isinstance(value, Mapping):
        if "total" not in value:
            raise ValueError(f"{arg} must have a 'total' entry (as predict_memory returns), got keys {list(value)}")
        value = value["total"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{arg} must be a number of bytes >= 0 or a dict with 'total', got {value!r}")
    return value


def fits_budget(prediction, budget) -> bool:
    """True when ``prediction`` (bytes, or a ``predict_memory`` dict: its ``total``) is <= ``budget`` bytes."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ValueError(f"budget must be a number of bytes > 0, got {budget!r}")
    return _total(prediction, "prediction") <= budget


def choose_levers(budget, candidates: Mapping) -> str | None:
    """The first configuration in ``candidates`` whose total fits ``budget`` bytes, or None if none fits.

    ``candidates`` maps a configuration name to its bytes (or a ``predict_memory`` dict) and is read in
    order: list it from the smallest change to the largest, e.g. ``"full AdamW"``, ``"+ checkpointing"``,
    ``"+ grad accumulation"``, ``"AdamW8bit"``, ``"LoRA"``, ``"LoRA + 8bit"``. The answer is then the
    cheapest lever (least change to the training) that fits, not merely the smallest footprint.
    """
    if not isinstance(candidates, Mapping) or not candidates:
        raise ValueError(f"candidates must be a non-empty dict {{name: bytes or predict_memory dict}}, "
                         f"got {candidates!r}")
    fits = {name: fits_budget(_total(value, f"candidates[{name!r}]"), budget) for name, value in candidates.items()}
    return next((name for name, ok in fits.items() if ok), None)


def human_bytes(n) -> str:
    """``1536 -> "1.50 KiB"``, ``3 * 2**20 -> "3.00 MiB"``, ``100 -> "100 B"`` (binary units)."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n):
        raise TypeError(f"n must be a finite number of bytes, got {n!r}")
    sign, n = ("-" if n < 0 else ""), abs(n)
    if n < 1024:
        return f"{sign}{n:g} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{sign}{n:.2f} {unit}"
