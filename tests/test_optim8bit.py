"""Tests of course_lib.optim8bit: the dynamic map, block-wise quantization and the 8-bit AdamW."""
import copy
import io
import math

import pytest
import torch

from course_lib import optim8bit
from course_lib.optim8bit import AdamW8bit, dequantize_blockwise, dynamic_map, quantize_blockwise


def _bnb():
    return pytest.importorskip("bitsandbytes")


# --- the code map ------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_shape_order_and_range(signed):
    code = dynamic_map(signed)
    assert code.shape == (256,) and code.dtype == torch.float32
    assert bool((code[1:] > code[:-1]).all()), "strictly increasing: 256 distinct codes"
    assert (code == 0).sum() == 1 and code[-1] == 1.0
    if signed:  # the sign bit costs one code: the most negative value is -(1 - 0.9/128), not -1
        assert -1.0 <= code[0].item() <= -0.99
        assert (code < 0).sum() == 127
    else:
        assert code[0] == 0.0
    # non-linear: relative precision near 0 is far finer than a linear 8-bit map's 1/127
    small = code[(code > 0) & (code < 1e-3)]
    assert small.numel() >= (10 if signed else 20) and small.min() < 1e-6


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(dynamic_map(signed), functional.create_dynamic_map(signed=signed))


# --- block-wise quantization -------------------------------------------------------------------------
def _blocky(n, block_size, seed=0):
    """Values whose scale changes from block to block (1e-6 .. 1e3), one all-zero block, a short tail."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    scales = 10.0 ** torch.randint(-6, 4, (-(-n // block_size),), generator=g).float()
    x *= scales.repeat_interleave(block_size)[:n]
    x[block_size : 2 * block_size] = 0.0
    return x


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_roundtrip_error_is_half_the_largest_gap(signed):
    bs, n = 64, 64 * 20 + 37
    x = _blocky(n, bs).view(-1, n)
    x = x if signed else x.abs()
    code = dynamic_map(signed)
    codes, absmax = quantize_blockwise(x, code, bs)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-n // bs),)
    blocks = torch.nn.functional.pad(x.flatten(), (0, absmax.numel() * bs - n)).view(-1, bs)
    torch.testing.assert_close(absmax, blocks.abs().amax(1), rtol=0, atol=0)
    y = dequantize_blockwise(codes, absmax, code, x.shape, block_size=bs)
    assert y.shape == x.shape
    err = torch.nn.functional.pad((y - x).abs().flatten(), (0, absmax.numel() * bs - n)).view(-1, bs).amax(1)
    max_gap = (code[1:] - code[:-1]).max()
    assert bool((err <= absmax * max_gap / 2 * (1 + 1e-5)).all())
    assert bool((y.flatten()[bs : 2 * bs] == 0).all()), "an all-zero block comes back exactly zero"
    # and each code is the nearest one (brute force over the 256 entries)
    normed = x.flatten() / absmax.clamp_min(1e-38).repeat_interleave(bs)[:n]
    dist = (normed[:, None] - code[None, :]).abs()
    chosen = dist.gather(1, codes.long()[:, None]).squeeze(1)
    assert bool((chosen <= dist.min(1).values * (1 + 1e-6) + 1e-12).all())


def test_quantize_agrees_with_bitsandbytes():
    _bnb()
    n = 256 * 64 + 100
    x = _blocky(n, 256, seed=1)
    for signed, values in ((True, x), (False, x.abs())):
        code = dynamic_map(signed)
        codes, absmax = quantize_blockwise(values, code, 256)
        ref_codes, ref_absmax = torch.ops.bitsandbytes.quantize_blockwise(values, code, 256)
        torch.testing.assert_close(absmax, ref_absmax, rtol=0, atol=0)
        ours = dequantize_blockwise(codes, absmax, code, (n,))
        theirs = dequantize_blockwise(ref_codes, ref_absmax, code, (n,))
        assert bool(((ours - values).abs() <= (theirs - values).abs() * (1 + 1e-6)).all()), "ours is nearest"
        # bitsandbytes' CPU search is exact-nearest except next to midpoints and below ~1.5e-5 * absmax
        normed = values / absmax.clamp_min(1e-38).repeat_interleave(256)[:n]
        big = normed.abs() > 1e-4
        diff = (codes.long() - ref_codes.flatten().long()).abs()[big]
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99


@pytest.mark.parametrize("signed", [True, False])
def test_fast_nearest_code_equals_bucketize(signed):
    """The optimizer's table lookup (float bits) gives exactly the codes of quantize_blockwise."""
    code = dynamic_map(signed)
    mids = (code[1:] + code[:-1]) / 2
    near = [mids]
    up, down = mids, mids
    for _ in range(3):  # every midpoint and its 3 float neighbours on each side: the hard cases
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        near += [up, down]
    g = torch.Generator().manual_seed(0)
    logs = 10.0 ** (-9 * torch.rand(50_000, generator=g))
    x = torch.cat(near + [code, logs, -logs, torch.rand(50_000, generator=g) * 2 - 1, torch.tensor([0.0, -0.0])])
    x = x.clamp(-1.0, 1.0) if signed else x.abs().clamp(0.0, 1.0)
    bs = 1024  # put 1.0 first in every block: absmax 1, so normalising leaves each value as it is
    x = torch.cat([torch.ones(1), x])
    x = torch.nn.functional.pad(x, (0, -x.numel() % (bs - 1))).view(-1, bs - 1)
    x = torch.cat([torch.ones(x.shape[0], 1), x], 1).flatten()
    ref_codes, ref_absmax = quantize_blockwise(x, code, bs)
    codes = torch.empty_like(ref_codes)
    absmax = torch.empty_like(ref_absmax)
    optim8bit._requantize_(x.clone().view(-1, bs), codes, absmax, optim8bit._tables(signed, x.device))
    assert torch.equal(absmax, ref_absmax)
    if not signed:  # except that a second moment never rounds down to the code of 0.0
        assert bool((codes[x > 0] == ref_codes[x > 0].clamp_min(1)).all())
        ref_codes = ref_codes.clamp_min(1)
    assert torch.equal(codes, ref_codes)


