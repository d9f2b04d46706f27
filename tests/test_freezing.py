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


def test_param_groups_layer_decay_gives_each_block_decay_times_the_block_above():
    net = make_net(n_blocks=3)
    groups = param_groups(net, lr=1e-2, backbone_lr=1e-3, weight_decay=0.1, layer_decay=0.5)
    by = _groups_by_name(groups)
    assert [g["name"] for g in groups] == [
        "pre_blocks_decay", "pre_blocks_no_decay", "blocks.0_decay", "blocks.0_no_decay", "blocks.1_decay",
        "blocks.1_no_decay", "blocks.2_decay", "blocks.2_no_decay", "post_blocks_no_decay", "head_decay",
        "head_no_decay"]
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in by["pre_blocks_decay"]["params"]} == {"embed.weight", "scale"}
    assert {names[id(p)] for p in by["post_blocks_no_decay"]["params"]} == {"bn.weight", "bn.bias"}
    assert {names[id(p)] for p in by["blocks.1_decay"]["params"]} == {"blocks.1.fc.weight"}
    for i, expected in enumerate((2.5e-4, 5e-4, 1e-3)):
        assert by[f"blocks.{i}_decay"]["lr"] == by[f"blocks.{i}_no_decay"]["lr"] == pytest.approx(expected)
    assert by["pre_blocks_decay"]["lr"] == pytest.approx(1.25e-4)  # below the bottom block
    assert by["post_blocks_no_decay"]["lr"] == 1e-3 and by["head_decay"]["lr"] == 1e-2
    assert by["blocks.0_no_decay"]["weight_decay"] == 0.0 and by["blocks.0_decay"]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    # layer_decay=1: every backbone layer at backbone_lr; only trainable parameters, as without it
    flat = param_groups(net, lr=1e-2, backbone_lr=1e-3, weight_decay=0.0, layer_decay=1.0)
    assert {g["lr"] for g in flat if not g["name"].startswith("head")} == {1e-3}
    unfreeze_top_k(net, 1)
    assert [g["name"] for g in param_groups(net, lr=1e-2, weight_decay=0.0, layer_decay=0.5)] == [
        "blocks.2_decay", "blocks.2_no_decay", "head_decay", "head_no_decay"]
    for bad in (0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="layer_decay must be a number in"):
            param_groups(net, lr=1e-2, weight_decay=0.0, layer_decay=bad)
    with pytest.raises(TypeError, match="model must have `blocks`"):
        param_groups(nn.Sequential(OrderedDict(head=nn.Linear(2, 2))), lr=1e-2, weight_decay=0.0, layer_decay=0.5)


def _loaders(n=64, seed=0):
    from course_lib.data import TensorLoader
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    return TensorLoader(X, y, 16, shuffle=True, seed=seed), TensorLoader(X, y, 64)


def test_fit_stages_unfreezes_stage_by_stage_and_keeps_the_best_epoch_over_all_stages():
    from course_lib.checkpoint import BestCheckpoint
    from course_lib.freezing import fit_stages

    net = make_net(n_blocks=3)
    train, val = _loaders()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    history = fit_stages(net, [(0, 2), (1, 3), (3, 1)], train, val, lr=1e-2, backbone_lr=1e-3,
                         checkpoint=BestCheckpoint("val_loss", "min"), name="staged", split_hash="abc",
                         scheduler="cosine", warmup_ratio=0.1, device="cpu", progress=False)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6] and [r["stage"] for r in history] == [1, 1, 2, 2, 2, 3]
    assert history.name == "staged" and history.split_hash == "abc" and history.rule == ("val_loss", "min", None)
    losses = [r["val_loss"] for r in history]
    assert history.best_epoch == losses.index(min(losses)) + 1 and history.best_value == min(losses)
    # each stage has its own schedule: warmup restarts, so the LR at a stage's first epoch is below its peak
    assert history[2]["lr"] < 1e-2 and history[0]["lr"] < 1e-2
    assert history.trainable_params == sum(p.numel() for p in net.parameters()) - sum(
        p.numel() for n, p in net.named_parameters() if not n.startswith(("blocks.", "head.")))
    # the embedding never trained; the kept checkpoint is loaded back
    assert torch.equal(net.embed.weight, before["embed.weight"])
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), history.best_state[n])
    assert len(history.steps) == 6 * len(train)


def test_fit_stages_errors():
    from course_lib.checkpoint import BestCheckpoint
    from course_lib.freezing import fit_stages

    net = make_net(n_blocks=3)
    train, val = _loaders()
    with pytest.raises(ValueError, match="stages is empty"):
        fit_stages(net, [], train, val, lr=1e-2)
    with pytest.raises(ValueError, match=r"each stage must be a pair \(k top blocks, epochs >= 1\)"):
        fit_stages(net, [(0, 0)], train, val, lr=1e-2)
    with pytest.raises(ValueError, match=r"stage k must be in \[0, 3\].*got 5"):
        fit_stages(net, [(0, 1), (5, 1)], train, val, lr=1e-2)
    with pytest.raises(TypeError, match="checkpoint must be a BestCheckpoint"):
        fit_stages(net, [(0, 1)], train, val, lr=1e-2, checkpoint=("val_loss", "min"))
    assert all(p.requires_grad for p in net.parameters())  # nothing trained or frozen before the checks
    assert isinstance(BestCheckpoint(), BestCheckpoint)


def test_weight_drift_per_layer_and_through_lora():
    import copy

    from course_lib.drift import effective_state, weight_drift
    from course_lib.lora import add_lora

    net = make_net(n_blocks=2)
    same = weight_drift(net, copy.deepcopy(net))
    assert list(same) == ["scale", "shift", "embed", "blocks.0", "blocks.1", "bn"] and set(same.values()) == {0.0}
    moved = copy.deepcopy(net)
    with torch.no_grad():
        moved.blocks[1].fc.weight.mul_(1.5)
        moved.head.weight.add_(10.0)  # the head is excluded
    drift = weight_drift(net, moved)
    with torch.no_grad():
        block = list(net.blocks[1].parameters())
        expected = 0.5 * net.blocks[1].fc.weight.norm() / torch.sqrt(sum(p.pow(2).sum() for p in block))
    assert drift["blocks.1"] == pytest.approx(float(expected), rel=1e-6)
    assert drift["blocks.0"] == 0.0 and "head" not in drift
    assert "head" in weight_drift(net, moved, exclude=())

    # LoRA: the effective weight W + scaling * B @ A is compared, under the plain layer's name
    adapted = copy.deepcopy(net)
    add_lora(adapted, ["fc"], r=2, alpha=4)
    assert weight_drift(net, adapted)["blocks.0"] == 0.0  # B starts at zero
    with torch.no_grad():
        adapted.blocks[0].fc.lora_B.fill_(0.1)
    layer = adapted.blocks[0].fc
    delta = layer.scaling * layer.lora_B @ layer.lora_A
    assert torch.allclose(effective_state(adapted)["blocks.0.fc.weight"], net.blocks[0].fc.weight + delta)
    assert weight_drift(net, adapted)["blocks.0"] > 0 and not layer.merged  # the model is not changed
    with pytest.raises(ValueError, match="after has no parameter"):
        weight_drift(net, nn.Linear(2, 2))
    other = make_net(d=4, n_blocks=2)
    with pytest.raises(ValueError, match="has shape"):
        weight_drift(net, other)
