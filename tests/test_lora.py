"""LoRALinear against the math and against peft's LoRA layer; add_lora / state dict / merge helpers."""
import copy
import math

import pytest
import torch
from torch import nn

from course_lib.lora import (
    LoRALinear,
    add_lora,
    load_lora_state_dict,
    lora_layers,
    lora_parameter_count,
    lora_state_dict,
    merge_lora,
)


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.xq_proj = nn.Linear(d, d)  # must not match "q_proj"

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * self.k_proj(x).sigmoid() + self.v_proj(x) + self.xq_proj(x))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = Attn(d)
        self.up_proj, self.down_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.down_proj(torch.relu(self.up_proj(x)))


class TinyModel(nn.Module):
    def __init__(self, d=8, n_blocks=2, n_classes=3):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.head = nn.Linear(d, n_classes)

    def forward(self, x):  # x: (batch, tokens, 4)
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyModel(**kw)


def nonzero_B(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype))
    return layer


# ---------------------------------------------------------------- LoRALinear


def test_initial_output_equals_base_and_A_is_linear_init():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    torch.manual_seed(123)
    layer = LoRALinear(base, r=4, alpha=8)
    torch.manual_seed(123)
    expected_A = torch.empty(4, 7)
    nn.init.kaiming_uniform_(expected_A, a=math.sqrt(5))
    assert torch.equal(layer.lora_A, expected_A)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(7) and layer.lora_A.abs().max() > 0
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_B.shape == (5, 4)
    assert layer.scaling == 2.0 and layer.r == 4 and layer.alpha == 8 and layer.base is base
    x = torch.randn(3, 2, 7)
    assert torch.equal(layer(x), base(x))


def test_output_matches_formula_for_any_leading_shape():
    torch.manual_seed(0)
    layer = nonzero_B(LoRALinear(nn.Linear(6, 4).double(), r=2, alpha=3))
    W, b, A, B = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B
    for shape in [(6,), (5, 6), (2, 3, 6), (2, 1, 3, 6)]:
        x = torch.randn(shape, dtype=torch.float64)
        expected = x @ W.T + b + (x @ A.T @ B.T) * 3 / 2
        assert layer(x).shape == shape[:-1] + (4,)
        torch.testing.assert_close(layer(x), expected)
    x = torch.randn(6, 3, dtype=torch.float64).T  # non-contiguous input
    torch.testing.assert_close(layer(x), x @ W.T + b + (x @ A.T @ B.T) * 1.5)


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    layer = nonzero_B(LoRALinear(nn.Linear(6, 4), r=2, alpha=2, dropout=0.5))
    x = torch.randn(8, 6)
    expected = layer.base(x) + x @ layer.lora_A.T @ layer.lora_B.T
    assert not torch.allclose(layer(x), expected)  # training mode: half of x dropped on the adapter path
    layer.eval()
    torch.testing.assert_close(layer(x), expected)


