"""rsLoRA, DoRA and LoRA+ by hand (course_lib.lora, course_lib.lora_variants) against peft and the math."""
import copy
import math

import pytest
import torch
from torch import nn

from course_lib.lora import LoRALinear, add_lora, lora_layers, lora_scaling, lora_state_dict, merge_lora
from course_lib.lora_variants import DoRALinear, loraplus_param_groups


class Net(nn.Module):
    """Two blocks of q/v projections and an MLP pair, a head: enough for target matching and shapes."""

    def __init__(self, d_in, d, n_classes=3, bias=True):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(d, d, bias=bias),
                                                   "v_proj": nn.Linear(d, d, bias=bias),
                                                   "up_proj": nn.Linear(d, 2 * d, bias=bias),
                                                   "down_proj": nn.Linear(2 * d, d, bias=bias)}) for _ in range(2))
        self.head = nn.Linear(d, n_classes)

    def forward(self, x):  # (batch, tokens, d_in)
        h = self.embed(x)
        for b in self.blocks:
            h = h + b["v_proj"](h) * torch.sigmoid(b["q_proj"](h))
            h = h + b["down_proj"](torch.relu(b["up_proj"](h)))
        return self.head(h.mean(dim=1))


TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
CASES = [  # (seed, d_in, d, r, alpha, bias)
    (0, 5, 8, 1, 2.0, True), (1, 7, 12, 4, 8.0, False), (2, 3, 16, 8, 4.0, True), (3, 6, 10, 3, 5.0, True)]


