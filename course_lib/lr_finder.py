"""The LR range test (Leslie Smith 2015; the fastai "LR finder"): sweep the LR up, watch the loss, put everything back.

For ``i = 0 .. num_steps - 1`` one optimizer step is taken at the exponentially spaced LR

    lr_i = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))

(every param group gets ``lr_i``), on the next ``(x, y)`` batch of ``loader`` (cycled when it runs out).
The loss is smoothed with an exponential moving average and bias correction (as Adam does):

    avg_i = smooth * avg_{i-1} + (1 - smooth) * loss_i,    smoothed_i = avg_i / (1 - smooth ** (i + 1))

and the sweep stops early once ``smoothed_i > diverge_factor * min(smoothed_0..i-1)`` or it is not finite
(this assumes a positive loss such as cross-entropy or MSE). Afterwards the model's parameters, buffers and
gradients, its (per-module) train/eval flags, the optimizer's state dict (LRs included) and the RNG states
(torch CPU and CUDA, Python ``random``, NumPy, and the loader's own ``generator``) are restored exactly:
the test only *reads* the loss curve, it does not train the model.

Reading the curve: a good LR sits where the loss falls fastest ("steepest"), or one decade below the
minimum ("minimum/10"); never at the minimum itself, which is already at the edge of divergence.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .progress import Progress, progress_enabled

__all__ = ["LRFinderResult", "lr_range_test", "SUGGESTION_KINDS"]

SUGGESTION_KINDS = ("steepest", "minimum/10")


@dataclass
class LRFinderResult:
    """What ``lr_range_test`` saw: one entry per step taken (``len(lrs) <= num_steps``).

    Attributes:
        lrs: the LR used at each step (increasing, exponentially spaced).
        losses: the bias-corrected exponentially smoothed training loss.
        raw_losses: the loss of each batch, before its step.
        stopped_early: True when the sweep stopped because the smoothed loss diverged.
    """

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    raw_losses: list[float] = field(default_factory=list)
    stopped_early: bool = False

    def _finite(self) -> tuple[np.ndarray, np.ndarray]:
        lrs, losses = np.asarray(self.lrs, dtype=float), np.asarray(self.losses, dtype=float)
        keep = np.isfinite(losses)
        return lrs[keep], losses[keep]

    def suggestion(self, kind: str = "steepest") -> float:
        """A suggested LR read from the smoothed curve.

        ``"steepest"``: the LR where ``d smoothed_loss / d log(lr)`` (``np.gradient``) is most negative,
        ignoring the first ``max(1, n // 10)`` and last ``max(1, n // 20)`` points (warm-up noise of the
        average, and the blow-up). ``"minimum/10"``: the LR of the lowest smoothed loss, divided by 10.
        """
        if kind not in SUGGESTION_KINDS:
            raise ValueError(f"kind must be one of {', '.join(repr(k) for k in SUGGESTION_KINDS)}, got {kind!r}")
        lrs, losses = self._finite()
        if len(lrs) < 2:
            raise ValueError(f"need at least 2 finite smoothed losses to suggest an LR, got {len(lrs)}: "
                             "run the test with more num_steps or a smaller start_lr")
        if kind == "minimum/10":
            return float(lrs[int(np.argmin(losses))] / 10.0)
        n = len(lrs)
        lo, hi = max(1, n // 10), n - max(1, n // 20)
        if hi - lo < 3:  # too short to skip anything
            lo, hi = 0, n
        grad = np.gradient(losses[lo:hi], np.log(lrs[lo:hi]))
        return float(lrs[lo + int(np.argmin(grad))])

    def to_frame(self) -> pd.DataFrame:
        """One row per step: ``step lr loss raw_loss`` (``loss`` is the smoothed one)."""
        return pd.DataFrame({"step": range(len(self.lrs)), "lr": self.lrs, "loss": self.losses,
                             "raw_loss": self.raw_losses})

    def plot(self, ax=None):
        """Smoothed (and faint raw) loss against the LR on a log axis, both suggestions marked; returns ``ax``."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.raw_losses, color="0.75", lw=1, label="raw loss")
        ax.plot(self.lrs, self.losses, color="C0", lw=2, label="smoothed loss")
        for kind, color in zip(SUGGESTION_KINDS, ("C1", "C2")):
            try:
                lr = self.suggestion(kind)
            except ValueError:
                continue
            ax.axvline(lr, color=color, ls="--", label=f"{kind}: {lr:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss")
        finite = [v for v in self.losses if math.isfinite(v)]
        if finite:  # keep the blow-up from flattening the interesting part
            lo, hi = min(finite), finite[0]
            ax.set_ylim(lo - 0.1 * abs(hi - lo) - 1e-8, max(hi, lo) + 0.5 * abs(hi - lo) + 1e-8)
        ax.set_title("LR range test" + (" (stopped: loss diverged)" if self.stopped_early else ""))
        ax.legend()
        return ax


