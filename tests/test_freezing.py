"""freeze / unfreeze by name pattern, unfreeze_top_k, and optimizer param groups (decay vs no-decay, head LR)."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

from course_lib.freezing import freeze, param_groups, trainable_names, unfreeze, unfreeze_top_k


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)  # a norm whose name does not contain "norm"
        self.fc = nn.Linear(d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(torch.relu(self.fc(self.ln(x))))


class Net(nn.Module):
    def __init__(self, d=6, n_blocks=3):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.scale = nn.Parameter(torch.ones(1, d))  # 2-D, decayed unless a rule says otherwise
        self.shift = nn.Parameter(torch.zeros(d))  # 1-D: no decay by shape alone
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.bn = nn.BatchNorm1d(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x) * self.scale + self.shift
        for block in self.blocks:
            x = block(x)
        return self.head(self.bn(x))


def make_net(**kw):
    torch.manual_seed(0)
    return Net(**kw)


def test_freeze_and_unfreeze_by_pattern_return_changed_names():
    net = make_net()
    assert freeze(net, "blocks.1.*") == ["blocks.1.ln.weight", "blocks.1.ln.bias", "blocks.1.fc.weight",
                                          "blocks.1.fc.bias"]
    assert freeze(net, "blocks.1.*") == []  # nothing left to change
    assert freeze(net, ["head", "*.bias"]) == ["embed.bias", "blocks.0.ln.bias", "blocks.0.fc.bias",
                                                "blocks.2.ln.bias", "blocks.2.fc.bias", "bn.bias",
                                                "head.weight", "head.bias"]
    still = trainable_names(net)
    assert freeze(net) == still  # None = every parameter; only those still trainable change
    assert trainable_names(net) == []
    assert unfreeze(net, "blocks.0") == ["blocks.0.ln.weight", "blocks.0.ln.bias", "blocks.0.fc.weight",
                                         "blocks.0.fc.bias"]
    assert set(trainable_names(net)) == {"blocks.0.ln.weight", "blocks.0.ln.bias", "blocks.0.fc.weight",
                                         "blocks.0.fc.bias"}
    assert len(unfreeze(net)) == sum(1 for _ in net.parameters()) - 4
    assert all(p.requires_grad for p in net.parameters())


def test_block_pattern_does_not_match_longer_index():
    net = make_net(n_blocks=12)
    assert all(n.startswith("blocks.1.") for n in freeze(net, "blocks.1"))
    assert all(n.startswith("blocks.1.") for n in freeze(net, "blocks.1.*"))
    assert net.blocks[10].fc.weight.requires_grad


def test_freeze_errors():
    net = make_net()
    with pytest.raises(ValueError, match=r"pattern 'blocks\.7\.\*' matches no parameter.*embed\.weight"):
        freeze(net, ["head", "blocks.7.*"])
    assert all(p.requires_grad for p in net.parameters())  # checked before anything changed
    with pytest.raises(ValueError, match="patterns is empty"):
        unfreeze(net, [])
    with pytest.raises(TypeError, match="patterns must be non-empty strings"):
        freeze(net, [3])


def test_unfreeze_top_k_counts():
    net = make_net(n_blocks=3)
    per_block = sum(p.numel() for p in net.blocks[0].parameters())
    head = sum(p.numel() for p in net.head.parameters())
    for k in range(4):
        names = unfreeze_top_k(net, k)
        assert names == trainable_names(net)
        assert sum(p.numel() for p in net.parameters() if p.requires_grad) == k * per_block + head
        expected_blocks = {str(i) for i in range(3 - k, 3)}
        assert {n.split(".")[1] for n in names if n.startswith("blocks.")} == expected_blocks
        assert not net.embed.weight.requires_grad and not net.bn.weight.requires_grad
    assert unfreeze_top_k(net, 0) == ["head.weight", "head.bias"]  # frozen backbone = linear probe
    assert unfreeze_top_k(net, 1, head=None) == [n for n, _ in net.blocks[2].named_parameters(prefix="blocks.2")]


def test_unfreeze_top_k_errors():
    net = make_net(n_blocks=3)
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\].*got 4"):
        unfreeze_top_k(net, 4)
    with pytest.raises(ValueError, match="got -1"):
        unfreeze_top_k(net, -1)
    with pytest.raises(TypeError, match="k must be an int"):
        unfreeze_top_k(net, 1.0)
    with pytest.raises(ValueError, match="head='classifier' is not a submodule"):
        unfreeze_top_k(net, 1, head="classifier")
    with pytest.raises(TypeError, match="model must have `blocks`"):
        unfreeze_top_k(nn.Sequential(nn.Linear(2, 2)), 0)
    assert all(p.requires_grad for p in net.parameters())


def _groups_by_name(groups):
    return {g["name"]: g for g in groups}


def test_param_groups_decay_rules_and_lrs():
    net = make_net()
    groups = param_groups(net, lr=1e-2, weight_decay=0.1, backbone_lr=1e-3)
    by = _groups_by_name(groups)
    assert [g["name"] for g in groups] == ["backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"]
    names = {id(p): n for n, p in net.named_parameters()}
    as_names = {k: {names[id(p)] for p in g["params"]} for k, g in by.items()}
    assert as_names["head_decay"] == {"head.weight"} and as_names["head_no_decay"] == {"head.bias"}
    assert as_names["backbone_decay"] == {"embed.weight", "scale", "blocks.0.fc.weight", "blocks.1.fc.weight",
                                          "blocks.2.fc.weight"}
    assert {"shift", "blocks.0.ln.weight", "blocks.2.fc.bias", "bn.weight", "bn.bias"} <= as_names["backbone_no_decay"]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert by["head_decay"]["lr"] == by["head_no_decay"]["lr"] == 1e-2
    assert by["backbone_decay"]["lr"] == by["backbone_no_decay"]["lr"] == 1e-3
    assert by["backbone_decay"]["weight_decay"] == by["head_decay"]["weight_decay"] == 0.1
    assert by["backbone_no_decay"]["weight_decay"] == by["head_no_decay"]["weight_decay"] == 0.0
    assert param_groups(net, lr=1e-2, weight_decay=0.1)[0]["lr"] == 1e-2  # backbone_lr defaults to lr

    # the name rule (case-insensitive substring) moves the 2-D "scale" to no-decay
    by = _groups_by_name(param_groups(net, lr=1e-2, weight_decay=0.1, no_decay=("bias", "SCALE")))
    assert id(net.scale) in {id(p) for p in by["backbone_no_decay"]["params"]}


def test_param_groups_norm_detected_by_module_type():
    # a LayerNorm over (2, 3) has a 2-D weight and a name without "norm": only its type says no decay
    model = nn.Sequential(OrderedDict(flat=nn.Unflatten(1, (2, 3)), ln=nn.LayerNorm((2, 3)), head=nn.Flatten()))
    assert model.ln.weight.ndim == 2
    groups = param_groups(model, lr=1e-2, weight_decay=0.1, head="head", no_decay=())
    assert [g["name"] for g in groups] == ["backbone_no_decay"]
    assert {id(p) for p in groups[0]["params"]} == {id(model.ln.weight), id(model.ln.bias)}


def test_param_groups_only_trainable_and_work_with_adamw():
    net = make_net()
    unfreeze_top_k(net, 1)
    groups = param_groups(net, lr=1e-2, weight_decay=0.5, backbone_lr=1e-3)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in net.parameters() if p.requires_grad}
    opt = torch.optim.AdamW(groups)
    assert [g["name"] for g in opt.param_groups] == [g["name"] for g in groups]

    # decoupled decay acts on decay groups only: with zero gradients, only decayed weights shrink
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    after = dict(net.named_parameters())
    torch.testing.assert_close(after["head.weight"], before["head.weight"] * (1 - 1e-2 * 0.5))
    torch.testing.assert_close(after["blocks.2.fc.weight"], before["blocks.2.fc.weight"] * (1 - 1e-3 * 0.5))
    assert torch.equal(after["head.bias"], before["head.bias"])
    assert torch.equal(after["blocks.2.ln.weight"], before["blocks.2.ln.weight"])
    assert torch.equal(after["blocks.0.fc.weight"], before["blocks.0.fc.weight"])  # frozen

    freeze(net)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(net, lr=1e-2, weight_decay=0.1)


def test_param_groups_argument_errors():
    net = make_net()
    with pytest.raises(ValueError, match="lr must be a number > 0, got 0"):
        param_groups(net, lr=0, weight_decay=0.1)
    with pytest.raises(ValueError, match="backbone_lr must be a number > 0, got -1"):
        param_groups(net, lr=1e-3, weight_decay=0.1, backbone_lr=-1)
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0"):
        param_groups(net, lr=1e-3, weight_decay=-0.1)
    with pytest.raises(ValueError, match="head='fc' is not a submodule"):
        param_groups(net, lr=1e-3, weight_decay=0.1, head="fc")
    groups = param_groups(net, lr=1e-3, weight_decay=0.1, head=None)
    assert [g["name"] for g in groups] == ["backbone_decay", "backbone_no_decay"]