def _train_B(model, seed):
    """Give every LoRA B (and DoRA magnitude) trained-looking values: at init B = 0 hides most bugs."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype))
            if isinstance(layer, DoRALinear):
                layer.lora_magnitude.mul_(1 + 0.2 * torch.randn(layer.out_features, generator=g, dtype=torch.float64))


def _peft_pair(seed, d_in, d, r, alpha, bias, *, use_rslora, use_dora, dropout=0.0):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    base = Net(d_in, d, bias=bias).double()
    ours = copy.deepcopy(base)
    add_lora(ours, TARGETS, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora)
    _train_B(ours, seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=dropout,
                          use_rslora=use_rslora, use_dora=use_dora)
    ref = peft.get_peft_model(copy.deepcopy(base), cfg)
    ref_layers = {n.removeprefix("base_model.model."): m for n, m in ref.named_modules()
                  if isinstance(m, peft.tuners.lora.Linear)}
    ours_layers = lora_layers(ours)
    assert list(ref_layers) == list(ours_layers)
    with torch.no_grad():
        for name, layer in ours_layers.items():
            theirs = ref_layers[name]
            assert theirs.scaling["default"] == pytest.approx(layer.scaling)
            if use_dora:  # peft initialises the magnitude from the same weight: check, then copy the trained one
                mag = theirs.lora_magnitude_vector["default"].weight
                torch.testing.assert_close(mag, torch.linalg.vector_norm(layer.base.weight, dim=1))
                mag.copy_(layer.lora_magnitude)
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    return base, ours, ref, ours_layers, ref_layers


@pytest.mark.parametrize("use_rslora,use_dora", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("case", CASES)
def test_variants_equal_peft_outputs_gradients_and_merge(case, use_rslora, use_dora):
    seed, d_in, d, r, alpha, bias = case
    base, ours, ref, ours_layers, ref_layers = _peft_pair(seed, d_in, d, r, alpha, bias,
                                                          use_rslora=use_rslora, use_dora=use_dora)
    x = torch.randn(4, 5, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y_ours, y_ref = ours(x), ref(x)
    assert not torch.allclose(y_ours, base(x))  # the adapters contribute
    torch.testing.assert_close(y_ours, y_ref)
    upstream = torch.randn(y_ours.shape, dtype=torch.float64)
    (y_ours * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    for name, layer in ours_layers.items():
        theirs = ref_layers[name]
        torch.testing.assert_close(layer.lora_A.grad, theirs.lora_A["default"].weight.grad)
        torch.testing.assert_close(layer.lora_B.grad, theirs.lora_B["default"].weight.grad)
        if use_dora:
            torch.testing.assert_close(layer.lora_magnitude.grad, theirs.lora_magnitude_vector["default"].weight.grad)
    # merged: our plain model against peft's merge_and_unload, weight by weight and in outputs
    merged_ours = merge_lora(copy.deepcopy(ours))
    merged_ref = ref.merge_and_unload()
    ours_w = dict(merged_ours.named_parameters())
    for name, p in merged_ref.named_parameters():
        torch.testing.assert_close(ours_w[name], p)
    torch.testing.assert_close(merged_ours(x), y_ref)


@pytest.mark.parametrize("use_dora", [False, True])
def test_variants_with_dropout_equal_peft(use_dora):
    base, ours, ref, ours_layers, ref_layers = _peft_pair(5, 4, 8, 2, 4.0, True, use_rslora=True,
                                                          use_dora=use_dora, dropout=0.25)
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    ours.train(), ref.train()
    torch.manual_seed(11)  # the same dropout masks: each layer draws one mask of its input's shape, in order
    y_ours = ours(x)
    torch.manual_seed(11)
    y_ref = ref(x)
    torch.testing.assert_close(y_ours, y_ref)
    y_ours.sum().backward()
    y_ref.sum().backward()
    for name, layer in ours_layers.items():
        torch.testing.assert_close(layer.lora_A.grad, ref_layers[name].lora_A["default"].weight.grad)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_rslora_scaling_and_repr():
    assert lora_scaling(16, 16) == 1.0 and lora_scaling(16, 16, use_rslora=True) == 4.0
    layer = LoRALinear(nn.Linear(4, 3), r=4, alpha=8, use_rslora=True)
    assert layer.scaling == 4.0 and "use_rslora=True" in repr(layer)
    assert "use_rslora" not in repr(LoRALinear(nn.Linear(4, 3), r=4, alpha=8))  # plain LoRA prints as before
    with pytest.raises(TypeError, match="use_rslora"):
        lora_scaling(4, 8, use_rslora="yes")


def test_dora_starts_at_base_detaches_norm_and_round_trips():
    torch.manual_seed(0)
    base = nn.Linear(9, 6).double()
    layer = DoRALinear(copy.deepcopy(base), r=2, alpha=3)
    x = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x))
    torch.testing.assert_close(layer.lora_magnitude, base.weight.norm(dim=1))
    with torch.no_grad():
        layer.lora_B.normal_()
    # the math: W' = m * (W + s B A) / ||W + s B A||_row
    wp = base.weight + layer.scaling * layer.lora_B @ layer.lora_A
    w_dora = layer.lora_magnitude[:, None] * wp / wp.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ w_dora.T + base.bias)
    # the norm is a constant in backward: A's gradient equals the one with the norm frozen by hand
    layer(x).sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_(True)
    n = wp.detach().norm(dim=1)
    y = (layer.lora_magnitude.detach() / n) * (x @ base.weight.T + layer.scaling * (x @ A.T) @ layer.lora_B.detach().T)
    (y + base.bias).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad)
    y_before = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer.base.weight, w_dora.detach())
    torch.testing.assert_close(layer(x), y_before)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, base.weight, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_dora_state_dict_and_trainable_count():
    torch.manual_seed(0)
    model = Net(4, 8)
    add_lora(model, ["q_proj", "v_proj"], r=2, alpha=4, train_modules=("head",), use_dora=True)
    state = lora_state_dict(model)
    assert sum(k.endswith("lora_magnitude") for k in state) == 4
    per_layer = 2 * (8 + 8) + 8  # r (in + out) + out
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * per_layer + 8 * 3 + 3
    with pytest.raises(TypeError, match="use_dora"):
        add_lora(Net(4, 8), ["q_proj"], r=2, alpha=4, use_dora=1)


def test_loraplus_groups_follow_the_paper_and_peft():
    torch.manual_seed(0)
    model = Net(4, 8)
    add_lora(model, TARGETS, r=2, alpha=4, train_modules=("head",))
    groups = loraplus_param_groups(model, lr=2e-4)
    assert [g["lr"] for g in groups] == [2e-4, pytest.approx(16 * 2e-4)]  # ratio 16 by default (the paper)
    b_params = [layer.lora_B for layer in lora_layers(model).values()]
    assert groups[1]["params"] == b_params
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(trainable)
    assert all(any(p is q for q in trainable) for p in groups[0]["params"])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    # peft's create_loraplus_optimizer agrees on every A and B (it also puts 1-D parameters in the fast group)
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer
    ref = peft.get_peft_model(Net(4, 8), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    ref_opt = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)
    names = {id(p): n for n, p in ref.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in ref_opt.param_groups for p in g["params"]}
    assert {n: lr for n, lr in lr_of.items() if "lora_" in n} == {
        n: (16 * 2e-4 if "lora_B" in n else 2e-4) for n in lr_of if "lora_" in n}
    assert loraplus_param_groups(model, lr=1e-3, ratio=1.0)[1]["lr"] == 1e-3  # ratio 1 is plain LoRA


def test_loraplus_errors():
    with pytest.raises(ValueError, match="no LoRA layers"):
        loraplus_param_groups(Net(4, 8), lr=1e-3)
    model = Net(4, 8)
    add_lora(model, ["q_proj"], r=2, alpha=4)
    for kwargs, match in (({"lr": 0}, "lr must"), ({"lr": 1e-3, "ratio": -1}, "ratio must"),
                          ({"lr": 1e-3, "weight_decay": -0.1}, "weight_decay must")):
        with pytest.raises(ValueError, match=match):
            loraplus_param_groups(model, **kwargs)


def test_plain_lora_unchanged_by_the_new_flags():
    torch.manual_seed(0)
    a, b = Net(4, 8), None
    b = copy.deepcopy(a)
    torch.manual_seed(1)
    add_lora(a, TARGETS, r=4, alpha=8)
    torch.manual_seed(1)
    add_lora(b, TARGETS, r=4, alpha=8, use_rslora=False, use_dora=False)
    assert all(type(m) is LoRALinear for m in lora_layers(b).values())
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert math.isclose(lora_layers(a)["blocks.0.q_proj"].scaling, 2.0)
