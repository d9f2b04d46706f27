"""lr_range_test: the sweep, the smoothing, early stop, suggestions, plot/frame, and exact restoration of state."""
import copy
import math
import random

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from course_lib.lr_finder import LRFinderResult, lr_range_test

matplotlib.use("Agg")


def _data(n=256, d=10, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, k, generator=g)).argmax(1)  # a learnable teacher, so the loss can fall
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))


def _loader(batch_size=32, shuffle=True, generator=None):
    return DataLoader(TensorDataset(*_data()), batch_size=batch_size, shuffle=shuffle, generator=generator)


def _assert_tree_equal(a, b, path="state"):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_tree_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_tree_equal(u, v, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _warm_optimizer(model, opt, loader, steps=3):
    for (x, y), _ in zip(loader, range(steps)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("opt_name", ["adamw", "sgd_fresh"])
def test_everything_restored_exactly(opt_name):
    model = _model()
    gen = torch.Generator().manual_seed(3)
    loader = _loader(generator=gen)
    if opt_name == "adamw":
        opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-3},
                                 {"params": model[4].parameters(), "lr": 3e-4, "weight_decay": 0.0}],
                                weight_decay=0.05)
        _warm_optimizer(model, opt, loader)  # leaves state (exp_avg, step) and .grad behind
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    model[3].eval()  # a per-module flag that model.train() would overwrite
    params = copy.deepcopy(dict(model.named_parameters()))
    buffers = copy.deepcopy(dict(model.named_buffers()))
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    opt_state = copy.deepcopy(opt.state_dict())
    param_ids = [id(p) for p in model.parameters()]
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    rng, gen_state = torch.get_rng_state(), gen.get_state()
    expected_draws = (torch.rand(4), random.random(), np.random.rand())
    torch.set_rng_state(rng)
    random.seed(5)
    np.random.seed(7)

    res = lr_range_test(model, opt, F.cross_entropy, loader, start_lr=1e-5, end_lr=1.0, num_steps=30,
                        progress=False)
    assert len(res.lrs) == 30 and not res.stopped_early  # 30 steps > 8 batches: the loader was cycled

    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n])), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert [m.training for m in model.modules()] == flags
    assert [id(p) for p in model.parameters()] == param_ids  # restored in place: the optimizer still points at them
    _assert_tree_equal(opt.state_dict(), opt_state)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt_state["param_groups"]]
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(gen.get_state(), gen_state)
    draws = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]


def test_restored_even_when_loss_fn_raises():
    model, loader = _model(), _loader()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    calls = []

    def bad_loss(out, y):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        lr_range_test(model, opt, bad_loss, loader, num_steps=20, progress=False)
    _assert_tree_equal(model.state_dict(), before)
    assert opt.param_groups[0]["lr"] == 0.1


def test_sweep_is_exponential_and_monotone():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    res = lr_range_test(model, opt, F.cross_entropy, _loader(), start_lr=1e-6, end_lr=1e-1, num_steps=51,
                        diverge_factor=math.inf, progress=False)
    lrs = np.array(res.lrs)
    assert len(lrs) == 51 and not res.stopped_early
    assert lrs[0] == pytest.approx(1e-6, rel=1e-12) and lrs[-1] == pytest.approx(1e-1, rel=1e-12)
    assert np.all(np.diff(lrs) > 0)
    step = np.diff(np.log10(lrs))
    np.testing.assert_allclose(step, 5 / 50, rtol=1e-9)  # 5 decades in 50 equal log steps
    assert np.all(np.isfinite(res.raw_losses)) and len(res.raw_losses) == len(res.losses) == 51


def test_progress_leaves_one_summary_line(capsys):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    lr_range_test(model, opt, F.cross_entropy, _loader(), start_lr=1e-4, end_lr=1e-2, num_steps=5,
                  diverge_factor=math.inf, progress=True)
    assert capsys.readouterr().out == "LR range test: 5 steps, lr 0.0001 to 0.01\n"
    lr_range_test(model, opt, F.cross_entropy, _loader(), num_steps=5, progress=False)
    assert capsys.readouterr() == ("", "")


def test_smoothing_and_first_raw_loss():
    x, y = _data()
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]  # a plain list works as a loader
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    res0 = lr_range_test(model, opt, F.cross_entropy, batches, num_steps=10, smooth=0.0, progress=False)
    assert res0.losses == res0.raw_losses
    with torch.no_grad():  # the first step's loss is the untouched model's loss on the first batch
        assert res0.raw_losses[0] == pytest.approx(F.cross_entropy(model(x[:64]), y[:64]).item(), rel=1e-6)
    res = lr_range_test(model, opt, F.cross_entropy, batches, num_steps=10, smooth=0.9, progress=False)
    assert res.raw_losses == res0.raw_losses  # same start state, same batches: same run
    avg = 0.0
    for i, (raw, sm) in enumerate(zip(res.raw_losses, res.losses)):
        avg = 0.9 * avg + 0.1 * raw
        assert sm == pytest.approx(avg / (1 - 0.9 ** (i + 1)), rel=1e-12)
    assert res.losses[0] == pytest.approx(res.raw_losses[0])  # bias correction: no pull towards 0


def test_divergence_stops_early():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    res = lr_range_test(model, opt, F.cross_entropy, _loader(), start_lr=1e-4, end_lr=1e8, num_steps=100,
                        progress=False)
    assert res.stopped_early and len(res.lrs) < 100
    last, earlier = res.losses[-1], res.losses[:-1]
    assert not math.isfinite(last) or last > 4.0 * min(earlier)
    assert all(v <= 4.0 * min(earlier[: i + 1]) for i, v in enumerate(earlier))  # it stopped at the first blow-up


def test_suggestions():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    res = lr_range_test(model, opt, F.cross_entropy, _loader(), start_lr=1e-5, end_lr=10.0, num_steps=80,
                        progress=False)
    steep, mini = res.suggestion(), res.suggestion("minimum/10")
    assert res.lrs[0] <= steep <= res.lrs[-1] and steep in res.lrs
    n = len(res.lrs)
    assert res.lrs.index(steep) >= max(1, n // 10) and res.lrs.index(steep) < n - max(1, n // 20)
    assert mini == pytest.approx(res.lrs[int(np.nanargmin(res.losses))] / 10)
    assert res.lrs[0] <= mini <= res.lrs[-1]
    grad = np.gradient(res.losses[n // 10: n - max(1, n // 20)], np.log(res.lrs[n // 10: n - max(1, n // 20)]))
    assert grad.min() < 0  # the steepest point is a descent
    with pytest.raises(ValueError, match=r"kind must be one of 'steepest', 'minimum/10', got 'valley'"):
        res.suggestion("valley")


def test_suggestion_on_a_known_curve_and_too_short():
    lrs = list(np.logspace(-5, 0, 21))
    losses = [2.0 - math.tanh(math.log10(lr) + 2.5) for lr in lrs]  # falls fastest at lr = 10**-2.5
    res = LRFinderResult(lrs=lrs, losses=losses, raw_losses=losses)
    assert res.suggestion() == pytest.approx(10**-2.5)
    assert res.suggestion("minimum/10") == pytest.approx(lrs[-1] / 10)
    with pytest.raises(ValueError, match="at least 2 finite"):
        LRFinderResult(lrs=[1e-3], losses=[1.0], raw_losses=[1.0]).suggestion()


def test_frame_and_plot():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    res = lr_range_test(model, opt, F.cross_entropy, _loader(), start_lr=1e-4, end_lr=1e3, num_steps=40,
                        progress=False)
    df = res.to_frame()
    assert list(df.columns) == ["step", "lr", "loss", "raw_loss"] and len(df) == len(res.lrs)
    np.testing.assert_array_equal(df["lr"].to_numpy(), np.array(res.lrs))
    import matplotlib.pyplot as plt

    ax = res.plot()
    assert ax.get_xscale() == "log"
    vlines = [ln for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1]
    assert sorted(ln.get_xdata()[0] for ln in vlines) == pytest.approx(
        sorted([res.suggestion(), res.suggestion("minimum/10")]))
    fig, ax2 = plt.subplots()
    assert res.plot(ax=ax2) is ax2
    plt.close("all")


def test_progress_bar_flag(capsys):
    model, loader = _model(), _loader()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    lr_range_test(model, opt, F.cross_entropy, loader, num_steps=5, progress=False)
    assert capsys.readouterr().err == ""
    lr_range_test(model, opt, F.cross_entropy, loader, num_steps=5, progress=True)
    assert "LR range test" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,match", [
    ({"start_lr": 0.0}, r"start_lr must be > 0 .*got 0.0"),
    ({"start_lr": -1e-3}, r"start_lr must be > 0"),
    ({"start_lr": 1e-2, "end_lr": 1e-2}, r"end_lr must be > start_lr, got end_lr=0.01 <= start_lr=0.01"),
    ({"start_lr": 1.0, "end_lr": 0.1}, r"end_lr must be > start_lr"),
    ({"num_steps": 1}, r"num_steps must be an int >= 2, got 1"),
    ({"num_steps": 10.0}, r"num_steps must be an int >= 2"),
    ({"smooth": 1.0}, r"smooth must be in \[0, 1\).*got 1.0"),
    ({"smooth": -0.1}, r"smooth must be in \[0, 1\)"),
    ({"diverge_factor": 1.0}, r"diverge_factor must be > 1, got 1.0"),
])
def test_bad_arguments(kwargs, match):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match=match):
        lr_range_test(model, opt, F.cross_entropy, _loader(), progress=False, **kwargs)


def test_bad_objects():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lr_range_test(lambda x: x, opt, F.cross_entropy, _loader())
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got dict"):
        lr_range_test(model, {"lr": 0.1}, F.cross_entropy, _loader())
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        lr_range_test(model, opt, "cross_entropy", _loader())
    with pytest.raises(ValueError, match="loader yielded no batches"):
        lr_range_test(model, opt, F.cross_entropy, [], num_steps=5, progress=False)
    with pytest.raises(ValueError, match="model is on cpu but device=meta"):
        lr_range_test(model, opt, F.cross_entropy, _loader(), device="meta", progress=False)
