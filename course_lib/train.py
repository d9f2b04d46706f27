"""``fit``: one training loop that records the evidence every notebook reads.

Per optimizer step it logs the LR, the loss, the global gradient norm *before* clipping and whether the
step was clipped; per epoch it logs ``epoch lr train_loss train_acc val_loss val_acc grad_norm
grad_norm_max clip_frac seconds``. The checkpoint kept is the best under one rule (``BestCheckpoint``),
never "the last epoch" by default. A non-finite loss stops training loudly, naming the step, epoch and LR.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import BestCheckpoint, load_training_state, save_training_state
from .params import count_parameters
from .runtime import get_device

__all__ = ["History", "fit", "evaluate", "make_optimizer", "optimizer_state_bytes"]

OPTIMIZERS = ("adamw", "adam", "sgd", "adamw8bit", "adafactor")


class History(list):
    """One dict per epoch (``pd.DataFrame(history)`` works) plus the run's metadata.

    Attributes: ``name``, ``split_hash``, ``rule`` (metric, mode, patience), ``best_epoch``, ``best_value``,
    ``best_state`` (state_dict of the kept checkpoint), ``steps`` (one dict per optimizer step),
    ``trainable_params``, ``total_params``, ``optimizer_state_bytes``, ``seconds``, ``stopped_early``,
    ``stop_reason``.
    """

    def __init__(self, rows=(), **meta):
        super().__init__(rows)
        self.steps: list[dict] = []
        self.name = meta.get("name")
        self.split_hash = meta.get("split_hash")
        self.rule = meta.get("rule")
        self.best_epoch = self.best_value = self.best_state = None
        self.trainable_params = self.total_params = self.optimizer_state_bytes = None
        self.seconds = 0.0
        self.stopped_early = False
        self.stop_reason = ""

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self))

    def steps_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.steps)

    def to_csv(self, path, **kwargs) -> None:
        self.to_frame().to_csv(path, index=False, **kwargs)

    @property
    def final_epoch(self) -> int | None:
        return self[-1]["epoch"] if self else None

    def summary(self) -> dict:
        """One row for a comparison table (see ``course_lib.compare``)."""
        metric = self.rule[0] if self.rule else None
        return {"run": self.name, "best_epoch": self.best_epoch, "best_value": self.best_value,
                "final_epoch": self.final_epoch, "final_value": self[-1].get(metric) if self else None,
                "best_before_final": (self.best_epoch is not None and self.best_epoch < self.final_epoch),
                "trainable_params": self.trainable_params, "optimizer_state_bytes": self.optimizer_state_bytes,
                "seconds": round(self.seconds, 2), "split_hash": self.split_hash, "rule": self.rule}

    def __repr__(self) -> str:
        rule = f"{self.rule[0]} ({self.rule[1]})" if self.rule else "?"
        return (f"History({self.name!r}: {len(self)} epochs, best epoch {self.best_epoch} by {rule} = "
                f"{self.best_value if self.best_value is None else round(self.best_value, 4)}, "
                f"split {self.split_hash})")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, quantization codes, ...)."""
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


def make_optimizer(params, name: str = "adamw", *, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """Build an optimizer by name.

    ``"adamw"`` (decoupled decay), ``"adam"`` (decay as L2 in the gradient), ``"sgd"`` (with momentum) or
    ``"adamw8bit"`` (course_lib's blockwise 8-bit AdamW) or ``"adafactor"`` (factored second moment).
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        from .optim8bit import AdamW8bit
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a torch.optim.Optimizer, got {name!r}")


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn=F.cross_entropy, device=None, *, train_mode: bool = False) -> dict:
    """Mean loss and accuracy over ``loader`` in eval mode (the training flag is restored afterwards).

    ``train_mode=True`` reproduces the classic bug on purpose: dropout stays on, so every call draws new masks.
    """
    device = next(model.parameters()).device if device is None else torch.device(device)
    was_training = model.training
    model.train(train_mode)
    total_loss, correct, n = 0.0, 0, 0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            total_loss += loss_fn(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("loader yielded no batches: nothing to evaluate")
    return {"loss": total_loss / n, "acc": correct / n}


def _progress_enabled(progress) -> bool:
    if progress is None:
        return os.environ.get("COURSE_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")
    return bool(progress)


def _grad_norm(grads: list[torch.Tensor]) -> float:
    """Global L2 norm of ``grads``: ``sqrt(sum_i ||g_i||^2)``, as ``clip_grad_norm_`` computes it.

    One fused per-tensor norm when all gradients share a device and dtype (the usual case: about 30% cheaper
    than ``torch.nn.utils.get_total_norm``, which groups them first), that function otherwise.
    """
    if not grads:
        return 0.0
    first = grads[0]
    if all(g.device == first.device and g.dtype == first.dtype for g in grads):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()
    return torch.nn.utils.get_total_norm(grads).item()


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def fit(model: nn.Module, train_loader, val_loader, *, epochs: int, optimizer="adamw", lr: float = 1e-3,
        weight_decay: float = 0.0, scheduler=None, warmup_steps: int = 0, warmup_ratio: float = 0.0,
        clip_grad_norm: float | None = None, grad_accum_steps: int = 1, loss_fn=F.cross_entropy,
        checkpoint: BestCheckpoint | None = None, restore_best: bool = True, precision: str = "fp32",
        activation_checkpointing: bool = False, device="auto", name: str | None = None,
        split_hash: str | None = None, save_to=None, resume_from=None, callbacks=(), progress=None) -> History:
    """Train ``model`` for ``epochs`` and return its ``History``.

    Args:
        optimizer: a ``torch.optim.Optimizer`` or a name in ``OPTIMIZERS`` (built over trainable parameters
            with ``lr`` and ``weight_decay``).
        scheduler: None (constant LR), an ``LRScheduler``, or a name for ``schedules.make_scheduler``; it is
            stepped once per optimizer step. With a name, ``total_steps = epochs * ceil(len(train_loader) /
            grad_accum_steps)`` and warmup is ``warmup_steps`` or ``round(warmup_ratio * total_steps)``.
        clip_grad_norm: clip the global gradient norm to this value (the logged norm is the pre-clip norm).
        grad_accum_steps: micro-batches per optimizer step; each micro-batch loss is divided by the number
            of micro-batches in its group, so with equal micro-batch sizes the step equals one step on the
            concatenated batch (a smaller last micro-batch weighs as much as a full one).
        checkpoint: the rule for the kept checkpoint (default ``BestCheckpoint("val_loss", "min")``); its
            ``patience`` enables early stopping. ``restore_best`` loads the kept weights into ``model`` at the end.
        precision: "fp32", "bf16" or "fp16" autocast (fp16 uses a GradScaler).
        save_to / resume_from: a path for the full training state after every epoch / to continue from;
            a resumed run reproduces the uninterrupted one exactly on CPU.
        callbacks: functions ``cb(history, model)`` called after each epoch.
        progress: tqdm bar over epochs (None: on unless the environment sets ``COURSE_PROGRESS=0``).
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}")
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm must be None (no clipping) or > 0, got {clip_grad_norm}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    if len(train_loader) == 0:
        raise ValueError("train_loader is empty: check the batch size and the training data")
    device = get_device(device)
    model.to(device)
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(activation_checkpointing)
    elif activation_checkpointing:
        raise ValueError(f"{type(model).__name__} has no set_activation_checkpointing(): use a course_lib model")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameter: unfreeze something (course_lib.freezing.unfreeze)")
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = make_optimizer(params, optimizer, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_loader) / grad_accum_steps)
    if isinstance(scheduler, str):
        from .schedules import make_scheduler
        total = epochs * steps_per_epoch
        warm = warmup_steps or round(warmup_ratio * total)
        scheduler = make_scheduler(optimizer, scheduler, warmup_steps=warm, total_steps=total)
    checkpoint = BestCheckpoint() if checkpoint is None else checkpoint
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    trainable, total_params = count_parameters(model)
    history = History(name=name, split_hash=split_hash, rule=checkpoint.rule)
    history.trainable_params, history.total_params = trainable, total_params
    start_epoch, step = 1, 0
    if resume_from is not None:
        payload = load_training_state(resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                      loader=train_loader if hasattr(train_loader, "load_state_dict") else None,
                                      checkpoint=checkpoint, scaler=scaler)
        history.extend(payload["rows"])
        history.steps = list(payload["steps"])
        start_epoch, step, history.seconds = payload["epoch"] + 1, payload["step"], payload["seconds"]

    bar = None
    if _progress_enabled(progress):
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs, initial=start_epoch - 1, desc=name or "fit", unit="epoch", leave=False)
    try:
        for epoch in range(start_epoch, epochs + 1):
            t0 = time.perf_counter()
            model.train()
            n_batches = len(train_loader)
            loss_sum, seen, norms, clipped = 0.0, 0, [], 0
            preds, targets = [], []  # compared once per epoch: one op per step instead of four
            optimizer.zero_grad(set_to_none=True)
            for i, (x, y) in enumerate(train_loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                group_start = (i // grad_accum_steps) * grad_accum_steps
                group_size = min(grad_accum_steps, n_batches - group_start)
                with _autocast(device, precision):
                    logits = model(x)
                    loss = loss_fn(logits.float(), y)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    lr_now = optimizer.param_groups[0]["lr"]
                    raise FloatingPointError(
                        f"non-finite training loss ({loss_value}) at step {step + 1} (epoch {epoch}, batch {i + 1}) "
                        f"with lr={lr_now:.3g}: lower the LR, add warmup or clip gradients")
                if group_size > 1:
                    loss = loss / group_size
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss_value * len(y)
                preds.append(logits.detach().argmax(-1))
                targets.append(y)
                seen += len(y)
                if i + 1 < group_start + group_size:
                    continue
                if scaler:
                    scaler.unscale_(optimizer)
                grads = [p.grad for p in params if p.grad is not None]
                norm = _grad_norm(grads)
                lr_now = optimizer.param_groups[0]["lr"]
                if not math.isfinite(norm) and scaler is None:
                    raise FloatingPointError(f"non-finite gradient norm at step {step + 1} (epoch {epoch}) with "
                                             f"lr={lr_now:.3g}: lower the LR, add warmup or clip gradients")
                was_clipped = clip_grad_norm is not None and math.isfinite(norm) and norm > clip_grad_norm
                if was_clipped:
                    # it scales p.grad of the *parameters* it is given (a list of grad tensors would be a silent no-op)
                    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], clip_grad_norm,
                                                         torch.tensor(norm))
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
                step += 1
                norms.append(norm)
                clipped += was_clipped
                history.steps.append({"step": step, "epoch": epoch, "lr": lr_now, "loss": loss_value,
                                      "grad_norm": norm, "clipped": was_clipped})
            correct = (torch.cat(preds) == torch.cat(targets)).sum().item()
            val = evaluate(model, val_loader, loss_fn, device)
            row = {"epoch": epoch, "lr": lr_now, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                   "val_loss": val["loss"], "val_acc": val["acc"],
                   "grad_norm": sum(norms) / max(len(norms), 1), "grad_norm_max": max(norms, default=0.0),
                   "clip_frac": clipped / max(len(norms), 1), "seconds": time.perf_counter() - t0}
            history.append(row)
            history.seconds += row["seconds"]
            checkpoint.update(epoch, row, model)
            if save_to is not None:
                save_training_state(save_to, model=model, optimizer=optimizer, scheduler=scheduler,
                                    loader=train_loader if hasattr(train_loader, "state_dict") else None,
                                    checkpoint=checkpoint, scaler=scaler, rows=list(history),
                                    steps=history.steps, epoch=epoch, step=step, seconds=history.seconds)
            for cb in callbacks:
                cb(history, model)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(train_loss=f"{row['train_loss']:.3f}", val_loss=f"{row['val_loss']:.3f}",
                                val_acc=f"{row['val_acc']:.3f}")
            if checkpoint.should_stop:
                history.stopped_early = True
                history.stop_reason = (f"no better {checkpoint.metric} for {checkpoint.patience} epochs "
                                       f"(best epoch {checkpoint.best_epoch})")
                break
    except KeyboardInterrupt:
        history.stopped_early = True
        history.stop_reason = f"interrupted during epoch {len(history) + 1}; {len(history)} full epochs kept"
        print(f"Training interrupted: {history.stop_reason}."
              + (f" Resume with fit(..., resume_from={str(save_to)!r})." if save_to is not None else ""))
    except FloatingPointError as err:
        err.history = history  # nothing lost: the epochs so far stay readable
        raise
    finally:
        if bar is not None:
            bar.close()
    history.best_epoch, history.best_value = checkpoint.best_epoch, checkpoint.best_value
    history.best_state = checkpoint.best_state
    history.optimizer_state_bytes = optimizer_state_bytes(optimizer)
    if restore_best and checkpoint.best_state is not None:
        model.load_state_dict(checkpoint.best_state)
    return history
