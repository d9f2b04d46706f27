"""make_scheduler against Hugging Face transformers' schedules, step by step; multipliers; bad inputs."""
import math

import pytest
import torch

from course_lib.schedules import (
    SCHEDULE_NAMES,
    make_scheduler,
    schedule_lrs,
    warmup_cosine_multiplier,
    warmup_linear_multiplier,
)

LR = 0.1
EXTRA = 5  # steps checked past total_steps
CASES = [(0, 10), (3, 10), (10, 10), (0, 1), (1, 1), (7, 23)]  # (warmup_steps, total_steps)


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    from transformers import optimization

    return optimization


def _opt(lrs=(LR,)):
    groups = [{"params": [torch.zeros(2, requires_grad=True)], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def _run(make, n_steps, lrs=(LR,)):
    """LRs of every group at steps 0..n_steps-1 for the scheduler that make(optimizer) returns."""
    opt = _opt(lrs)
    sched = make(opt)
    out = []
    for i in range(n_steps):
        out.append([g["lr"] for g in opt.param_groups])
        if i < n_steps - 1:
            opt.step()
            sched.step()
    return out


def _assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15), f"step {step}: ours {a}, transformers {b}"


def _hf_call(hf, name, opt, w, t, num_cycles=None, power=1.0, lr_end=1e-7):
    if name == "constant":
        return hf.get_constant_schedule(opt)
    if name == "constant_with_warmup":
        return hf.get_constant_schedule_with_warmup(opt, w)
    if name == "linear":
        return hf.get_linear_schedule_with_warmup(opt, w, t)
    if name == "cosine":
        kw = {} if num_cycles is None else {"num_cycles": num_cycles}
        return hf.get_cosine_schedule_with_warmup(opt, w, t, **kw)
    if name == "cosine_with_restarts":
        kw = {} if num_cycles is None else {"num_cycles": num_cycles}
        return hf.get_cosine_with_hard_restarts_schedule_with_warmup(opt, w, t, **kw)
    return hf.get_polynomial_decay_schedule_with_warmup(opt, w, t, lr_end=lr_end, power=power)


def _compare(hf, name, w, t, lrs=(LR,), **kw):
    ours_w = 0 if name == "constant" else w
    n = t + EXTRA + 1
    if name == "polynomial" and w == t:
        n = t  # transformers divides by zero at step t (decay of length 0): checked separately below
    ours = _run(lambda o: make_scheduler(o, name, warmup_steps=ours_w, total_steps=t, **kw), n, lrs)
    theirs = _run(lambda o: _hf_call(hf, name, o, w, t, **kw), n, lrs)
    _assert_same(ours, theirs)
    return ours


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("warmup,total", CASES)
def test_matches_transformers_every_step(hf, name, warmup, total):
    lrs = _compare(hf, name, warmup, total)
    if name != "constant" and warmup > 0:
        assert lrs[0] == [0.0]  # the warmup starts at 0


@pytest.mark.parametrize("num_cycles", [0.25, 0.5, 1.0, 1.5, 3])
@pytest.mark.parametrize("warmup,total", [(0, 12), (4, 20), (6, 6)])
def test_cosine_num_cycles(hf, num_cycles, warmup, total):
    _compare(hf, "cosine", warmup, total, num_cycles=num_cycles)


@pytest.mark.parametrize("num_cycles", [1, 2, 3, 5])
@pytest.mark.parametrize("warmup,total", [(0, 12), (4, 20)])
def test_cosine_restarts_num_cycles(hf, num_cycles, warmup, total):
    lrs = _compare(hf, "cosine_with_restarts", warmup, total, num_cycles=num_cycles)
    jumps = sum(b[0] > a[0] + 1e-12 for a, b in zip(lrs[warmup:total], lrs[warmup + 1:total]))
    assert jumps == num_cycles - 1  # restarts inside the decay phase (the warmup rise is excluded)


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("lr_end", [1e-7, 0.0, 0.01])
def test_polynomial_power_and_lr_end(hf, power, lr_end):
    lrs = _compare(hf, "polynomial", 3, 15, power=power, lr_end=lr_end)
    assert lrs[15][0] == pytest.approx(lr_end, abs=1e-15) and lrs[-1][0] == pytest.approx(lr_end, abs=1e-15)


def test_polynomial_warmup_equals_total_reaches_lr_end(hf):
    lrs = _run(lambda o: make_scheduler(o, "polynomial", warmup_steps=4, total_steps=4, lr_end=1e-3), 10)
    assert [r[0] for r in lrs[:4]] == pytest.approx([0.0, 0.025, 0.05, 0.075])
    assert all(r[0] == pytest.approx(1e-3) for r in lrs[4:])


@pytest.mark.parametrize("name", [n for n in SCHEDULE_NAMES if n != "polynomial"])
def test_two_param_groups_match_transformers(hf, name):
    _compare(hf, name, 3, 12, lrs=(0.1, 0.003))


def test_polynomial_lr_end_is_absolute_per_group(hf):
    """Each group decays from its own LR to the absolute lr_end (as transformers does for a lone group)."""
    lrs2 = (0.1, 0.003)
    ours = _run(lambda o: make_scheduler(o, "polynomial", warmup_steps=3, total_steps=12, lr_end=1e-4, power=2.0),
                18, lrs2)
    for g, lr in enumerate(lrs2):
        theirs = _run(lambda o: hf.get_polynomial_decay_schedule_with_warmup(o, 3, 12, lr_end=1e-4, power=2.0),
                      18, (lr,))
        _assert_same([r[g] for r in ours], [r[0] for r in theirs])
    assert ours[12] == pytest.approx([1e-4, 1e-4])


def test_pure_multipliers_by_hand():
    assert warmup_cosine_multiplier(0, 4, 20) == 0.0
    assert warmup_cosine_multiplier(2, 4, 20) == 0.5
    assert warmup_cosine_multiplier(4, 4, 20) == 1.0
    assert warmup_cosine_multiplier(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine_multiplier(20, 4, 20) == pytest.approx(0.0, abs=1e-15)
    assert warmup_cosine_multiplier(8, 4, 20) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert warmup_cosine_multiplier(8, 0, 16, num_cycles=1.0) == pytest.approx(0.0, abs=1e-15)
    assert warmup_linear_multiplier(15, 5, 25) == 0.5
    assert warmup_linear_multiplier(30, 5, 25) == 0.0


def test_pure_cosine_equals_transformers_lambda(hf):
    for w, t in [(0, 10), (3, 17), (5, 5)]:
        for c in (0.5, 1.0, 2.0):
            opt = _opt()
            sched = hf.get_cosine_schedule_with_warmup(opt, w, t, num_cycles=c)
            for s in range(t + 4):
                assert warmup_cosine_multiplier(s, w, t, c) == pytest.approx(sched.lr_lambdas[0](s), abs=1e-15)


def test_schedule_lrs_and_state_dict_resume():
    kw = {"warmup_steps": 2, "total_steps": 10}
    full = schedule_lrs("cosine", 10, lr=0.5, **kw)
    assert full[0] == 0.0 and max(full) == 0.5 and full[2] == 0.5
    opt = _opt((0.5,))
    sched = make_scheduler(opt, "cosine", **kw)
    for _ in range(4):
        opt.step()
        sched.step()
    state_o, state_s = opt.state_dict(), sched.state_dict()
    opt2 = _opt((0.5,))
    sched2 = make_scheduler(opt2, "cosine", **kw)
    opt2.load_state_dict(state_o)
    sched2.load_state_dict(state_s)
    assert opt2.param_groups[0]["lr"] == full[4]
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == full[5]


def test_returns_lr_scheduler_and_constant_ignores_total():
    s = make_scheduler(_opt(), "constant", total_steps=50)
    assert isinstance(s, torch.optim.lr_scheduler.LRScheduler)
    s2 = make_scheduler(_opt(), "constant_with_warmup", warmup_steps=3)  # total_steps optional
    assert s2.get_last_lr() == [0.0]


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"name": "cosine_warmup", "total_steps": 10}, ValueError, r"name must be one of .*cosine_with_restarts"),
    ({"name": "linear", "warmup_steps": -1, "total_steps": 10}, ValueError, r"warmup_steps must be >= 0, got -1"),
    ({"name": "linear", "warmup_steps": 11, "total_steps": 10}, ValueError, r"warmup_steps must be <= total_steps"),
    ({"name": "cosine"}, ValueError, r"total_steps is required for 'cosine'"),
    ({"name": "polynomial"}, ValueError, r"total_steps is required"),
    ({"name": "linear", "total_steps": 0}, ValueError, r"total_steps must be > 0, got 0"),
    ({"name": "cosine", "total_steps": -5}, ValueError, r"total_steps must be > 0, got -5"),
    ({"name": "cosine", "total_steps": 10, "num_cycles": 0}, ValueError, r"num_cycles must be a number > 0"),
    ({"name": "cosine_with_restarts", "total_steps": 10, "num_cycles": -1}, ValueError, r"num_cycles must be"),
    ({"name": "linear", "total_steps": 10, "num_cycles": 2}, ValueError, r"num_cycles only applies"),
    ({"name": "polynomial", "total_steps": 10, "power": 0}, ValueError, r"power must be a number > 0, got 0"),
    ({"name": "polynomial", "total_steps": 10, "power": -1.0}, ValueError, r"power must be"),
    ({"name": "polynomial", "total_steps": 10, "lr_end": 0.1}, ValueError, r"lr_end must be smaller .*lr=0.1"),
    ({"name": "polynomial", "total_steps": 10, "lr_end": -1e-3}, ValueError, r"lr_end must be a number >= 0"),
    ({"name": "constant", "warmup_steps": 5}, ValueError, r"constant_with_warmup"),
    ({"name": "linear", "warmup_steps": 1.5, "total_steps": 10}, TypeError, r"warmup_steps must be an int"),
    ({"name": "linear", "total_steps": 10.0}, TypeError, r"total_steps must be an int"),
])
def test_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_scheduler(_opt(), **kwargs)


def test_polynomial_lr_end_checked_for_every_group():
    with pytest.raises(ValueError, match=r"param group 1"):
        make_scheduler(_opt((0.1, 1e-8)), "polynomial", total_steps=10)


def test_not_an_optimizer():
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, got list"):
        make_scheduler([torch.zeros(1)], "linear", total_steps=10)
