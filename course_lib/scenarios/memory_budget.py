"""The memory scenario of notebook 07 (memory and precision).

Two stories, both shown in the notebook with these constants:

* **Training runs** (``RUNS``): the MLP of notebook 00 on digits, 1,024 training images so that every batch of 64
  and every micro-batch of 16 is full. One change each from plain AdamW: 8-bit AdamW state, torch's Adafactor
  (at its own default LR), gradient accumulation (4 micro-batches of 16), bf16 autocast,
  activation checkpointing. The memory levers should cost (almost) nothing in accuracy; ``run(seed, fast)``
  returns that evidence.
* **The budget decision** (``BUDGET``, ``LEVERS``, ``LEVER_SETUPS``): a TinyTransformer whose weights, gradients
  and AdamW state (16 bytes per parameter) alone exceed the budget, so the activation levers (checkpointing,
  a smaller micro-batch) cannot make it fit however well they work; the smallest lever that fits is the 8-bit
  optimizer state. Activation bytes are measured on the CPU (they depend on shapes only, not on the seed), so
  the answer is the same on every machine.

Also the references of the notebook's two exercises: ``quantize_block`` / ``dequantize_block`` (absmax
quantization of one block with a code map) and ``accumulate_step`` (one optimizer step from micro-batches).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import digits_split, make_loaders
from ..lora import add_lora
from ..memory import choose_levers, measure_activation_bytes, predict_memory
from ..models import MLP, PROJECTIONS, TinyTransformer
from ..optim8bit import dequantize_blockwise, quantize_blockwise
from ..runtime import seed_everything
from ..train import fit
from . import by_mode

__all__ = ["MODEL", "N_TRAIN", "BATCH_SIZE", "BASE", "RUNS", "ADAFACTOR_LR", "epochs", "split_for", "train_arm",
           "MEMORY_MODEL", "MEMORY_BATCH", "ACTIVATION_BATCH", "LLM", "LORA_TARGETS", "LLM_LORA",
           "BUDGET_MODEL", "BUDGET_BATCH", "BUDGET_MICRO_BATCH", "BUDGET_LORA", "BUDGET", "LEVERS", "LEVER_SETUPS",
           "budget_model", "predict_lever", "lever_candidates", "quantize_block", "dequantize_block",
           "accumulate_step", "run"]

# --- training runs --------------------------------------------------------------------------------
MODEL = {"in_features": 64, "hidden": (256, 256), "n_classes": 10}
"""``MLP(**MODEL)``: its two big weights (64x256, 256x256) get 8-bit state; biases and the head stay fp32."""
N_TRAIN = 1024
"""Training images kept (of 1,078): 16 full batches of 64, 64 full micro-batches of 16."""
BATCH_SIZE = 64
BASE = {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.01, "batch_size": BATCH_SIZE}
"""What every run shares; each arm of ``RUNS`` changes one thing."""
ADAFACTOR_LR = 1e-2
"""torch.optim.Adafactor's default lr; its step is relative to each weight's RMS, so not comparable to AdamW's."""
RUNS = {
    "adamw": {},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "adafactor": {"optimizer": "adafactor", "lr": ADAFACTOR_LR},  # BASE's weight decay, decoupled as in AdamW
    "accum_4x16": {"batch_size": 16, "grad_accum_steps": 4},
    "autocast": {"precision": "bf16"},  # the notebook picks bf16 or fp16 for its device
    "checkpointing": {"activation_checkpointing": True},
}


def epochs(fast: bool) -> int:
    """Epochs per run: 10 in fast mode (160 optimizer steps), 30 otherwise."""
    return by_mode(fast, fast=10, full=30)


def split_for(seed: int):
    """The notebook's split: digits, seed ``seed``, ``N_TRAIN`` training images (val/test unchanged)."""
    return digits_split(seed, n_train=N_TRAIN)


