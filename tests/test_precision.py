"""Mixed precision as notebook 07 runs it: fp16 autocast with a GradScaler on the CPU, and the bf16 choice on GPUs."""
from __future__ import annotations

import math

import nbformat
import pytest
import torch
from nbutil import ROOT

from course_lib.data import digits_split, make_loaders
from course_lib.models import MLP
from course_lib.runtime import seed_everything
from course_lib.train import fit


class RecordingScaler(torch.amp.GradScaler):
    """torch's GradScaler, remembering every instance and the scale after each update."""

    made: list = []

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("init_scale", RecordingScaler.init)
        super().__init__(*args, **kwargs)
        self.scales = []
        RecordingScaler.made.append(self)

    def update(self, new_scale=None):
        super().update(new_scale)
        self.scales.append(self.get_scale())


def _fit(precision, monkeypatch, init_scale=2.0**16, epochs=2):
    RecordingScaler.made, RecordingScaler.init = [], init_scale
    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    dtypes = set()
    split = digits_split(0, n_train=256)
    seed_everything(0)
    model = MLP(in_features=64, hidden=(32,), n_classes=10)
    model.blocks[0][0].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if m.training else None)
    train_loader, val_loader, _ = make_loaders(split, 64, seed=0)
    history = fit(model, train_loader, val_loader, epochs=epochs, optimizer="adamw", lr=3e-3, device="cpu",
                  precision=precision, progress=False)
    return history, model, dtypes


def test_fp16_autocast_with_grad_scaler_trains_on_cpu(monkeypatch):
    """The path notebook 07 runs for fp16: float16 matmuls under CPU autocast, a GradScaler scaling the loss."""
    ref, _, ref_dtypes = _fit("fp32", monkeypatch)
    assert RecordingScaler.made == [] and ref_dtypes == {torch.float32}
    history, model, dtypes = _fit("fp16", monkeypatch)
    assert dtypes == {torch.float16}, "autocast ran the first Linear in float16"
    assert len(RecordingScaler.made) == 1 and RecordingScaler.made[0].is_enabled()
    scaler = RecordingScaler.made[0]
    assert len(scaler.scales) == 2 * len(make_loaders(digits_split(0, n_train=256), 64)[0]), "one update per step"
    assert all(p.dtype == torch.float32 for p in model.parameters()), "weights stay fp32"
    assert all(math.isfinite(r["train_loss"]) for r in history)
    assert history[-1]["val_loss"] < history[0]["val_loss"] < math.log(10)
    assert abs(history[-1]["val_loss"] - ref[-1]["val_loss"]) < 0.05, (history[-1], ref[-1])


def test_fp16_grad_scaler_skips_overflowing_steps_and_lowers_its_scale(monkeypatch):
    """A scale so large that the fp16 gradients overflow: those steps are skipped (not a divergence) and the
    scale halves until the gradients fit, after which training proceeds as usual."""
    history, _, _ = _fit("fp16", monkeypatch, init_scale=2.0**24, epochs=3)
    scales = RecordingScaler.made[0].scales
    assert scales[:3] == [2.0**23, 2.0**22, 2.0**21], scales  # measured: 4 skipped steps, then 2**19 holds
    assert 2.0**16 <= scales[-1] == scales[-2] < 2.0**21, scales
    assert all(math.isfinite(r["val_loss"]) for r in history)
    assert history[-1]["val_loss"] < history[0]["val_loss"]


def test_notebook_07_picks_bf16_only_where_it_is_native():
    """torch.cuda.is_bf16_supported() says True on a T4, where bf16 is emulated (slow): 07 must ask without
    emulation, so a T4 gets fp16 with a GradScaler as its text says."""
    nb = nbformat.read(ROOT / "solutions" / "07_memory_precision" / "07_memory_precision.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    calls = [ln for ln in code.splitlines() if "is_bf16_supported(" in ln]
    assert calls and all("including_emulation=False" in ln for ln in calls), calls
    assert 'precision="fp16"' in code, "07 runs the fp16 + GradScaler path, not only explains it"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_and_bf16_on_gpu(monkeypatch):
    split = digits_split(0, n_train=256)
    train_loader, val_loader, _ = make_loaders(split, 64, seed=0)
    for precision in ("fp16", "bf16") if torch.cuda.is_bf16_supported(including_emulation=False) else ("fp16",):
        seed_everything(0)
        model = MLP(in_features=64, hidden=(32,), n_classes=10)
        h = fit(model, train_loader, val_loader, epochs=2, optimizer="adamw", lr=3e-3, device="cuda",
                precision=precision, progress=False)
        assert h[-1]["val_loss"] < h[0]["val_loss"] < math.log(10), precision


@pytest.mark.parametrize("seed", [0, 1])
def test_fp16_run_of_notebook_07_lands_where_fp32_does(seed, one_thread):
    """07's text: autocast moves the curves a little but lands in the same place, in fp16 too (fast mode)."""
    from course_lib.scenarios.memory_budget import split_for, train_arm

    split = split_for(seed)
    ref, _ = train_arm("adamw", split, seed=seed, fast=True)
    half, _ = train_arm("autocast", split, seed=seed, fast=True, precision="fp16")
    assert abs(half[-1]["val_acc"] - ref[-1]["val_acc"]) <= 0.02, (seed, half[-1], ref[-1])
    assert max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(half, ref)) < 0.05
