"""Learning-rate schedules with warmup, in native torch (``LambdaLR`` over pure multiplier functions).

Every schedule is a *multiplier* ``m(step)``: the LR of a param group at optimizer step ``step`` is
``base_lr * m(step)``, where ``base_lr`` is the group's LR when the scheduler was made. ``step`` counts
``scheduler.step()`` calls (0 before the first one). With ``w = warmup_steps`` and ``T = total_steps``:

* warmup (every schedule except ``constant``): ``m(s) = s / max(1, w)`` for ``s < w`` (0 at step 0);
* ``constant``: ``m(s) = 1``; ``constant_with_warmup``: 1 after the warmup;
* ``linear``: ``m(s) = max(0, (T - s) / max(1, T - w))``;
* ``cosine``: ``p = (s - w) / max(1, T - w)``, ``m(s) = max(0, (1 + cos(2 pi c p)) / 2)`` with
  ``c = num_cycles`` (0.5: half a cosine wave from 1 down to 0). Not clamped: past ``T`` it rises again;
* ``cosine_with_restarts``: ``m(s) = (1 + cos(pi * ((c p) mod 1))) / 2`` for ``p < 1``, 0 for ``p >= 1``:
  ``c`` hard restarts (default 1, i.e. a single half cosine);
* ``polynomial``: ``lr(s) = (lr0 - lr_end) * (1 - (s - w) / (T - w)) ** power + lr_end`` for
  ``w <= s <= T`` and ``lr_end`` after ``T``; ``lr_end`` is an absolute LR (default 1e-7).

These are the formulas of Hugging Face transformers' ``get_*_schedule*`` functions, step for step, so a
recipe read in an LLM codebase means the same here. Two deliberate differences, both in ``polynomial``:
``lr_end`` is reached by *every* param group (transformers scales every group by ``optimizer.defaults["lr"]``,
so the two agree whenever every group starts at that LR), and ``warmup_steps == total_steps`` gives
``lr_end`` at step ``T`` (transformers divides by zero there).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

__all__ = [
    "SCHEDULE_NAMES",
    "make_scheduler",
    "warmup_multiplier",
    "constant_multiplier",
    "constant_warmup_multiplier",
    "warmup_linear_multiplier",
    "warmup_cosine_multiplier",
    "warmup_cosine_restarts_multiplier",
    "warmup_polynomial_multiplier",
    "schedule_lrs",
]

SCHEDULE_NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
"""The names ``make_scheduler`` accepts (same meaning as transformers' ``SchedulerType`` values)."""

_DECAYING = ("linear", "cosine", "cosine_with_restarts", "polynomial")


# ----------------------------------------------------------------------------- pure multiplier functions
def warmup_multiplier(step: int, warmup_steps: int) -> float:
    """Linear warmup ``step / max(1, warmup_steps)``: 0 at step 0, reaching 1 at ``step == warmup_steps``."""
    return float(step) / float(max(1, warmup_steps))


def constant_multiplier(step: int) -> float:
    """``constant``: always 1 (the optimizer's LR)."""
    return 1.0


def constant_warmup_multiplier(step: int, warmup_steps: int) -> float:
    """``constant_with_warmup``: linear warmup over ``warmup_steps``, then 1."""
    return warmup_multiplier(step, warmup_steps) if step < warmup_steps else 1.0


def warmup_linear_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """``linear``: warmup, then a straight line from 1 at ``warmup_steps`` to 0 at ``total_steps`` (0 after)."""
    if step < warmup_steps:
        return warmup_multiplier(step, warmup_steps)
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def _decay_progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """Fraction of the decay phase done: 0 at ``warmup_steps``, 1 at ``total_steps`` (> 1 after)."""
    return float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))


