"""course_lib.search: configs, the results table, selection on the validation column only."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from course_lib.search import (
    LogUniform,
    Uniform,
    grid,
    grid_search,
    log_uniform,
    run_trials,
    sample_configs,
    select_best,
    train_val_disagreement,
)
from course_lib.train import History


def fake_history(val_losses, train_losses, *, split="s1", rule=("val_loss", "min", None), params=100):
    """A History as fit would return it: best epoch by val_loss (ties keep the earlier)."""
    rows = [{"epoch": i + 1, "train_loss": t, "val_loss": v, "val_acc": 1 - v}
            for i, (v, t) in enumerate(zip(val_losses, train_losses))]
    h = History(rows, split_hash=split, rule=rule)
    best = int(np.argmin(val_losses))
    h.best_epoch, h.best_value, h.trainable_params, h.seconds = best + 1, val_losses[best], params, 0.1
    return h


def test_grid_is_the_cartesian_product_last_key_fastest():
    configs = grid({"lr": [1e-3, 1e-2], "dropout": [0.0, 0.5, 0.9]})
    assert len(configs) == 6
    assert configs[0] == {"lr": 1e-3, "dropout": 0.0} and configs[1] == {"lr": 1e-3, "dropout": 0.5}
    assert configs[-1] == {"lr": 1e-2, "dropout": 0.9}


@pytest.mark.parametrize("space, match", [({}, "non-empty dict"), ({"lr": []}, "non-empty list"),
                                          ({"lr": LogUniform(1e-4, 1e-1)}, "random search"),
                                          ({"epochs": [1, 2]}, "clashes")])
def test_grid_rejects_bad_spaces(space, match):
    with pytest.raises(ValueError, match=match):
        grid(space)


def test_log_uniform_spreads_evenly_over_decades_and_is_seeded():
    x = log_uniform(1e-4, 1e-1, 30000, np.random.default_rng(0))
    assert x.shape == (30000,) and x.min() >= 1e-4 and x.max() <= 1e-1
    for lo in (1e-4, 1e-3, 1e-2):
        assert abs(np.mean((x >= lo) & (x < 10 * lo)) - 1 / 3) < 0.015
    a = log_uniform(1e-4, 1e-1, 5, np.random.default_rng(3))
    assert np.array_equal(a, log_uniform(1e-4, 1e-1, 5, np.random.default_rng(3)))
    assert not np.array_equal(a, log_uniform(1e-4, 1e-1, 5, np.random.default_rng(4)))


@pytest.mark.parametrize("low, high, match", [(0.0, 1.0, "low must be > 0"), (1e-2, 1e-3, "high must be > low"),
                                              (float("nan"), 1.0, "finite")])
def test_log_uniform_rejects_bad_ranges(low, high, match):
    with pytest.raises(ValueError, match=match):
        log_uniform(low, high, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match=match):
        LogUniform(low, high)


def test_log_uniform_needs_a_generator():
    with pytest.raises(TypeError, match="numpy Generator"):
        log_uniform(1e-4, 1e-1, 3, 0)


def test_sample_configs_draws_each_kind_and_repeats_with_the_seed():
    space = {"lr": LogUniform(1e-4, 1e-1), "dropout": Uniform(0.0, 0.5), "wd": [0.0, 0.5], "epochs_fixed": 7}
    configs = sample_configs(space, 200, seed=1)
    assert configs == sample_configs(space, 200, seed=1)
    assert configs != sample_configs(space, 200, seed=2)
    lrs = np.array([c["lr"] for c in configs])
    assert lrs.min() >= 1e-4 and lrs.max() <= 1e-1 and np.mean(lrs < 1e-2) > 0.5  # log-uniform, not uniform
    assert all(0.0 <= c["dropout"] <= 0.5 for c in configs)
    assert {c["wd"] for c in configs} == {0.0, 0.5} and all(c["epochs_fixed"] == 7 for c in configs)
    with pytest.raises(ValueError, match="n_trials"):
        sample_configs(space, 0)


def test_run_trials_builds_one_row_per_trial_read_at_the_kept_checkpoint():
    curves = {1e-3: ([0.5, 0.4, 0.45], [0.6, 0.3, 0.2]), 1e-2: ([0.5, 0.6, 0.7], [0.3, 0.05, 0.01])}
    kept = {}
    results = grid_search(lambda c: fake_history(*curves[c["lr"]]), {"lr": [1e-3, 1e-2]}, histories=kept,
                          first_trial=5)
    assert list(results.index) == [5, 6] and set(kept) == {5, 6}
    row = results.loc[5]
    assert row["best_epoch"] == 2 and row["val_loss"] == 0.4 and row["train_loss"] == 0.2  # train loss: last epoch
    assert math.isclose(row["val_acc"], 0.6) and row["trainable_params"] == 100 and row["status"] == "ok"
    assert results.attrs["rule"] == ("val_loss", "min", None) and results.attrs["split_hash"] == "s1"


def test_run_trials_keeps_a_diverged_trial_as_a_nan_row():
    def train_fn(config):
        if config["lr"] > 0.5:
            raise FloatingPointError("non-finite training loss")
        return fake_history([0.3], [0.2])

    results = run_trials(train_fn, [{"lr": 0.1}, {"lr": 1.0}])
    assert results.loc[1, "status"] == "diverged" and math.isnan(results.loc[1, "val_loss"])
    assert select_best(results, "val_loss", "min").name == 0


def test_run_trials_refuses_trials_under_different_rules_or_splits():
    other_rule = [fake_history([0.3], [0.2]), fake_history([0.3], [0.2], rule=("val_acc", "max", None))]
    with pytest.raises(ValueError, match="checkpoint rule"):
        run_trials(lambda c: other_rule[c["i"]], [{"i": 0}, {"i": 1}])
    other_split = [fake_history([0.3], [0.2]), fake_history([0.3], [0.2], split="s2")]
    with pytest.raises(ValueError, match="split"):
        run_trials(lambda c: other_split[c["i"]], [{"i": 0}, {"i": 1}])
    with pytest.raises(TypeError, match="History"):
        run_trials(lambda c: 0.3, [{"i": 0}])


def test_random_search_runs_sampled_configs():
    seen = []
    configs = sample_configs({"lr": LogUniform(1e-3, 1.0)}, 4, seed=0)
    results = run_trials(lambda c: seen.append(c) or fake_history([c["lr"]], [0.1]), configs)
    assert len(results) == 4 and [c["lr"] for c in seen] == list(results["lr"])
    assert select_best(results, "val_loss", "min")["lr"] == min(c["lr"] for c in seen)


def table():
    return pd.DataFrame({"lr": [1e-3, 1e-2, 3e-2, 1e-1], "train_loss": [0.2, 0.01, 0.001, math.nan],
                         "val_loss": [0.30, 0.25, 0.40, math.nan], "val_acc": [0.90, 0.93, 0.91, math.nan]},
                        index=pd.Index([0, 1, 2, 3], name="trial"))


def test_select_best_uses_the_validation_column_not_the_training_loss():
    best = select_best(table(), "val_loss", "min")
    assert best.name == 1 and best["lr"] == 1e-2  # trial 2 has the lowest training loss
    assert select_best(table(), "val_acc", "max").name == 1
    ties = pd.DataFrame({"val_loss": [0.2, 0.2, 0.1]}, index=[7, 3, 9])
    assert select_best(ties.iloc[:2], "val_loss", "min").name == 7


@pytest.mark.parametrize("metric, mode, err, match", [("train_loss", "min", ValueError, "validation column"),
                                                      ("val_loss", "best", ValueError, "mode"),
                                                      ("val_f1", "max", KeyError, "not a column")])
def test_select_best_rejects_bad_arguments(metric, mode, err, match):
    with pytest.raises(err, match=match):
        select_best(table(), metric, mode)


def test_select_best_refuses_an_all_nan_column():
    with pytest.raises(ValueError, match="NaN"):
        select_best(pd.DataFrame({"val_loss": [math.nan, math.nan]}), "val_loss", "min")


def test_train_val_disagreement_flags_the_trap():
    trap = train_val_disagreement(table(), "val_loss", "min")
    assert trap["lowest_train_loss"] == 2 and trap["best_val"] == 1 and math.isclose(trap["val_cost"], 0.15)
    agree = table().assign(train_loss=[0.2, 0.001, 0.01, math.nan])
    assert train_val_disagreement(agree, "val_loss", "min") is None


def test_log_uniform_takes_a_sampler_and_the_scenario_draws_through_sample_configs():
    from course_lib.scenarios.search import RANDOM_LR, random_configs

    calls = []

    def mine(low, high, size, rng):
        calls.append((low, high, size))
        return log_uniform(low, high, size, rng)

    assert LogUniform(1e-3, 1.0, sampler=mine) == LogUniform(1e-3, 1.0)  # the sampler is not part of the value
    ours, theirs = random_configs(5, seed=3, sampler=mine), random_configs(5, seed=3)
    assert ours == theirs and calls == [(*RANDOM_LR, 1)] * 5
    assert all(c["weight_decay"] in (0.0, 0.5) and 0 <= c["dropout"] <= 0.5 for c in ours)