def test_base_frozen_and_only_adapter_gets_gradients():
    torch.manual_seed(0)
    layer = nonzero_B(LoRALinear(nn.Linear(6, 4), r=2, alpha=2))
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    layer(torch.randn(3, 6)).square().sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_matches_peft_outputs_gradients_and_merge(dropout):
    peft = pytest.importorskip("peft")

    class One(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    base = nn.Linear(10, 7).double()
    ours = nonzero_B(LoRALinear(copy.deepcopy(base), r=3, alpha=5, dropout=dropout))
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["proj"], lora_dropout=dropout, init_lora_weights=False)
    ref_model = peft.get_peft_model(One(copy.deepcopy(base)), cfg)
    ref = ref_model.base_model.model.proj
    ref_A, ref_B = ref.lora_A["default"].weight, ref.lora_B["default"].weight
    with torch.no_grad():
        ref_A.copy_(ours.lora_A)
        ref_B.copy_(ours.lora_B)
    assert ref.scaling["default"] == pytest.approx(ours.scaling)

    x = torch.randn(2, 5, 10, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    upstream = torch.randn(2, 5, 7, dtype=torch.float64)
    torch.manual_seed(7)  # same dropout mask for both (each draws one mask of x's shape)
    y_ours = ours(x1)
    torch.manual_seed(7)
    y_ref = ref_model(x2)
    assert not torch.equal(y_ours, base(x))  # the adapter path contributes
    torch.testing.assert_close(y_ours, y_ref)
    (y_ours * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(ours.lora_A.grad, ref_A.grad)
    torch.testing.assert_close(ours.lora_B.grad, ref_B.grad)
    torch.testing.assert_close(x1.grad, x2.grad)

    ours.merge()
    ref.merge()
    torch.testing.assert_close(ours.base.weight, ref.base_layer.weight)
    assert not torch.allclose(ours.base.weight, base.weight)


def test_merge_unmerge_round_trip_and_rules():
    torch.manual_seed(0)
    layer = nonzero_B(LoRALinear(nn.Linear(6, 4), r=2, alpha=4))
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(3, 2, 6)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, w0 + 2 * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(layer(x), y)
    merged_w = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.lora_A.zero_()  # merged: forward is base only, the adapter is not applied a second time
    torch.testing.assert_close(layer(x), y)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    torch.testing.assert_close(layer.base.weight, merged_w)  # the refused merge changed nothing
    layer.unmerge()  # subtracts the current update, which is now zero
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, merged_w)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()

    layer = nonzero_B(LoRALinear(nn.Linear(6, 4), r=2, alpha=4))
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0)
    assert "r=2" in repr(layer) and "merged=False" in repr(layer)


def test_dtype_device_and_autocast_follow_base():
    layer = LoRALinear(nn.Linear(6, 4, dtype=torch.float64), r=2, alpha=2)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    with torch.device("meta"):
        meta = LoRALinear(nn.Linear(4096, 4096), r=8, alpha=16)
    assert meta.lora_A.is_meta and meta.lora_A.shape == (8, 4096)
    layer = nonzero_B(LoRALinear(nn.Linear(6, 4), r=2, alpha=2))
    x = torch.randn(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.05, rtol=0.05)


def test_layer_argument_errors():
    base = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="r must be >= 1, got 0"):
        LoRALinear(base, r=0, alpha=1)
    with pytest.raises(TypeError, match="r must be an int"):
        LoRALinear(base, r=2.0, alpha=1)
    with pytest.raises(ValueError, match="alpha must be a number > 0"):
        LoRALinear(base, r=2, alpha=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRALinear(base, r=2, alpha=2, dropout=1.0)
    with pytest.raises(TypeError, match="base must be an nn.Linear, got Conv1d"):
        LoRALinear(nn.Conv1d(4, 3, 1), r=2, alpha=2)
    with pytest.raises(TypeError, match="already a LoRALinear"):
        LoRALinear(LoRALinear(base, r=2, alpha=2), r=2, alpha=2)
    with pytest.raises(ValueError, match=r"x must have shape \(\*, 4\), got \(2, 6\)"):
        LoRALinear(base, r=2, alpha=2)(torch.randn(2, 6))


def test_parameter_count():
    assert lora_parameter_count(12288, 12288, 8) == 8 * 2 * 12288
    layer = LoRALinear(nn.Linear(10, 7), r=3, alpha=3)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == lora_parameter_count(10, 7, 3)
    with pytest.raises(ValueError, match="r must be an int >= 1, got 0"):
        lora_parameter_count(10, 7, 0)


# ---------------------------------------------------------------- add_lora and friends


def test_add_lora_wraps_targets_and_freezes_the_rest():
    model = make_model()
    x = torch.randn(2, 5, 4)
    y0 = model(x)
    names = add_lora(model, ["q_proj", "v_proj"], r=2, alpha=4, train_modules=["head"])
    assert names == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    assert list(lora_layers(model)) == names
    assert isinstance(model.blocks[0].attn.xq_proj, nn.Linear)  # suffix match on whole name components
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_{ab}" for n in names for ab in "AB"} | {"head.weight", "head.bias"}
    assert trainable == expected
    torch.testing.assert_close(model(x), y0)  # B = 0: the adapted model starts at the pretrained one
    assert add_lora(make_model(), "attn.o_proj", r=1, alpha=1) == ["blocks.0.attn.o_proj", "blocks.1.attn.o_proj"]


def test_training_changes_only_adapter_and_head():
    model = make_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, ["q_proj", "v_proj", "up_proj"], r=2, alpha=4, train_modules="head")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        if name not in params:  # a wrapped Linear: its weight now lives in `.base`
            module, leaf = name.rsplit(".", 1)
            name = f"{module}.base.{leaf}"
        changed = not torch.equal(params[name], before)
        assert changed == name.startswith("head"), name
    assert params["blocks.1.attn.q_proj.lora_B"].abs().sum() > 0