def test_tiny_second_moment_does_not_blow_up_the_step():
    """v below 1.6e-7 * absmax would round to 0, making the step m / eps: it takes the smallest code instead."""
    n = 4096
    grads = torch.full((n,), 1e-5)
    grads[::256] = 1.0  # one large gradient per block: v of the others is 1e-10 of the block's absmax
    p = torch.nn.Parameter(torch.zeros(n))
    opt = AdamW8bit([p], lr=1e-3, weight_decay=0.0, compile=False)
    for _ in range(3):
        p.grad = grads.clone()
        opt.step()
    assert p.abs().max() <= 3 * 1e-3 * 1.01, "no step larger than lr (Adam's bound) per step"


def test_quantize_argument_errors():
    code = dynamic_map(True)
    with pytest.raises(ValueError, match="code_map must be .*256"):
        quantize_blockwise(torch.randn(10), code[:10], 4)
    with pytest.raises(ValueError, match="block_size must be > 0"):
        quantize_blockwise(torch.randn(10), code, 0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        quantize_blockwise(torch.randn(10), code, 2.5)
    codes, absmax = quantize_blockwise(torch.randn(10), code, 4)
    with pytest.raises(ValueError, match="needs 10 codes and 5 absmax values, got 10 and 3"):
        dequantize_blockwise(codes, absmax, code, (10,), block_size=2)


# --- the optimizer -----------------------------------------------------------------------------------
def _regression(opt_factory, steps=200, seed=0):
    """A linear regression (weight 128x64 = 8192 elements, bias 64) plus a 4100-element scaling fit."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=g)
    y = x @ (torch.randn(128, 64, generator=g) / 10) + 0.01 * torch.randn(512, 64, generator=g)
    z, target = torch.randn(4100, generator=g), torch.randn(4100, generator=g)
    weight = torch.nn.Parameter(0.05 * torch.randn(128, 64, generator=g))
    bias = torch.nn.Parameter(torch.zeros(64))
    scale = torch.nn.Parameter(torch.ones(4100))
    opt = opt_factory([weight, bias, scale])
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((x @ weight + bias - y) ** 2).mean() + ((z * scale - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.cat([weight.detach().flatten(), scale.detach()]), losses, opt


def test_tracks_torch_adamw_as_closely_as_bitsandbytes(one_thread):
    bnb = _bnb()
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    ref, ref_losses, _ = _regression(lambda p: torch.optim.AdamW(p, **hp, foreach=False))
    mine, losses, opt = _regression(lambda p: AdamW8bit(p, **hp, block_size=256, compile=False))
    oracle, oracle_losses, _ = _regression(lambda p: bnb.optim.AdamW8bit(p, **hp, min_8bit_size=4096))
    assert "exp_avg_codes" in opt.state[opt.param_groups[0]["params"][0]]  # the test does exercise 8 bits
    dev_mine = ((mine - ref).norm() / ref.norm()).item()
    dev_bnb = ((oracle - ref).norm() / ref.norm()).item()
    assert dev_mine <= 1.5 * dev_bnb + 1e-6, (dev_mine, dev_bnb)
    # on the weight the two 8-bit implementations agree far better than either agrees with fp32 AdamW
    # (on `scale`, whose gradients span many decades per block, bitsandbytes' v floor makes them differ)
    w, w_ref, w_bnb = mine[:8192], ref[:8192], oracle[:8192]
    assert (w - w_bnb).norm() <= 0.25 * (w_bnb - w_ref).norm()
    assert losses[-1] < 0.6 * losses[0]
    assert abs(losses[-1] - oracle_losses[-1]) <= 0.05 * oracle_losses[-1]
    assert abs(losses[-1] - ref_losses[-1]) <= 0.1 * ref_losses[-1]


def test_state_bytes_about_a_quarter_of_fp32_adamw():
    n = 1 << 20
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    opt = AdamW8bit([p], compile=False)
    assert opt.state_bytes() == 0
    opt.step()
    assert opt.state_bytes() == 2 * n + 2 * 4 * (n // 256)  # 2 uint8 codes + 2 fp32 absmax per 256
    assert opt.state_bytes() <= 0.27 * (2 * 4 * n)
    ref = torch.optim.AdamW([p])
    ref.step()
    fp32_bytes = sum(t.numel() * t.element_size() for t in ref.state[p].values() if t.dim() > 0)
    assert opt.state_bytes() <= 0.27 * fp32_bytes


def test_small_tensors_keep_fp32_state_and_match_torch_exactly(one_thread):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    twin = copy.deepcopy(model)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    opt = AdamW8bit(model.parameters(), lr=1e-2, weight_decay=0.1, compile=False)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(30):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
    assert opt.state_bytes() == 2 * 4 * sum(p.numel() for p in model.parameters())


def test_min_8bit_size_and_block_size_decide_the_layout():
    p = torch.nn.Parameter(torch.randn(1000))
    p.grad = torch.randn(1000)
    opt = AdamW8bit([p], min_8bit_size=0, block_size=64, compile=False)
    opt.step()
    state = opt.state[p]
    assert set(state) == {"step", *optim8bit._STATE_8BIT}
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_codes"].shape == (1000,)
    assert state["exp_avg_sq_absmax"].shape == (16,)  # ceil(1000 / 64)
    m = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], dynamic_map(True), (1000,), 64)
    code = dynamic_map(True)  # first step: m = (1 - beta1) g, up to half the largest gap of the map
    bound = state["exp_avg_absmax"].repeat_interleave(64)[:1000] * (code[1:] - code[:-1]).max() / 2
    assert bool(((m - 0.1 * p.grad).abs() <= bound * 1.0001).all())
    assert (m - 0.1 * p.grad).abs().max() > 0, "8 bits cannot hold m exactly"


def test_weight_decay_is_decoupled():
    lr, wd = 0.1, 0.5
    big, small = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(10))
    start = [big.detach().clone(), small.detach().clone()]
    opt = AdamW8bit([big, small], lr=lr, weight_decay=wd, compile=False)
    for _ in range(3):
        big.grad, small.grad = torch.zeros_like(big), torch.zeros_like(small)
        opt.step()
        for s in start:
            s.mul_(1 - lr * wd)
    assert "exp_avg_codes" in opt.state[big] and "exp_avg" in opt.state[small]
    assert torch.equal(big, start[0]) and torch.equal(small, start[1])


def test_state_dict_round_trip_continues_identically():
    def make():
        torch.manual_seed(3)
        return [torch.nn.Parameter(torch.randn(70, 80)), torch.nn.Parameter(torch.randn(30))]

    def train(params, opt, steps, offset=0):
        for k in range(steps):
            for p in params:
                p.grad = torch.cos(p.detach() * (k + offset + 1))
            opt.step()

    params = make()
    opt = AdamW8bit(params, lr=1e-2, compile=False)
    train(params, opt, 4)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert not any(t.numel() == 256 and t.dtype == torch.float32  # no code map copied per parameter
                   for s in saved["opt"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor))
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = AdamW8bit(resumed, lr=1e-2, compile=False)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state_bytes() == opt.state_bytes()
    train(params, opt, 3, offset=4)
    train(resumed, opt2, 3, offset=4)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            other = opt2.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_state_stays_float32_for_bfloat16_parameters():
    p = torch.nn.Parameter(torch.randn(5000, dtype=torch.bfloat16))
    p.grad = torch.randn(5000, dtype=torch.bfloat16)
    before = p.detach().clone()
    opt = AdamW8bit([p], lr=1e-2, compile=False)
    opt.step()
    assert p.dtype == torch.bfloat16 and not torch.equal(p, before)
    opt2 = AdamW8bit([p], lr=1e-2, compile=False)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[p]["exp_avg_absmax"].dtype == torch.float32
    assert opt2.state[p]["exp_avg_codes"].dtype == torch.uint8


def test_eager_chunks_give_the_same_update(monkeypatch):
    results = []
    for chunk in (1 << 20, 512):  # one call, or 10 chunks of 2 blocks with a short tail block
        p = torch.nn.Parameter(torch.linspace(-1, 1, 5000))
        opt = AdamW8bit([p], lr=1e-2, compile=False)
        monkeypatch.setitem(optim8bit.CHUNK, "cpu", chunk)
        for k in range(3):
            p.grad = torch.sin(7 * p.detach() + k)
            opt.step()
        results.append((p.detach().clone(), dict(opt.state[p])))
    assert torch.equal(results[0][0], results[1][0])
    for key in optim8bit._STATE_8BIT:
        assert torch.equal(results[0][1][key], results[1][1][key])


def test_step_details_closure_and_missing_grads():
    used, unused = torch.nn.Parameter(torch.ones(5000)), torch.nn.Parameter(torch.ones(5000))
    opt = AdamW8bit([used, unused], lr=0.0, weight_decay=0.1, compile=False)

    def closure():
        opt.zero_grad()
        loss = (used**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 5000.0
    assert torch.equal(used, torch.ones(5000)), "lr=0 leaves parameters unchanged"
    assert len(opt.state[unused]) == 0 and opt.state[used]["step"] == 1
    assert opt.compiled is False


def test_complex_parameters_update_like_their_real_view():
    data = torch.randn(3000, dtype=torch.complex64)
    z = torch.nn.Parameter(data.clone())
    r = torch.nn.Parameter(torch.view_as_real(data).clone())
    opt_z = AdamW8bit([z], lr=1e-2, compile=False)
    opt_r = AdamW8bit([r], lr=1e-2, compile=False)
    for k in range(3):
        grad = torch.randn(3000, dtype=torch.complex64, generator=torch.Generator().manual_seed(k))
        z.grad, r.grad = grad, torch.view_as_real(grad).clone()
        opt_z.step()
        opt_r.step()
    assert "exp_avg_codes" in opt_z.state[z]  # 6000 real numbers: 8-bit state
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())


def test_compile_choice(monkeypatch):
    monkeypatch.delenv("COURSE_COMPILE", raising=False)
    monkeypatch.setitem(optim8bit._COMPILED, "failed", False)  # as if no compilation had failed yet
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = AdamW8bit([torch.nn.Parameter(torch.zeros(1))])
    assert not auto._wants_compile(cpu) and auto._wants_compile(cuda)
    monkeypatch.setenv("COURSE_COMPILE", "1")
    assert auto._wants_compile(cpu)
    never = AdamW8bit([torch.nn.Parameter(torch.zeros(1))], compile=False)
    assert not never._wants_compile(cuda)
    assert AdamW8bit([torch.nn.Parameter(torch.zeros(1))], compile=True)._wants_compile(cpu)


def test_argument_errors():
    p = [torch.nn.Parameter(torch.randn(3))]
    cases = [
        (dict(lr=-1e-3), "lr must be"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\)"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\] must be in \[0, 1\)"),
        (dict(betas=(0.9,)), "betas must be a pair"),
        (dict(eps=-1e-8), "eps must be >= 0"),
        (dict(weight_decay=-0.01), "weight_decay must be >= 0"),
        (dict(block_size=0), "block_size must be > 0"),
        (dict(min_8bit_size=-1), "min_8bit_size must be"),
        (dict(compile="yes"), "compile must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            AdamW8bit(p, **kwargs)
    with pytest.raises(TypeError, match="block_size must be an int"):
        AdamW8bit(p, block_size=256.0)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients"):
        AdamW8bit(emb.parameters()).step()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile internals (torch.jit)
def test_compiled_update_matches_eager():
    """torch.compile path (about 20 s of compilation on 2 CPU cores); skipped when no compiler works."""
    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 200)), torch.nn.Parameter(torch.randn(5000))]
        opt = AdamW8bit(params, lr=1e-2, compile=compiled)
        for k in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * (k + 1))
            opt.step()
        if compiled and not opt.compiled:
            pytest.skip("torch.compile is not available here")
        results[compiled] = [p.detach().clone() for p in params]
    for a, b in zip(results[False], results[True]):  # fused kernels may round differently: a code may flip
        assert (a - b).abs().max() <= 1e-2 * 3 * 1.01
        assert (a - b).abs().mean() <= 1e-5
    assert math.isfinite(float(results[True][0].sum()))
