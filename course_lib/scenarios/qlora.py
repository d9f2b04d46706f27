"""The QLoRA scenario of notebook 10: LoRA on a 4-bit (NF4) base vs LoRA on the fp32 base, same rule.

The transfer scenario's pretrained ``TinyTransformer`` (``transfer.pretrain``) is adapted to the target task
with ``transfer``'s ``adapter`` strategy (LoRA r=4, alpha 8 on all six projections, plus a fresh head) twice:
on the fp32 base, and on a copy whose six projections of every block are frozen ``Linear4bit`` layers
(NF4, blocks of 64, double quantization; ``qlora.quantize_model_4bit``). The head, the embeddings and the
norms stay fp32, as in QLoRA. Same seeds, split, epochs, schedule and checkpoint rule (``transfer.RULE``).

``tests/test_scenario_qlora.py`` proves what notebook 10 says over seeds, in fast and full mode.
"""
from __future__ import annotations

import copy

from torch import nn

from ..data import make_loaders
from ..models import PROJECTIONS
from ..qlora import dequantize_nf4, linear4bit_layers, quantize_model_4bit
from ..token_tasks import source_task, target_task
from ..train import evaluate
from . import transfer

__all__ = ["QLORA", "quantized_copy", "quantization_error", "compare", "run"]

QLORA: dict = {"targets": PROJECTIONS, "blocksize": 64, "double_quant": True}
"""What is quantized (the same projections LoRA adapts) and how."""


def quantized_copy(pretrained: nn.Module) -> nn.Module:
    """A deep copy of ``pretrained`` with ``QLORA["targets"]`` replaced by frozen NF4 ``Linear4bit`` layers."""
    model = copy.deepcopy(pretrained)
    quantize_model_4bit(model, QLORA["targets"], blocksize=QLORA["blocksize"], double_quant=QLORA["double_quant"])
    return model


def quantization_error(pretrained: nn.Module, quantized: nn.Module) -> float:
    """Largest relative weight error ``||W - deq(W)|| / ||W||`` (Frobenius) over the quantized layers."""
    fp32 = dict(pretrained.named_modules())
    worst = 0.0
    for name, layer in linear4bit_layers(quantized).items():
        w = fp32[name].weight.detach()
        worst = max(worst, float((w - dequantize_nf4(layer.quantized())).norm() / w.norm()))
    return worst


def _evidence(model: nn.Module, history, test_loader) -> dict:
    return {"best_value": history.best_value, "best_epoch": history.best_epoch,
            "test_acc": evaluate(model, test_loader)["acc"], "trainable_params": history.trainable_params}


def compare(pretrained: nn.Module, seed: int = 0, fast: bool = True) -> dict:
    """LoRA on the fp32 base and on its NF4 copy, for one pretrained model (``transfer.pretrain(seed, fast)``).

    Returns ``{"fp32": ev, "nf4": ev, "weight_error": float, "source_val_acc": {"fp32", "nf4"}}`` where ``ev``
    is ``{"best_value", "best_epoch", "test_acc", "trainable_params"}`` (``best_value``: kept validation
    accuracy under ``transfer.RULE``) and ``source_val_acc`` the source-task validation accuracy of the base
    before adaptation (what quantization alone costs the pretrained model).
    """
    target = target_task(seed)
    _, _, test = make_loaders(target, transfer.TRANSFER["batch_size"], seed=seed)
    _, source_val, _ = make_loaders(source_task(seed), transfer.TRANSFER["source_batch_size"], seed=seed)
    quantized = quantized_copy(pretrained)
    out = {"weight_error": quantization_error(pretrained, quantized),
           "source_val_acc": {"fp32": evaluate(pretrained, source_val)["acc"],
                              "nf4": evaluate(quantized, source_val)["acc"]}}
    for name, base in (("fp32", pretrained), ("nf4", quantized)):
        out[name] = _evidence(*transfer.adapt(base, "adapter", target, seed, fast), test)
    return out


def run(seed: int = 0, fast: bool = True) -> dict:
    """``compare`` after ``transfer.pretrain(seed, fast)``."""
    pretrained, _ = transfer.pretrain(seed, fast)
    return compare(pretrained, seed, fast)


# --- the memory decision ----------------------------------------------------------------------------
PRECISIONS = ("fp32", "bf16", "int8", "nf4")
"""Base precisions from most to least precise. ``int8``: blockwise 8-bit (blocks of 256, one fp32 absmax per
block, 8.125 bits); ``nf4``: NF4 with double quantization (4.127 bits). For ``int8`` and ``nf4`` only the
Linear layers named in ``QLORA["targets"]`` are quantized; everything else stays bf16, as in QLoRA."""

ADAPTER_BYTES_PER_PARAM = 16
"""A trained fp32 number: weight 4 + gradient 4 + AdamW's two moments 8."""


def base_bytes(model: nn.Module, precision: str) -> int:
    """Bytes of ``model``'s frozen weights stored at ``precision`` (works on the ``meta`` device: shapes only).

    ``fp32``: 4 bytes a parameter, ``bf16``: 2. ``int8``: each target Linear weight ``n + 4 ceil(n / 256)``
    bytes, ``nf4``: ``qlora.nf4_nbytes(n)``; the other parameters (biases, norms, embeddings, head) 2 bytes each.
    """
    from ..lora import _ends_with
    from ..qlora import nf4_nbytes

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    params = list(model.named_parameters())
    if precision in ("fp32", "bf16"):
        return sum(p.numel() for _, p in params) * (4 if precision == "fp32" else 2)
    total = 0
    for name, p in params:
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and any(_ends_with(module, t) for t in QLORA["targets"]):
            n = p.numel()
            total += n + 4 * -(-n // 256) if precision == "int8" else nf4_nbytes(n)
        else:
            total += 2 * p.numel()
    return total


def memory_rows(base: nn.Module, adapted: nn.Module) -> dict:
    """``{precision: {"base", "adapter", "total"}}`` in bytes: ``base_bytes`` of the frozen ``base`` plus
    ``ADAPTER_BYTES_PER_PARAM`` per trainable parameter of ``adapted`` (the same model with LoRA added).
    Activations are not counted (they depend on the batch; leave them a margin)."""
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    adapter = ADAPTER_BYTES_PER_PARAM * trainable
    return {prec: {"base": base_bytes(base, prec), "adapter": adapter,
                   "total": base_bytes(base, prec) + adapter} for prec in PRECISIONS}
