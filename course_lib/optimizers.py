"""Optimizers by name: one table that ``fit`` builds from and ``course_lib.memory`` predicts the state of.

=================  ===========================================================  ==========================
name               built as                                                     state per parameter tensor
=================  ===========================================================  ==========================
``sgd``            ``torch.optim.SGD(lr, weight_decay)``, no momentum           nothing
``sgd_momentum``   ``torch.optim.SGD(lr, momentum=0.9, weight_decay)``          ``momentum_buffer``
``adam``           ``torch.optim.Adam``: weight decay as L2 in the gradient     two moments and ``step``
``adamw``          ``torch.optim.AdamW``: decoupled weight decay                two moments and ``step``
``adamw8bit``      ``course_lib.optim8bit.AdamW8bit``                           two moments as uint8 codes
``adafactor``      ``torch.optim.Adafactor``                                    a row and a column per matrix
=================  ===========================================================  ==========================

``optimizer_state_bytes`` measures what an optimizer's state holds; ``course_lib.memory.tensor_state_bytes``
predicts it from shapes, name by name of this table.
"""
from __future__ import annotations

import torch

__all__ = ["OPTIMIZERS", "SGD_MOMENTUM", "check_name", "make_optimizer", "optimizer_state_bytes"]

SGD_MOMENTUM = 0.9
"""The momentum of ``"sgd_momentum"``."""


def _adamw8bit(params, lr, weight_decay):
    from .optim8bit import AdamW8bit

    return AdamW8bit(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS = {
    "sgd": lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr, weight_decay=weight_decay),
    "sgd_momentum": lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM,
                                                                     weight_decay=weight_decay),
    "adam": lambda params, lr, weight_decay: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
    "adamw": lambda params, lr, weight_decay: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
    "adamw8bit": _adamw8bit,
    "adafactor": lambda params, lr, weight_decay: torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay),
}
"""``{name: build(params, lr, weight_decay) -> torch.optim.Optimizer}``, in the order of the module table."""


def check_name(name, arg: str = "optimizer", *, hint: str = "") -> str:
    """``name`` if it is a key of ``OPTIMIZERS``, else a ValueError naming ``arg`` and listing them."""
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(f"{arg} must be one of {tuple(OPTIMIZERS)}{hint}, got {name!r}")
    return name


def make_optimizer(params, name: str = "adamw", *, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` of ``OPTIMIZERS`` over ``params`` with ``lr`` and ``weight_decay``."""
    check_name(name, hint=" or a torch.optim.Optimizer")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return OPTIMIZERS[name](params, lr, weight_decay)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer's state holds now (moments, codes, ``step``...; 0 before a step).

    Every tensor in ``optimizer.state`` counts, Python numbers in it do not.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t))