def train_arm(arm: str, split, *, seed: int, fast: bool, device="cpu", name: str | None = None,
              progress: bool | None = False, **override):
    """Train ``MLP(**MODEL)`` with ``BASE | RUNS[arm] | override``; returns ``(history, model)``.

    Same initial weights (``seed_everything(seed)`` first) and same batch order for every arm; ``fit`` builds
    the optimizer by name (``course_lib.optimizers.OPTIMIZERS``, Adafactor included). ``name`` labels the
    history (default: ``arm``); ``progress`` is passed to ``fit`` (the notebook shows bars, the tests do not).
    """
    if arm not in RUNS:
        raise ValueError(f"arm must be one of {tuple(RUNS)}, got {arm!r}")
    cfg = {**BASE, **RUNS[arm], **override}
    seed_everything(seed)
    model = MLP(**MODEL)
    train_loader, val_loader, _ = make_loaders(split, cfg.pop("batch_size"), seed=seed)
    history = fit(model, train_loader, val_loader, epochs=epochs(fast), device=device, name=name or arm,
                  split_hash=split.split_hash, progress=progress, **cfg)
    return history, model


# --- memory measurements --------------------------------------------------------------------------
MEMORY_MODEL = {"d_model": 64, "n_heads": 4, "n_layers": 2}
"""The TinyTransformer measured against predictions (about 100k parameters)."""
MEMORY_BATCH = 64
ACTIVATION_BATCH = 256
"""Batch for the autocast / checkpointing activation table: large enough that activations, not autocast's
low-precision weight copies, dominate the saved tensors."""
LLM = {"d_model": 4096, "n_heads": 32, "n_layers": 32}
"""A 6.4-billion-parameter TinyTransformer, built on the meta device only (no memory)."""
LORA_TARGETS = PROJECTIONS
LLM_LORA = {"target_modules": LORA_TARGETS, "r": 16, "alpha": 32, "train_modules": ("head",)}

# --- the budget decision --------------------------------------------------------------------------
BUDGET_MODEL = {"d_model": 256, "n_heads": 4, "n_layers": 4}
"""About 3.2M parameters: 12 MiB of fp32 weights, 48 MiB for weights + grads + AdamW state."""
BUDGET_BATCH = 8
BUDGET_MICRO_BATCH = 2
"""Gradient accumulation: 4 micro-batches of 2 make the same step as one batch of 8."""
BUDGET_LORA = {"target_modules": LORA_TARGETS, "r": 8, "alpha": 16, "train_modules": ("head",)}
BUDGET = 44 * 2**20
"""44 MiB: the memory one training step may use."""
LEVERS = ("none", "activation checkpointing", "grad accumulation", "8-bit optimizer state", "LoRA", "LoRA + 8-bit")
"""The levers from the smallest change to the largest: the answer is the first one that fits."""
LEVER_SETUPS = {
    "none": {"optimizer": "adamw", "lora": False, "checkpointing": False, "batch": BUDGET_BATCH},
    "activation checkpointing": {"optimizer": "adamw", "lora": False, "checkpointing": True, "batch": BUDGET_BATCH},
    "grad accumulation": {"optimizer": "adamw", "lora": False, "checkpointing": False, "batch": BUDGET_MICRO_BATCH},
    "8-bit optimizer state": {"optimizer": "adamw8bit", "lora": False, "checkpointing": False, "batch": BUDGET_BATCH},
    "LoRA": {"optimizer": "adamw", "lora": True, "checkpointing": False, "batch": BUDGET_BATCH},
    "LoRA + 8-bit": {"optimizer": "adamw8bit", "lora": True, "checkpointing": False, "batch": BUDGET_BATCH},
}
"""One change each from ``"none"`` (``"LoRA + 8-bit"`` combines two); ``batch`` is the (micro-)batch whose
activations one forward holds."""


def _check_lever(lever) -> dict:
    if lever not in LEVER_SETUPS:
        raise ValueError(f"lever must be one of {LEVERS}, got {lever!r}")
    return LEVER_SETUPS[lever]


def budget_model(lever: str, seed: int = 0) -> nn.Module:
    """``TinyTransformer(**BUDGET_MODEL)`` on the CPU, in train mode, prepared for ``lever`` (LoRA, checkpointing)."""
    setup = _check_lever(lever)
    torch.manual_seed(seed)
    model = TinyTransformer(**BUDGET_MODEL)
    if setup["lora"]:
        add_lora(model, **BUDGET_LORA)
    return model.set_activation_checkpointing(setup["checkpointing"]).train()