# ----------------------------------------------------------------------------- state save / restore
def _generators(loader) -> list[torch.Generator]:
    gens = []
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in gens):
            gens.append(g)
    return gens


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, loader, device: torch.device) -> dict:
    tensors = [t for _, t in model.named_parameters(remove_duplicate=True)]
    tensors += [b for _, b in model.named_buffers(remove_duplicate=True)]
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return {
        "tensors": [(t, t.detach().clone()) for t in tensors],
        "grads": [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()],
        "training": [(m, m.training) for m in model.modules()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state(),
        "generators": [(g, g.get_state()) for g in _generators(loader)],
    }


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, snap: dict) -> None:
    with torch.no_grad():
        for t, saved in snap["tensors"]:
            t.copy_(saved)
    for p, g in snap["grads"]:
        p.grad = g
    for m, flag in snap["training"]:
        m.training = flag
    optimizer.load_state_dict(snap["optimizer"])
    torch.set_rng_state(snap["torch_rng"])
    if snap["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(snap["cuda_rng"])
    random.setstate(snap["py_rng"])
    np.random.set_state(snap["np_rng"])
    for g, state in snap["generators"]:
        g.set_state(state)


def _batches(loader):
    """Yield batches forever, starting a new pass over ``loader`` when one ends."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("loader yielded no batches: check the dataset and the batch size")


# ----------------------------------------------------------------------------- the test
def lr_range_test(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, loader, *, start_lr: float = 1e-7,
                  end_lr: float = 10.0, num_steps: int = 100, smooth: float = 0.98, diverge_factor: float = 4.0,
                  device=None, progress: bool | None = None) -> LRFinderResult:
    """Run the LR range test and return the curve; ``model`` and ``optimizer`` come back exactly as they were.

    Args:
        model: in train mode during the sweep (its flags are restored afterwards).
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters; every param group gets the swept LR.
        loss_fn: ``loss_fn(model(x), y) -> scalar tensor``, e.g. ``F.cross_entropy``.
        loader: an iterable of ``(x, y)`` batches (e.g. a DataLoader); cycled if shorter than ``num_steps``.
        start_lr, end_lr: the first and last LR of the exponential sweep (``0 < start_lr < end_lr``).
        num_steps: optimizer steps (>= 2); fewer are taken if the loss diverges first.
        smooth: EMA factor in ``[0, 1)`` for the smoothed loss (0: no smoothing).
        diverge_factor: stop when the smoothed loss exceeds this multiple of its best value (> 1; ``math.inf``
            never stops on size, only on a non-finite loss).
        device: where batches are moved; None: the device of the model's first parameter (the model is not moved).
        progress: a tqdm bar over steps, replaced by a one-line summary at the end (``course_lib.progress``;
            None: on unless the environment sets ``COURSE_PROGRESS=0``; off, nothing is printed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model(x), y), got {type(loss_fn).__name__}")
    if not start_lr > 0:
        raise ValueError(f"start_lr must be > 0 (the sweep is exponential), got {start_lr}")
    if not end_lr > start_lr:
        raise ValueError(f"end_lr must be > start_lr, got end_lr={end_lr} <= start_lr={start_lr}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth must be in [0, 1) (0: no smoothing), got {smooth}")
    if not diverge_factor > 1:
        raise ValueError(f"diverge_factor must be > 1, got {diverge_factor}")
    first = next(model.parameters(), None)
    if first is None:
        raise ValueError("model has no parameters: nothing for the optimizer to step")
    device = first.device if device is None else torch.device(device)
    if first.device != device:
        raise ValueError(f"model is on {first.device} but device={device}: move the model with model.to(device) "
                         "first, or leave device=None")
    result = LRFinderResult()
    ratio = end_lr / start_lr
    snap = _snapshot(model, optimizer, loader, device)
    batches = _batches(loader)
    avg, best = 0.0, math.inf
    bar = Progress(progress_enabled(progress), total=num_steps, desc="LR range test", unit="step")
    try:
        model.train()
        for i in range(num_steps):
            lr = start_lr * ratio ** (i / (num_steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = next(batches)
            x = x.to(device) if torch.is_tensor(x) else x
            y = y.to(device) if torch.is_tensor(y) else y
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            raw = float(loss.detach())
            avg = smooth * avg + (1.0 - smooth) * raw
            smoothed = avg / (1.0 - smooth ** (i + 1))
            result.lrs.append(lr)
            result.raw_losses.append(raw)
            result.losses.append(smoothed)
            bar.update()
            if not math.isfinite(smoothed) or smoothed > diverge_factor * best:
                result.stopped_early = True
                break
            best = min(best, smoothed)
    finally:
        last = result.lrs[-1] if result.lrs else start_lr
        bar.close(f"LR range test: {len(result.lrs)} steps, lr {start_lr:g} to {last:.3g}"
                  + ("; stopped early: the loss diverged" if result.stopped_early else ""))
        _restore(model, optimizer, snap)
    return result
