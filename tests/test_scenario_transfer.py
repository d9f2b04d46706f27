"""The transfer scenario of notebooks 05, 06 and 09: the fixed graded answer holds on every seed, with margins.

The one answer that does not depend on the learner's run is the bottleneck of the frozen model:
"adaptation". It is right when (a) the frozen probe is converged and far below what more adaptation capacity
reaches, (b) it is not overfitting (train accuracy is not far above val), and (c) the capacity comes from the
pretrained backbone, not from the labels alone (the baselines without pretraining stay far below). Everything
else the notebooks grade (the depth kept, the smallest rank, the winner, which strategy is enough) is computed
from the learner's own histories by the hidden tests.
"""
from __future__ import annotations

import pytest
import torch
from nbutil import scenario_seeds

from course_lib.freezing import trainable_names
from course_lib.lora import LoRALinear
from course_lib.scenarios import transfer

SEEDS = scenario_seeds()
MORE_CAPACITY = ("partial_unfreeze", "adapter", "full_finetune")


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full"])
@pytest.mark.parametrize("seed", SEEDS)
def test_adaptation_is_the_frozen_models_bottleneck(seed, fast, one_thread):
    """One seed, one mode (20 or 60 epochs): pretraining, every strategy and both baselines, as the notebooks run them.

    Measured over seeds 0-19 in both modes: the best of partial / adapter / full beats the frozen probe by 13-70
    points; the frozen probe's train accuracy is at most 10 points above its val accuracy; the adapter beats
    scratch by 21+ points and logistic regression by 52+.
    """
    ev = transfer.run(seed, fast=fast)
    assert ev["source_val_acc"] >= 0.98, ev["source_val_acc"]  # pretraining solves the source task

    # (a) the frozen probe is far below what more adaptation capacity reaches
    frozen = ev["frozen_head"]
    best = max(ev[s]["best_value"] for s in MORE_CAPACITY)
    assert best - frozen["best_value"] >= 0.10 and frozen["best_value"] <= 0.90, (frozen, best)
    # (b) ... and that is not optimization (its val plateaus) nor regularization (train is not far above val)
    assert frozen["best_value"] - frozen["final_value"] <= 0.05, frozen
    assert frozen["train_acc"] - frozen["best_value"] <= 0.12 and frozen["train_acc"] <= 0.90, frozen

    # the adapter reaches full fine-tuning's level with a fifth of its trainable parameters
    adapter, full = ev["adapter"], ev["full_finetune"]
    assert adapter["best_value"] >= 0.90 and adapter["test_acc"] >= 0.90 and full["best_value"] >= 0.90, ev
    assert adapter["trainable_params"] <= 0.2 * full["trainable_params"], (adapter, full)

    # drift and forgetting: the frozen backbone does not move and still solves the source task exactly
    assert set(frozen["drift"].values()) == {0.0} and frozen["source_acc"] == ev["source_val_acc"], frozen
    assert ev["full_finetune"]["drift"]["blocks.0"] > 0 and ev["partial_unfreeze"]["drift"]["blocks.0"] == 0.0

    # (c) the capacity comes from pretraining: no baseline without it gets close
    assert adapter["best_value"] - ev["scratch"]["best_value"] >= 0.15, ev["scratch"]
    assert adapter["best_value"] - ev["logreg"]["val"] >= 0.40, ev["logreg"]


def test_prepare_makes_trainable_what_each_strategy_trains():
    torch.manual_seed(0)
    base = transfer.make_model()
    n_total = sum(p.numel() for p in base.parameters())
    for strategy in transfer.STRATEGIES:
        model = transfer.make_model()
        model.load_state_dict(base.state_dict())
        assert transfer.prepare(model, strategy) is model
        names = trainable_names(model)
        assert not torch.equal(model.head.weight, base.head.weight), "a fresh head"
        if strategy == "frozen_head":
            assert names == ["head.weight", "head.bias"]
        elif strategy == "partial_unfreeze":
            assert {n.split(".")[0] for n in names} == {"blocks", "head"}
            assert all(n.startswith(("blocks.1.", "head.")) for n in names)
        elif strategy == "adapter":
            layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
            assert len(layers) == 6 * transfer.TRANSFER["model"]["n_layers"]
            assert all(".lora_" in n or n.startswith("head.") for n in names)
        else:
            assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_total
    with pytest.raises(ValueError, match="strategy must be one of"):
        transfer.prepare(transfer.make_model(), "everything")


def test_fit_kwargs_give_the_backbone_its_own_learning_rate():
    cfg = transfer.TRANSFER
    model = transfer.prepare(transfer.make_model(), "full_finetune")
    kwargs = transfer.fit_kwargs(model, "full_finetune", fast=True)
    assert kwargs["epochs"] == cfg["epochs"]["fast"]
    lrs = {g["name"]: g["lr"] for g in kwargs["optimizer"].param_groups}
    assert lrs["head_decay"] == cfg["lr"] and lrs["backbone_decay"] == cfg["backbone_lr"]["full_finetune"]
    frozen = transfer.prepare(transfer.make_model(), "frozen_head")
    assert transfer.fit_kwargs(frozen, "frozen_head", fast=False) == {
        "epochs": cfg["epochs"]["full"], "scheduler": cfg["scheduler"], "warmup_ratio": cfg["warmup_ratio"],
        "optimizer": "adamw", "lr": cfg["lr"]}
    with pytest.raises(ValueError, match="strategies must be names"):
        transfer.run(0, strategies=("frozen_head", "lora"))


