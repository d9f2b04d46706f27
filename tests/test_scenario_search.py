"""Notebook 08's evidence holds on every seed: the train/val trap, the LR x batch interplay, the LoRA ordering."""
from __future__ import annotations

import pytest
from nbutil import map_seeds, scenario_seeds

from course_lib.data import digits_split
from course_lib.scenarios import search as sc

SEEDS = scenario_seeds()


def _evidence(seed):
    ev = sc.run(seed, fast=True, random=False)
    ev.pop("results")
    return ev


@pytest.fixture(scope="module")
def evidence():
    return map_seeds(_evidence, SEEDS)


def test_lowest_training_loss_is_never_the_best_on_validation(evidence):
    for ev in evidence:
        trap, grid = ev["trap"], ev["grid"]
        assert trap is not None, ev["seed"]
        memorizer = grid.loc[trap["lowest_train_loss"]]
        # the memorizer has no regularization (the larger LR on most seeds), and it costs a visible val loss
        assert (memorizer["weight_decay"], memorizer["dropout"]) == (0.0, 0.0), memorizer
        # measured with the warmup + cosine recipe on seeds 0-19: 0.029..0.154 (pinned kernels)
        assert trap["val_cost"] > 0.01, (ev["seed"], trap)


def test_large_batch_starves_at_small_lr_and_recovers_at_large_lr(evidence):
    for ev in evidence:
        t = ev["lr_batch"]
        gap_small_lr = t.loc[1e-3, 128] - t.loc[1e-3, 16]
        gap_large_lr = t.loc[1e-2, 128] - t.loc[1e-2, 16]
        assert gap_small_lr > 0.4, (ev["seed"], t)  # measured 1.41..1.55 on seeds 0-19 (at 1e-2: -0.005..0.114)
        assert gap_small_lr > gap_large_lr + 0.3, (ev["seed"], t)


def test_lora_capacity_orders_the_validation_loss(evidence):
    """All six projections at r=8 keep a lower val loss than q,v at r=2. Measured on seeds 0-19 (fast mode) under
    native, pinned and the oldest kernels: by 0.11-0.47 with native and pinned kernels, 0.035-0.45 with the oldest
    (seed 2); the source model keeps >= 0.93 val accuracy."""
    for ev in evidence:
        assert ev["source_val_acc"] > 0.9, ev["seed"]  # the source model is worth adapting
        lora = ev["lora"].set_index(["targets", "r"])
        assert lora.loc[("all", 8), "val_loss"] < lora.loc[("q,v", 2), "val_loss"] - 0.02, (ev["seed"], lora)
        assert lora["trainable_params"].idxmax() == ("all", 8)


def test_holdout_is_close_to_the_validation_estimate(evidence):
    for ev in evidence:
        assert abs(ev["test_acc"] - ev["chosen_val_acc"]) < 0.05, ev["seed"]


def test_seed_spread_retrains_each_config_with_consecutive_seeds():
    split = digits_split(3, **sc.SPLIT)
    config = {"lr": 1e-2, "weight_decay": 0.0, "dropout": 0.5}
    table = sc.seed_spread(split, {5: config}, seed=3, n_seeds=2)
    assert list(table.columns) == ["seed 3", "seed 4", "mean", "spread"] and list(table.index) == [5]
    runs = [sc.train_mlp(split, config, s).best_value for s in (3, 4)]
    assert table.loc[5, "seed 3"] == runs[0] and table.loc[5, "seed 4"] == runs[1]
    assert table.loc[5, "spread"] == pytest.approx(abs(runs[0] - runs[1]))
    assert runs[0] != runs[1]  # the training seed changes the run: a spread can be read
    with pytest.raises(ValueError, match="n_seeds"):
        sc.seed_spread(split, {5: config}, seed=3, n_seeds=1)
