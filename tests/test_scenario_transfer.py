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


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full"])
@pytest.mark.parametrize("seed", SEEDS)
def test_backbone_lr_study(seed, fast, one_thread):
    """Notebook 05's backbone-LR study: what a smaller backbone LR, staged unfreezing and a too-high LR do.

    Measured on seeds 0-4 (fast mode with the avx2 and the default kernels, full mode with avx2): the 10x
    smaller LR moves the top block 2-6x less (drift 0.10-0.25 vs 0.56-0.76); a backbone at 10x the head's LR
    ruins full fine-tuning (final val 0.19-0.41; in full mode the kept epoch 1 can reach 0.70-0.75 before the
    LR peaks, then val falls) and the first move, a 10x smaller backbone LR, repairs it (kept val 0.83-1.00).
    Staged unfreezing is reported, not
    asserted: 0-7 points below the one-shot partial unfreeze in fast mode, within 2 points in full mode.
    """
    ev = transfer.run_lr_study(seed, fast)
    same, smaller = ev["partial_same_lr"], ev["partial_smaller_lr"]
    for arm in ("partial_same_lr", "partial_smaller_lr", "staged_unfreeze", "partial_unfreeze"):
        assert ev[arm]["drift"]["blocks.0"] == 0.0 and ev[arm]["drift"]["embed"] == 0.0, (arm, ev[arm]["drift"])
    # a smaller backbone LR keeps the pretrained block closer to where it was
    assert smaller["drift"]["blocks.1"] <= 0.6 * same["drift"]["blocks.1"], (same["drift"], smaller["drift"])
    # too high a backbone LR damages reuse: val stays low or falls after the first epochs (full mode's longer
    # warmup lets epoch 1 learn before the LR peaks) ...
    high, repaired = ev["full_too_high_lr"], ev["full_smaller_lr"]
    assert high["final_value"] <= 0.60, high
    # ... and the first move (the backbone 10x slower) repairs it
    assert repaired["best_value"] >= 0.75 and repaired["best_value"] - high["best_value"] >= 0.15, (high, repaired)
    assert repaired["final_value"] - high["final_value"] >= 0.30, (high, repaired)
    print(seed, fast, {a: (round(e["best_value"], 3), round(e["source_acc"], 3), round(e["drift"]["blocks.1"], 2))
                       for a, e in ev.items()})
