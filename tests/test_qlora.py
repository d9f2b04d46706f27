"""NF4 + double quantization against bitsandbytes bit for bit; Linear4bit under a LoRALinear; the bytes it stores."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from course_lib import qlora as Q
from course_lib.lora import LoRALinear, add_lora

SHAPES = [(64,), (7,), (1,), (128, 64), (100, 37), (3, 1000), (33, 65), (256, 257), (12293,)]


def _weight(shape, dtype, seed, zeros=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * (0.02 + 3 * torch.rand((), generator=g))
    if zeros:  # an all-zero block and a few exact zeros
        flat = w.view(-1)
        flat[: min(64, flat.numel())] = 0
    return w.to(dtype)


def _bnb():
    bnb = pytest.importorskip("bitsandbytes.functional")
    return bnb


@pytest.fixture(autouse=True)
def _eager_oracle():
    """bitsandbytes torch.compiles its fallback dequantization (odd shapes): 30 s of compiling per new shape
    on CPU for an oracle that runs once. Eager mode gives the same numbers."""
    torch.compiler.set_stance("force_eager")
    yield
    torch.compiler.set_stance("default")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bit_exact_against_bitsandbytes(shape, dtype, seed):
    """Packed codes, 8-bit absmax codes, their scales and offset, and the dequantized weight: equal bits."""
    bnb = _bnb()
    w = _weight(shape, dtype, seed, zeros=seed == 2)
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = bnb.dequantize_4bit(packed, state)
    q = Q.quantize_nf4(w)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)                  # uint8 codes of absmax - offset
    assert torch.equal(q.absmax_scale, state.state2.absmax)     # fp32 scale per 256 absmax
    assert torch.equal(q.offset, state.offset)
    assert state.state2.blocksize == q.stats_blocksize == 256
    out = Q.dequantize_nf4(q)
    assert out.shape == w.shape and out.dtype == dtype
    assert torch.equal(out.reshape(-1), ref.reshape(-1))        # bnb returns a 1-D input as (1, n)


def test_code_books_match_bitsandbytes():
    bnb = _bnb()
    assert torch.equal(Q.NF4_CODE, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(Q.dynamic_map(), bnb.create_dynamic_map())


@pytest.mark.parametrize("n", [5, 256, 1000, 3000])
def test_8bit_blockwise_matches_bitsandbytes(n):
    bnb = _bnb()
    x = _weight((n,), torch.float32, n) * 0.3
    codes, state = bnb.quantize_blockwise(x, blocksize=256)
    mine, absmax = Q.quantize_blockwise_8bit(x, 256)
    assert torch.equal(mine, codes) and torch.equal(absmax, state.absmax)
    assert torch.equal(Q.dequantize_blockwise_8bit(mine, absmax, 256), bnb.dequantize_blockwise(codes, state))


def test_nf4_code_book_and_rounding():
    """16 sorted values, exact -1, 0, 1; every value a block can take maps to the nearest code."""
    code = Q.NF4_CODE
    assert code.numel() == 16 and torch.all(code[1:] > code[:-1])
    assert code[0] == -1 and code[7] == 0 and code[15] == 1
    block = torch.linspace(-2, 2, 64)
    codes, absmax = Q.nf4_quantize_block(block)
    assert codes.dtype == torch.uint8 and absmax == 2
    s = block / absmax
    nearest = (s[:, None] - code[None, :]).abs().argmin(dim=1)
    assert torch.equal(codes.long(), nearest)
    # the block's own absmax is represented exactly (code 0 or 15)
    assert codes[0] == 0 and codes[-1] == 15


def test_nf4_quantize_block_agrees_with_the_tensor_quantizer():
    w = _weight((64,), torch.float32, 5)
    codes, absmax = Q.nf4_quantize_block(w)
    q = Q.quantize_nf4(w, double_quant=False)
    unpacked = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1)
    assert torch.equal(codes, unpacked) and torch.equal(absmax, q.absmax[0])


def test_packing_order_and_odd_padding():
    w = torch.tensor([-1.0, 1.0, 0.0])  # codes 0, 15, 7 and a padded 7
    q = Q.quantize_nf4(w, double_quant=False)
    assert q.packed.tolist() == [0x0F, 0x77]
    assert torch.equal(Q.dequantize_nf4(q), w)


@pytest.mark.parametrize("shape", [(64, 64), (100, 37), (5,)])
def test_error_is_bounded_by_half_the_largest_code_gap(shape):
    """|w - deq(w)| <= absmax * (max gap / 2) per block, plus the 8-bit absmax error."""
    w = _weight(shape, torch.float32, 3)
    q = Q.quantize_nf4(w, double_quant=False)
    err = (Q.dequantize_nf4(q) - w).abs().reshape(-1)
    half_gap = float((Q.NF4_CODE[1:] - Q.NF4_CODE[:-1]).max()) / 2
    bound = q.absmax.repeat_interleave(64)[: w.numel()] * half_gap
    assert torch.all(err <= bound + 1e-6)


def test_bytes_measured_vs_predicted():
    assert Q.predicted_bits_per_param() == pytest.approx(4.127, abs=5e-4)
    assert Q.predicted_bits_per_param(double_quant=False) == 4.5
    for shape in [(4096, 4096), (100, 37), (7,), (12293,)]:
        q = Q.quantize_nf4(torch.randn(*shape))
        n = math.prod(shape)
        assert q.nbytes == Q.nf4_nbytes(n)
        assert Q.quantize_nf4(torch.randn(*shape), double_quant=False).nbytes == Q.nf4_nbytes(n, double_quant=False)
    big = 4096 * 4096
    assert Q.nf4_nbytes(big) * 8 / big == pytest.approx(Q.predicted_bits_per_param(), rel=1e-3)


@pytest.mark.parametrize("bad, err, match", [
    (torch.zeros(0), ValueError, "empty"),
    (torch.tensor([1.0, float("nan")]), ValueError, "inf or nan"),
    (torch.ones(4, dtype=torch.int64), TypeError, "float32, bfloat16 or float16"),
    ([1.0, 2.0], TypeError, "torch.Tensor"),
])
def test_bad_weights_raise_clear_errors(bad, err, match):
    with pytest.raises(err, match=match):
        Q.quantize_nf4(bad)


def test_bad_arguments_raise_clear_errors():
    w = torch.randn(64)
    with pytest.raises(ValueError, match="blocksize must be an even int"):
        Q.quantize_nf4(w, blocksize=63)
    with pytest.raises(ValueError, match="stats_blocksize"):
        Q.quantize_nf4(w, stats_blocksize=0)
    with pytest.raises(ValueError, match="block must be 1-D"):
        Q.nf4_quantize_block(torch.randn(2, 32))
    with pytest.raises(TypeError, match="NF4Weight"):
        Q.dequantize_nf4(w)
    with pytest.raises(ValueError, match="numel"):
        Q.nf4_nbytes(0)
    with pytest.raises(TypeError, match="plain nn.Linear"):
        Q.Linear4bit(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="already a Linear4bit"):
        Q.Linear4bit(Q.Linear4bit(nn.Linear(8, 8)))
    with pytest.raises(ValueError, match=r"shape \(\*, 8\)"):
        Q.Linear4bit(nn.Linear(8, 4))(torch.randn(3, 5))


def test_linear4bit_forward_is_linear_with_the_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = Q.Linear4bit(lin)
    x = torch.randn(2, 5, 96)
    w = Q.dequantize_nf4(Q.quantize_nf4(lin.weight))
    assert torch.equal(q.weight, w) and q.weight.shape == (40, 96)
    assert torch.equal(q(x), F.linear(x, w, lin.bias))
    assert (q(x) - lin(x)).abs().max() < 0.1 * lin(x).abs().max()
    assert isinstance(q, nn.Linear) and not any(p.requires_grad for p in q.parameters())
    assert {n for n, _ in q.named_buffers()} == {"packed", "absmax", "absmax_scale", "absmax_offset"}
    assert q.nbytes == Q.nf4_nbytes(96 * 40)
    state = q.state_dict()
    clone = Q.Linear4bit(nn.Linear(96, 40))
    clone.load_state_dict(state)
    assert torch.equal(clone(x), q(x))


def test_lora_on_a_4bit_base_trains_only_the_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    names = Q.quantize_model_4bit(model, ["0"])
    assert names == ["0"] and isinstance(model[0], Q.Linear4bit)
    add_lora(model, ["0"], r=4, alpha=8, train_modules=("2",))
    assert isinstance(model[0], LoRALinear) and isinstance(model[0].base, Q.Linear4bit)
    before = {n: b.clone() for n, b in model.named_buffers()}
    out0 = model(x)
    model[0].lora_B.data.normal_()
    F.cross_entropy(model(x), y).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "2.weight", "2.bias"}
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert model[0].base.bias.grad is None
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())
    assert out0.shape == (16, 10)
    assert Q.linear4bit_layers(model) == {"0.base": model[0].base}


def test_quantize_model_4bit_errors():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    with pytest.raises(ValueError, match="target_modules is empty"):
        Q.quantize_model_4bit(model, [])
    with pytest.raises(ValueError, match="matches no module"):
        Q.quantize_model_4bit(model, ["q_proj"])
    with pytest.raises(TypeError, match="only nn.Linear"):
        Q.quantize_model_4bit(model, ["1"])
    Q.quantize_model_4bit(model, "0")
    with pytest.raises(TypeError, match="already a Linear4bit"):
        Q.quantize_model_4bit(model, "0")
    lora_model = nn.Sequential(nn.Linear(8, 8))
    add_lora(lora_model, ["0"], r=2, alpha=2)
    with pytest.raises(TypeError, match="before add_lora"):
        Q.quantize_model_4bit(lora_model, ["0"])


def test_merging_lora_into_a_4bit_base_is_refused():
    """The 4-bit base's ``weight`` is a fresh dequantized tensor: a merge into it would be silently lost."""
    torch.manual_seed(0)
    layer = LoRALinear(Q.Linear4bit(nn.Linear(64, 32)), r=4, alpha=8)
    with pytest.raises(RuntimeError, match="quantized"):
        layer.merge()
    assert not layer.merged