def check_lr_study(ev: dict, fast: bool) -> None:
    """The claims of notebook 05's backbone-LR study on one seed's ``run_lr_study`` (also applied to the sweep).

    Measured (these calls, swept over seeds) in fast mode on seeds 0-19 pinned, 0-19 oldest kernels, in full mode on
    seeds 0-19 pinned, 0-12 oldest kernels: the 10x smaller LR's top-block drift is 0.15-0.23 (fast) / 0.24-0.42
    (full) times the same-LR drift (asserted <= 0.6); in fast mode it keeps 2.8-48 points less val_acc (asserted
    >= 1 point; full mode -0.8 to 15.6 points: not asserted); staged unfreezing's drift is 0.56-0.87 times the
    one-shot drift in fast mode (asserted <= 0.95; full 0.64-0.98: not asserted) and its kept value -14.6 to
    +0.6 points from the one-shot run (asserted <= +2; full -3.8 to +0.4). The too-high backbone LR ends at
    0.11-0.42 (fast) / 0.19-0.46 (full) val_acc (asserted <= 0.60; full mode's kept epoch 1-2 can reach 0.80
    before the LR peaks); the first move keeps 0.77-1.00 (asserted >= 0.75), 0.196+ above the too-high kept
    value (asserted >= 0.15) and 0.532+ above its final value (asserted >= 0.30). Source-task accuracy is
    reported, not asserted: in full mode the too-high run's kept checkpoint is often epoch 1-2, before the
    backbone is rewritten.
    """
    same, smaller = ev["partial_same_lr"], ev["partial_smaller_lr"]
    staged, one_shot = ev["staged_unfreeze"], ev["partial_unfreeze"]
    for arm in ("partial_same_lr", "partial_smaller_lr", "staged_unfreeze", "partial_unfreeze"):
        assert ev[arm]["drift"]["blocks.0"] == 0.0 and ev[arm]["drift"]["embed"] == 0.0, (arm, ev[arm]["drift"])
    # a smaller backbone LR keeps the pretrained block closer to where it was ...
    assert smaller["drift"]["blocks.1"] <= 0.6 * same["drift"]["blocks.1"], (same["drift"], smaller["drift"])
    if fast:  # ... and in 20 epochs that costs target accuracy (in 60 the slow block catches up: not asserted)
        assert same["best_value"] - smaller["best_value"] >= 0.01, (same, smaller)
        # staged unfreezing trains the block for fewer epochs: it moves less and does not beat the one-shot run
        assert staged["drift"]["blocks.1"] <= 0.95 * one_shot["drift"]["blocks.1"], (staged["drift"], one_shot["drift"])
        assert staged["best_value"] <= one_shot["best_value"] + 0.02, (staged, one_shot)
    # too high a backbone LR damages reuse: val stays low or falls after the first epochs (full mode's longer
    # warmup lets epoch 1 learn before the LR peaks) ...
    high, repaired = ev["full_too_high_lr"], ev["full_smaller_lr"]
    assert high["final_value"] <= 0.60, high
    # ... and the first move (the backbone 10x slower) repairs it
    assert repaired["best_value"] >= 0.75 and repaired["best_value"] - high["best_value"] >= 0.15, (high, repaired)
    assert repaired["final_value"] - high["final_value"] >= 0.30, (high, repaired)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full"])
@pytest.mark.parametrize("seed", SEEDS)
def test_backbone_lr_study(seed, fast, one_thread):
    """Notebook 05's backbone-LR study: what a smaller backbone LR, staged unfreezing and a too-high LR do."""
    ev = transfer.run_lr_study(seed, fast)
    print(seed, fast, {a: (round(e["best_value"], 3), round(e["source_acc"], 3), round(e["drift"]["blocks.1"], 2))
                       for a, e in ev.items()})
    check_lr_study(ev, fast)


def test_training_spread_redraws_the_pretraining_and_keeps_the_data(one_thread):
    """Notebook 09's spread: seed + offset retrains everything (pretraining too) on the notebook's own splits."""
    from course_lib.token_tasks import source_task, target_task

    source, target = source_task(0), target_task(0)
    got = transfer.training_spread(source, target, ("frozen_head",), 0, True, offsets=(100,))
    pretrained, _ = transfer.pretrain(100, True, source)  # a new pretrained model, not the notebook's
    assert got == {"frozen_head": [transfer.adapt(pretrained, "frozen_head", target, 100, True)[1].best_value]}, got
    with pytest.raises(ValueError, match="strategies must be names"):
        transfer.training_spread(source, target, ("lora",))
    with pytest.raises(ValueError, match="offsets must be positive"):
        transfer.training_spread(source, target, ("adapter",), offsets=(0,))