def test_add_lora_errors_leave_model_unchanged():
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    cases = [
        (dict(target_modules=["q_proj"], r=0, alpha=1), ValueError, "r must be >= 1"),
        (dict(target_modules=["q_proj"], r=2, alpha=-1), ValueError, "alpha must be a number > 0"),
        (dict(target_modules=[], r=2, alpha=2), ValueError, "target_modules is empty"),
        (dict(target_modules=["q_proj", "qproj"], r=2, alpha=2), ValueError, r"'qproj' matches no module.*k_proj"),
        (dict(target_modules=["q_proj"], r=2, alpha=2, train_modules=["classifier"]), ValueError,
         "train_modules entry 'classifier' matches no module"),
        (dict(target_modules=["attn"], r=2, alpha=2), TypeError, "'blocks.0.attn', a Attn: LoRALinear wraps nn.Linear"),
        (dict(target_modules=["norm"], r=2, alpha=2), TypeError, "a LayerNorm"),
        (dict(target_modules=["q_proj"], r=2, alpha=2, train_modules=["blocks.0"]), ValueError, "overlaps LoRA target"),
    ]
    for kwargs, err, msg in cases:
        with pytest.raises(err, match=msg):
            add_lora(model, **kwargs)
        assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    add_lora(model, ["q_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(model, ["q_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(model, ["v_proj"], r=2, alpha=2)


def test_state_dict_round_trip_and_strict_errors():
    model = make_model()
    add_lora(model, ["q_proj", "v_proj"], r=2, alpha=4, train_modules=["head"])
    for layer in lora_layers(model).values():
        nonzero_B(layer)
    with torch.no_grad():
        model.head.weight.mul_(3)
    state = lora_state_dict(model)
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.attn.q_proj.base.weight" not in state and "head.weight" in state
    x = torch.randn(2, 5, 4)

    fresh = make_model()  # same pretrained weights, new adapter init
    add_lora(fresh, ["q_proj", "v_proj"], r=2, alpha=4, train_modules=["head"])
    assert not torch.allclose(fresh(x), model(x))
    load_lora_state_dict(fresh, state)
    torch.testing.assert_close(fresh(x), model(x))

    with pytest.raises(ValueError, match=r"missing keys \['head.weight'\]"):
        load_lora_state_dict(fresh, {k: v for k, v in state.items() if k != "head.weight"})
    with pytest.raises(ValueError, match="unexpected keys.*extra"):
        load_lora_state_dict(fresh, {**state, "extra": torch.zeros(1)})
    other_r = make_model()
    add_lora(other_r, ["q_proj", "v_proj"], r=3, alpha=4, train_modules=["head"])
    with pytest.raises(ValueError, match="another rank"):
        load_lora_state_dict(other_r, state)
    with pytest.raises(ValueError, match="no LoRALinear"):
        lora_state_dict(make_model())


def test_merge_lora_gives_plain_model_with_same_outputs():
    model = make_model()
    names = add_lora(model, ["q_proj", "k_proj", "down_proj"], r=2, alpha=4)
    for layer in lora_layers(model).values():
        nonzero_B(layer)
    x = torch.randn(2, 5, 4)
    y = model(x)
    model.blocks[1].attn.k_proj.merge()  # already merged layers are fine too
    assert merge_lora(model) is model
    assert not lora_layers(model) and not any("lora_" in n for n, _ in model.named_parameters())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    torch.testing.assert_close(model(x), y)
    with pytest.raises(ValueError, match="no LoRALinear layers to merge"):
        merge_lora(model)
