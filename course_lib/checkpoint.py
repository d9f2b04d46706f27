"""The checkpoint rule (best epoch under one metric) and exact save / resume of a training run."""
from __future__ import annotations

import copy
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["BestCheckpoint", "save_training_state", "load_training_state", "rng_state", "set_rng_state"]


class BestCheckpoint:
    """Keeps the best epoch under one rule: ``metric`` (a key of the per-epoch metrics), ``mode`` and ``patience``.

    ``update(epoch, metrics, model)`` returns True when this epoch is strictly better than the best so far
    (ties keep the earlier epoch) and then stores a deep copy of ``model.state_dict()`` in ``best_state``.
    ``should_stop`` is True once ``patience`` epochs in a row brought no new best (never when patience is None).
    Two runs are comparable only if their ``rule`` is the same.
    """

    def __init__(self, metric: str = "val_loss", mode: str = "min", patience: int | None = None):
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must be a non-empty metric name such as 'val_loss', got {metric!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ValueError(f"patience must be None (never stop) or an int >= 1, got {patience!r}")
        self.metric, self.mode, self.patience = metric, mode, patience
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self.best_state: dict | None = None
        self.epochs_since_best = 0

    @property
    def rule(self) -> tuple:
        return (self.metric, self.mode, self.patience)

    def is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        return value < self.best_value if self.mode == "min" else value > self.best_value

    def update(self, epoch: int, metrics: dict, model: nn.Module | None = None) -> bool:
        if self.metric not in metrics:
            raise KeyError(f"metric {self.metric!r} not in the epoch's metrics {sorted(metrics)}: "
                           "pass BestCheckpoint(metric=...) with one of those names")
        value = float(metrics[self.metric])
        if self.is_better(value):
            self.best_epoch, self.best_value, self.epochs_since_best = epoch, value, 0
            if model is not None:
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            return True
        self.epochs_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.epochs_since_best >= self.patience

    def state_dict(self) -> dict:
        return {"rule": self.rule, "best_epoch": self.best_epoch, "best_value": self.best_value,
                "best_state": self.best_state, "epochs_since_best": self.epochs_since_best}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["rule"]) != self.rule:
            raise ValueError(f"checkpoint rule {tuple(state['rule'])} differs from this rule {self.rule}: "
                             "resume with the same BestCheckpoint(metric, mode, patience)")
        self.best_epoch, self.best_value = state["best_epoch"], state["best_value"]
        self.best_state = copy.deepcopy(state["best_state"])
        self.epochs_since_best = state["epochs_since_best"]

    def __repr__(self) -> str:
        return (f"BestCheckpoint(metric={self.metric!r}, mode={self.mode!r}, patience={self.patience}, "
                f"best_epoch={self.best_epoch}, best_value={self.best_value})")


def rng_state() -> dict:
    """Python, NumPy and torch (CPU, and CUDA when present) random states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path, **objects) -> Path:
    """Save ``state_dict()`` of every object (model, optimizer, scheduler, loader, checkpoint, ...) plus RNG states.

    Plain values (ints, lists, dicts) are stored as they are. Written to a temporary file then renamed,
    so an interrupted save never leaves a half-written checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"rng": rng_state()}
    for name, obj in objects.items():
        payload[name] = obj.state_dict() if hasattr(obj, "state_dict") else obj
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_training_state(path, *, restore_rng: bool = True, **objects) -> dict:
    """Load what ``save_training_state`` wrote into the given objects (``load_state_dict``); return the payload."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no training state at {path}: pass the path that fit(save_to=...) wrote")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    for name, obj in objects.items():
        if obj is None:
            continue
        if name not in payload:
            raise KeyError(f"{path} holds no {name!r} state (it has {sorted(payload)})")
        obj.load_state_dict(payload[name])
    if restore_rng:
        set_rng_state(payload["rng"])
    return payload