def predict_lever(lever: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Predicted bytes of one step of ``lever``: ``predict_memory`` plus the activations of its (micro-)batch.

    ``x``/``y`` hold at least ``BUDGET_BATCH`` examples; the first ``LEVER_SETUPS[lever]["batch"]`` are used.
    """
    setup = _check_lever(lever)
    b = setup["batch"]
    if len(x) < b or len(y) < b:
        raise ValueError(f"x and y must hold at least {b} examples for {lever!r}, got {len(x)} and {len(y)}")
    activations = measure_activation_bytes(model, x[:b], F.cross_entropy, y[:b])
    return predict_memory(model, setup["optimizer"], activation_bytes=activations)


def lever_candidates(seed: int = 0) -> dict:
    """``{lever: predict_lever(...)}`` in ``LEVERS`` order, on the training images of ``split_for(seed)``."""
    split = split_for(seed)
    x, y = split.X_train[:BUDGET_BATCH], split.y_train[:BUDGET_BATCH]
    return {lever: predict_lever(lever, budget_model(lever, seed), x, y) for lever in LEVERS}


# --- exercise references --------------------------------------------------------------------------
def quantize_block(block: torch.Tensor, code_map: torch.Tensor):
    """Absmax quantization of ONE block: ``(codes uint8 (n,), absmax 0-dim float32)``.

    ``absmax = max |block|``; ``codes[i]`` is the index of the ``code_map`` entry nearest to
    ``block[i] / absmax`` (an all-zero block: absmax 0, every code the index of the entry nearest 0).
    """
    if not torch.is_tensor(block) or block.ndim != 1 or block.numel() == 0:
        raise ValueError(f"block must be a non-empty 1-D tensor, got {getattr(block, 'shape', block)!r}")
    codes, absmax = quantize_blockwise(block, code_map, block_size=block.numel())
    return codes, absmax[0]


def dequantize_block(codes: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """``code_map[codes] * absmax``: float32 ``(n,)``, the inverse of ``quantize_block`` up to rounding."""
    absmax = torch.as_tensor(absmax, dtype=torch.float32).reshape(1)
    return dequantize_blockwise(codes, absmax, code_map, (codes.numel(),), block_size=max(codes.numel(), 1))


def accumulate_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches, loss_fn=F.cross_entropy):
    """One optimizer step from ``micro_batches`` (a list of ``(x, y)``); returns the mean loss (float).

    Each micro-batch loss is divided by the number of micro-batches ``k`` before ``backward``, so the summed
    gradient is the mean of the micro-batch gradients: with equal micro-batch sizes and a mean-reduced loss,
    exactly the gradient of the concatenated batch. Then one ``optimizer.step()`` and ``zero_grad()``.
    """
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError("micro_batches is empty: pass a list of (x, y) pairs")
    k = len(micro_batches)
    total = 0.0
    for x, y in micro_batches:
        loss = loss_fn(model(x), y) / k
        loss.backward()
        total += loss.item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


# --- evidence for the tests ---------------------------------------------------------------------
def run(seed: int = 0, fast: bool = True, arms=("adamw", "adamw8bit", "accum_4x16", "autocast")) -> dict:
    """Evidence for one seed: per arm the final/best val accuracy and state bytes, the accumulation gap, the lever.

    Returns ``{"runs": {arm: {...}}, "accum_max_val_loss_diff": float | None, "lever": str,
    "candidates": {lever: predict_memory dict}}``.
    """
    split = split_for(seed)
    runs, histories = {}, {}
    for arm in arms:
        history, _ = train_arm(arm, split, seed=seed, fast=fast)
        histories[arm] = history
        runs[arm] = {"final_val_acc": history[-1]["val_acc"], "kept_val_acc": history.kept("val_acc"),
                     "best_val_loss": history.best_value, "state_bytes": history.optimizer_state_bytes}
    diff = None
    if "adamw" in histories and "accum_4x16" in histories:
        diff = max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(histories["adamw"], histories["accum_4x16"]))
    candidates = lever_candidates(seed)
    return {"runs": runs, "accum_max_val_loss_diff": diff, "lever": choose_levers(BUDGET, candidates),
            "candidates": candidates}