def warmup_cosine_multiplier(step: int, warmup_steps: int, total_steps: int, num_cycles: float = 0.5) -> float:
    """``cosine``: warmup, then ``(1 + cos(2 pi * num_cycles * p)) / 2`` with ``p`` the decay progress.

    With the default ``num_cycles=0.5`` this falls from 1 at ``warmup_steps`` to 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return warmup_multiplier(step, warmup_steps)
    progress = _decay_progress(step, warmup_steps, total_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def warmup_cosine_restarts_multiplier(step: int, warmup_steps: int, total_steps: int, num_cycles: float = 1) -> float:
    """``cosine_with_restarts``: warmup, then ``num_cycles`` half cosines from 1 to 0, each jumping back to 1.

    Returns 0 from ``total_steps`` on.
    """
    if step < warmup_steps:
        return warmup_multiplier(step, warmup_steps)
    progress = _decay_progress(step, warmup_steps, total_steps)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def warmup_polynomial_multiplier(step: int, warmup_steps: int, total_steps: int, lr_init: float,
                                 lr_end: float = 1e-7, power: float = 1.0) -> float:
    """``polynomial``: warmup, then ``lr = (lr_init - lr_end) * (1 - p) ** power + lr_end``.

    Returned as the multiplier ``lr / lr_init``: ``lr_init`` is the group's starting LR and ``lr_end`` the
    absolute LR reached at ``total_steps`` and kept after it; ``power=1`` is a straight line.
    """
    if step < warmup_steps:
        return warmup_multiplier(step, warmup_steps)
    if step > total_steps or total_steps == warmup_steps:  # decay done (or of zero length)
        return lr_end / lr_init
    remaining = 1.0 - (step - warmup_steps) / (total_steps - warmup_steps)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


# ----------------------------------------------------------------------------- checks
def _check_int(value, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")


def _check_args(name, warmup_steps, total_steps, num_cycles, power, lr_end) -> None:
    if not isinstance(name, str) or name not in SCHEDULE_NAMES:
        raise ValueError(f"name must be one of {', '.join(SCHEDULE_NAMES)}; got {name!r}")
    _check_int(warmup_steps, "warmup_steps")
    _check_int(total_steps, "total_steps", allow_none=True)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if name == "constant" and warmup_steps > 0:
        raise ValueError(f"'constant' has no warmup but warmup_steps={warmup_steps}: use "
                         "name='constant_with_warmup' or warmup_steps=0")
    if total_steps is None and name in _DECAYING:
        raise ValueError(f"total_steps is required for {name!r} (the step where the decay ends), got None")
    if total_steps is not None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if warmup_steps > total_steps:
            raise ValueError(f"warmup_steps must be <= total_steps, got warmup_steps={warmup_steps} > "
                             f"total_steps={total_steps}: shorten the warmup or train longer")
    if num_cycles is not None:
        if name not in ("cosine", "cosine_with_restarts"):
            raise ValueError(f"num_cycles only applies to 'cosine' and 'cosine_with_restarts', got "
                             f"num_cycles={num_cycles} with name={name!r}: leave it None")
        if isinstance(num_cycles, bool) or not isinstance(num_cycles, (int, float)) or not num_cycles > 0:
            raise ValueError(f"num_cycles must be a number > 0, got {num_cycles!r}")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
        raise ValueError(f"power must be a number > 0, got {power!r}")
    if isinstance(lr_end, bool) or not isinstance(lr_end, (int, float)) or not lr_end >= 0:
        raise ValueError(f"lr_end must be a number >= 0 (an absolute LR), got {lr_end!r}")


# ----------------------------------------------------------------------------- the scheduler
def make_scheduler(optimizer: torch.optim.Optimizer, name: str, *, warmup_steps: int = 0,
                   total_steps: int | None = None, num_cycles: float | None = None, power: float = 1.0,
                   lr_end: float = 1e-7) -> LRScheduler:
    """Build the schedule ``name`` (one of ``SCHEDULE_NAMES``); call ``.step()`` once per optimizer step.

    Args:
        optimizer: its param groups' current LRs become the peak (base) LRs, one per group.
        warmup_steps: steps of linear warmup from 0 (not allowed for ``constant``).
        total_steps: the step where the decay ends; required for ``linear``, ``cosine``,
            ``cosine_with_restarts`` and ``polynomial`` (ignored, but checked, for the constant schedules).
        num_cycles: cosine waves (``cosine``, default 0.5) or hard restarts (``cosine_with_restarts``, default 1).
        power, lr_end: ``polynomial`` only: the exponent and the absolute final LR (< every group's LR).

    Returns:
        a ``torch.optim.lr_scheduler.LambdaLR`` (one multiplier per param group); the LR at step ``s`` is the
        one transformers' ``get_<name>_schedule*`` gives with the same arguments (see the module docstring).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    _check_args(name, warmup_steps, total_steps, num_cycles, power, lr_end)
    w, t = warmup_steps, total_steps
    if name == "constant":
        fn = constant_multiplier
    elif name == "constant_with_warmup":
        fn = partial(constant_warmup_multiplier, warmup_steps=w)
    elif name == "linear":
        fn = partial(warmup_linear_multiplier, warmup_steps=w, total_steps=t)
    elif name == "cosine":
        fn = partial(warmup_cosine_multiplier, warmup_steps=w, total_steps=t,
                     num_cycles=0.5 if num_cycles is None else num_cycles)
    elif name == "cosine_with_restarts":
        fn = partial(warmup_cosine_restarts_multiplier, warmup_steps=w, total_steps=t,
                     num_cycles=1 if num_cycles is None else num_cycles)
    else:  # polynomial: one multiplier per group, because lr_end is absolute
        fns = []
        for i, group in enumerate(optimizer.param_groups):
            lr_init = float(group.get("initial_lr", group["lr"]))
            if not lr_init > lr_end:
                raise ValueError(f"lr_end must be smaller than every param group's LR, got lr_end={lr_end} >= "
                                 f"lr={lr_init} of param group {i}: lower lr_end or raise the LR")
            fns.append(partial(warmup_polynomial_multiplier, warmup_steps=w, total_steps=t, lr_init=lr_init,
                               lr_end=float(lr_end), power=power))
        return LambdaLR(optimizer, fns)
    return LambdaLR(optimizer, fn)


def schedule_lrs(name: str, steps: int, *, lr: float = 1.0, **kwargs) -> list[float]:
    """The LR at steps ``0 .. steps - 1`` of schedule ``name`` for one group starting at ``lr`` (for plots).

    ``kwargs`` go to ``make_scheduler``. Uses a throw-away parameter, so no model or optimizer is touched.
    """
    _check_int(steps, "steps")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make_scheduler(opt, name, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs
