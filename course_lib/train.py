"""``fit``: one training loop that records the evidence every notebook reads.

Per optimizer step it logs the LR, the loss, the global gradient norm *before* clipping and whether the
step was clipped; per epoch it logs ``epoch lr train_loss train_acc val_loss val_acc grad_norm
grad_norm_max clip_frac seconds``. The checkpoint kept is the best under one rule (``BestCheckpoint``),
never "the last epoch" by default (``History.kept_row()``). A non-finite loss or gradient norm stops training
loudly with ``TrainingDiverged``, naming the step, epoch and LR.

``fit`` reads top to bottom: check the arguments, build the optimizer and scheduler, resume if asked, then per
epoch ``_train_epoch`` (micro-batches through ``_forward_backward``, one ``_optimizer_step`` per group) and the
checkpoint rule, and ``_finish``.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import BestCheckpoint, load_training_state, save_training_state
from .optimizers import make_optimizer, optimizer_state_bytes
from .params import count_parameters
from .progress import Progress, progress_enabled
from .runtime import get_device

__all__ = ["History", "TrainingDiverged", "fit", "evaluate", "DEFAULT_LR"]

DEFAULT_LR = 1e-3
"""The LR of an optimizer that ``fit`` builds by name when no ``lr`` is given."""


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

    def kept_row(self) -> dict:
        """The row of the kept checkpoint (epoch ``best_epoch`` under the run's rule), not the last epoch's."""
        if self.best_epoch is None:
            raise ValueError("history has no best epoch to keep: the run did not finish an epoch")
        return next(r for r in self if r["epoch"] == self.best_epoch)

    def kept(self, metric: str) -> float:
        """``metric`` at the kept checkpoint, e.g. ``history.kept("val_acc")``."""
        row = self.kept_row()
        if metric not in row:
            raise KeyError(f"metric {metric!r} is not in the history; its columns are {list(row)}")
        return float(row[metric])

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


class TrainingDiverged(FloatingPointError):
    """A non-finite loss or gradient norm stopped ``fit``: where (``step``, ``epoch``, ``lr``) and what came before.

    ``history`` holds every epoch finished before it and, in ``history.steps``, every optimizer step taken.
    """

    def __init__(self, message: str, *, step: int | None = None, epoch: int | None = None, lr: float | None = None,
                 history: History | None = None):
        super().__init__(message)
        self.step, self.epoch, self.lr, self.history = step, epoch, lr, history


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


@dataclass
class _Run:
    """What every step of one ``fit`` reads and updates: built once by ``fit``, then passed to the steps."""

    model: nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    device: torch.device
    precision: str
    loss_fn: object
    clip_grad_norm: float | None
    grad_accum_steps: int
    history: History
    step: int = 0  # optimizer steps taken so far

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def _check_arguments(epochs, grad_accum_steps, clip_grad_norm, precision, train_loader) -> None:
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


def _trainable(model: nn.Module, device: torch.device, activation_checkpointing: bool) -> list:
    """Move ``model`` to ``device``, set its activation checkpointing; return its trainable parameters."""
    model.to(device)
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(activation_checkpointing)
    elif activation_checkpointing:
        raise ValueError(f"{type(model).__name__} has no set_activation_checkpointing(): use a course_lib model")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameter: unfreeze something (course_lib.freezing.unfreeze)")
    return params


def _build_optimizer(optimizer, params: list, lr: float | None, weight_decay: float | None):
    """A name of ``OPTIMIZERS`` built over ``params``; an optimizer object as it is (then lr/decay are its own)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        given = [arg for arg, value in (("lr", lr), ("weight_decay", weight_decay)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} given together with an optimizer object, which already has "
                             f"its own (lr={optimizer.param_groups[0]['lr']:g}, weight_decay="
                             f"{optimizer.param_groups[0].get('weight_decay', 0):g}): set them when you build the "
                             "optimizer, or pass its name (e.g. optimizer='adamw') with lr= and weight_decay=")
        return optimizer
    return make_optimizer(params, optimizer, lr=DEFAULT_LR if lr is None else lr,
                          weight_decay=0.0 if weight_decay is None else weight_decay)


def _build_scheduler(scheduler, optimizer, *, total_steps: int, warmup_steps: int, warmup_ratio: float):
    """None, an ``LRScheduler`` as it is, or a name for ``make_scheduler`` over ``total_steps``."""
    if not isinstance(scheduler, str):
        return scheduler
    from .schedules import make_scheduler

    warm = warmup_steps or round(warmup_ratio * total_steps)
    return make_scheduler(optimizer, scheduler, warmup_steps=warm, total_steps=total_steps)


def _resume(path, run: _Run, train_loader, checkpoint: BestCheckpoint) -> int:
    """Load the training state saved at ``path`` into ``run`` (and the loader, the rule); returns the next epoch."""
    payload = load_training_state(path, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                                  loader=train_loader if hasattr(train_loader, "load_state_dict") else None,
                                  checkpoint=checkpoint, scaler=run.scaler)
    run.history.extend(payload["rows"])
    run.history.steps = list(payload["steps"])
    run.step, run.history.seconds = payload["step"], payload["seconds"]
    return payload["epoch"] + 1


def _save(path, run: _Run, train_loader, checkpoint: BestCheckpoint, epoch: int) -> None:
    save_training_state(path, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                        loader=train_loader if hasattr(train_loader, "state_dict") else None,
                        checkpoint=checkpoint, scaler=run.scaler, rows=list(run.history),
                        steps=run.history.steps, epoch=epoch, step=run.step, seconds=run.history.seconds)


def _diverged(run: _Run, what: str, *, epoch: int, batch: int | None = None) -> TrainingDiverged:
    """The error for a non-finite value at the coming step ``run.step + 1``, carrying the history so far."""
    step, lr = run.step + 1, run.lr
    where = f"epoch {epoch}" if batch is None else f"epoch {epoch}, batch {batch}"
    return TrainingDiverged(f"{what} at step {step} ({where}) with lr={lr:.3g}: lower the LR, add warmup or clip "
                            "gradients", step=step, epoch=epoch, lr=lr, history=run.history)


def _forward_backward(run: _Run, x, y, scale: int, *, epoch: int, batch: int):
    """Loss of one micro-batch and its backward (the loss divided by ``scale``); returns (loss, logits)."""
    with _autocast(run.device, run.precision):
        logits = run.model(x)
        loss = run.loss_fn(logits.float(), y)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise _diverged(run, f"non-finite training loss ({loss_value})", epoch=epoch, batch=batch)
    if scale > 1:
        loss = loss / scale
    (run.scaler.scale(loss) if run.scaler else loss).backward()
    return loss_value, logits


def _optimizer_step(run: _Run, *, epoch: int) -> tuple[float, bool]:
    """One optimizer step on the accumulated gradients; returns (pre-clip global grad norm, whether clipped).

    Order: unscale (fp16), norm, clip, step, zero_grad, then one scheduler step.
    """
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    with_grad = [p for p in run.params if p.grad is not None]
    norm = _grad_norm([p.grad for p in with_grad])
    if not math.isfinite(norm) and run.scaler is None:  # with fp16 the scaler skips the step and lowers its scale
        raise _diverged(run, "non-finite gradient norm", epoch=epoch)
    clipped = run.clip_grad_norm is not None and math.isfinite(norm) and norm > run.clip_grad_norm
    if clipped:
        # it scales p.grad of the *parameters* it is given (a list of grad tensors would be a silent no-op)
        torch.nn.utils.clip_grads_with_norm_(with_grad, run.clip_grad_norm, torch.tensor(norm))
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.scheduler is not None:
        run.scheduler.step()
    run.step += 1
    return norm, clipped


def _train_epoch(run: _Run, train_loader, val_loader, epoch: int) -> dict:
    """One pass over ``train_loader`` (a step every ``grad_accum_steps`` micro-batches), then validation.

    Appends one dict per optimizer step to ``history.steps``; returns the epoch's row.
    """
    t0 = time.perf_counter()
    run.model.train()
    n_batches, k = len(train_loader), run.grad_accum_steps
    loss_sum, seen, norms, clipped = 0.0, 0, [], 0
    preds, targets = [], []  # compared once per epoch: one op per step instead of four
    run.optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(train_loader):
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        group_start = (i // k) * k
        group_size = min(k, n_batches - group_start)  # the last group may be smaller
        loss_value, logits = _forward_backward(run, x, y, group_size, epoch=epoch, batch=i + 1)
        loss_sum += loss_value * len(y)
        preds.append(logits.detach().argmax(-1))
        targets.append(y)
        seen += len(y)
        if i + 1 < group_start + group_size:
            continue
        lr = run.lr  # the LR this step uses (the scheduler moves it afterwards)
        norm, was_clipped = _optimizer_step(run, epoch=epoch)
        norms.append(norm)
        clipped += was_clipped
        run.history.steps.append({"step": run.step, "epoch": epoch, "lr": lr, "loss": loss_value,
                                  "grad_norm": norm, "clipped": was_clipped})
    correct = (torch.cat(preds) == torch.cat(targets)).sum().item()
    val = evaluate(run.model, val_loader, run.loss_fn, run.device)
    return {"epoch": epoch, "lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen,
            "val_loss": val["loss"], "val_acc": val["acc"],
            "grad_norm": sum(norms) / max(len(norms), 1), "grad_norm_max": max(norms, default=0.0),
            "clip_frac": clipped / max(len(norms), 1), "seconds": time.perf_counter() - t0}


def _finish(run: _Run, checkpoint: BestCheckpoint, restore_best: bool) -> History:
    """Record the kept checkpoint and the optimizer's state bytes; load the kept weights if ``restore_best``."""
    history = run.history
    history.best_epoch, history.best_value = checkpoint.best_epoch, checkpoint.best_value
    history.best_state = checkpoint.best_state
    history.optimizer_state_bytes = optimizer_state_bytes(run.optimizer)
    if restore_best and checkpoint.best_state is not None:
        run.model.load_state_dict(checkpoint.best_state)
    return history


def _summary_line(history: History, checkpoint: BestCheckpoint, error: BaseException | None) -> str:
    """One line that says how a fit ended: epochs, the kept epoch and its metric, seconds."""
    line = f"{history.name or 'fit'}: {len(history)} epochs"
    if checkpoint.best_epoch is not None:
        line += f", kept epoch {checkpoint.best_epoch} ({checkpoint.metric} {checkpoint.best_value:.4g})"
    line += f", {history.seconds:.1f} s"
    if isinstance(error, TrainingDiverged):
        line += f"; diverged at step {error.step} (epoch {error.epoch})"
    elif history.stopped_early:
        line += f"; stopped: {history.stop_reason}"
    return line


def fit(model: nn.Module, train_loader, val_loader, *, epochs: int, optimizer="adamw", lr: float | None = None,
        weight_decay: float | None = None, scheduler=None, warmup_steps: int = 0, warmup_ratio: float = 0.0,
        clip_grad_norm: float | None = None, grad_accum_steps: int = 1, loss_fn=F.cross_entropy,
        checkpoint: BestCheckpoint | None = None, restore_best: bool = True, precision: str = "fp32",
        activation_checkpointing: bool = False, device="auto", name: str | None = None,
        split_hash: str | None = None, save_to=None, resume_from=None, callbacks=(), progress=None) -> History:
    """Train ``model`` for ``epochs`` and return its ``History``.

    Args:
        optimizer: a name in ``course_lib.optimizers.OPTIMIZERS``, built over the trainable parameters with
            ``lr`` (default 1e-3) and ``weight_decay`` (default 0); or a ``torch.optim.Optimizer``, which
            brings its own LR and decay: passing ``lr`` or ``weight_decay`` with it is a ValueError.
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
        progress: a tqdm bar over epochs, replaced by a one-line summary when the fit ends (None: on unless
            the environment sets ``COURSE_PROGRESS=0``; off, nothing is printed).

    Raises:
        TrainingDiverged: a non-finite loss or gradient norm; its ``history`` holds the epochs so far.
    """
    _check_arguments(epochs, grad_accum_steps, clip_grad_norm, precision, train_loader)
    device = get_device(device)
    params = _trainable(model, device, activation_checkpointing)
    optimizer = _build_optimizer(optimizer, params, lr, weight_decay)
    steps_per_epoch = math.ceil(len(train_loader) / grad_accum_steps)
    scheduler = _build_scheduler(scheduler, optimizer, total_steps=epochs * steps_per_epoch,
                                 warmup_steps=warmup_steps, warmup_ratio=warmup_ratio)
    checkpoint = BestCheckpoint() if checkpoint is None else checkpoint
    history = History(name=name, split_hash=split_hash, rule=checkpoint.rule)
    history.trainable_params, history.total_params = count_parameters(model)
    run = _Run(model, params, optimizer, scheduler, torch.amp.GradScaler(device.type) if precision == "fp16" else None,
               device, precision, loss_fn, clip_grad_norm, grad_accum_steps, history)
    start_epoch = 1 if resume_from is None else _resume(resume_from, run, train_loader, checkpoint)

    bar = Progress(progress_enabled(progress), total=epochs, initial=start_epoch - 1, desc=name or "fit", unit="epoch")
    error = None
    try:
        for epoch in range(start_epoch, epochs + 1):
            row = _train_epoch(run, train_loader, val_loader, epoch)
            history.append(row)
            history.seconds += row["seconds"]
            checkpoint.update(epoch, row, model)
            if save_to is not None:
                _save(save_to, run, train_loader, checkpoint, epoch)
            for cb in callbacks:
                cb(history, model)
            bar.update(train_loss=f"{row['train_loss']:.3f}", val_loss=f"{row['val_loss']:.3f}",
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
    except TrainingDiverged as err:
        error = err
        raise
    finally:
        bar.close(_summary_line(history, checkpoint, error))
    return _finish(run, checkpoint, restore_best)
