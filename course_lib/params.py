"""Counting parameters: what is trainable and what is frozen."""
from __future__ import annotations

from torch import nn

__all__ = ["count_parameters"]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameter elements; shared parameters count once.

    Works on the meta device (only shapes are read), so LLM-sized models can be counted without memory.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for p in model.parameters():  # parameters() already skips duplicates of shared tensors
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
