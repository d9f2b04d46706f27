"""Hyper-parameter search that selects on the validation metric: grid search, random search, one results table.

A search is a list of *configs* (dicts of hyper-parameters). ``train_fn(config)`` trains one model and returns
its ``History`` (from ``course_lib.train.fit``); every trial must use the same split and the same checkpoint
rule (``BestCheckpoint(metric, mode, patience)``), or the table refuses them: scores from different rules are
not comparable. Each trial becomes one row:

    trial | <config keys> | status | best_epoch | epochs | train_loss | val_loss | val_acc | trainable_params | seconds

``val_loss`` / ``val_acc`` are read at the kept checkpoint (``best_epoch``), ``train_loss`` at the last epoch
(what a naive "lowest training loss" pick would look at). The configs are chosen on a ``val_*`` column with
``select_best``; the test split is touched once, for the chosen config only, after the search.

Random search (``run_trials(train_fn, sample_configs(space, n_trials, seed))``) samples each hyper-parameter
independently: a list means "pick one uniformly", ``LogUniform`` means ``exp(U(log low, log high))`` (every
decade equally likely, the right prior for learning rates and weight decay: ``U(1e-4, 1e-1)`` would put 90% of
the trials above 1e-2), ``Uniform`` means ``U(low, high)``.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .compare import check_comparable

__all__ = ["LogUniform", "Uniform", "grid", "log_uniform", "sample_configs", "run_trials", "grid_search",
           "select_best", "train_val_disagreement"]

RESULT_COLUMNS = ("status", "best_epoch", "epochs", "train_loss", "val_loss", "val_acc", "trainable_params", "seconds")


def _check_range(low, high, *, positive: bool) -> None:
    for arg, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{arg} must be a finite number, got {value!r}")
    if positive and not low > 0:
        raise ValueError(f"low must be > 0 for a log-uniform range (log(0) is -inf), got {low}")
    if not high > low:
        raise ValueError(f"high must be > low, got low={low}, high={high}")


@dataclass(frozen=True)
class LogUniform:
    """``exp(U(log low, log high))``: every decade in ``[low, high]`` equally likely (``0 < low < high``).

    ``sampler(low, high, size, rng)`` draws the samples (default ``log_uniform``), e.g. a learner's own version.
    """

    low: float
    high: float
    sampler: Callable | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        _check_range(self.low, self.high, positive=True)

    def sample(self, rng: np.random.Generator) -> float:
        draw = log_uniform if self.sampler is None else self.sampler
        return float(draw(self.low, self.high, 1, rng)[0])


@dataclass(frozen=True)
class Uniform:
    """``U(low, high)`` (``low < high``), e.g. a dropout rate."""

    low: float
    high: float

    def __post_init__(self):
        _check_range(self.low, self.high, positive=False)

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))


def log_uniform(low: float, high: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` samples of ``exp(u)`` with ``u ~ U(log low, log high)``: shape ``(size,)``, all in ``[low, high)``.

    ``P(x < t) = log(t / low) / log(high / low)``, so e.g. for ``(1e-4, 1e-1)`` a third of the samples fall in
    each decade.
    """
    _check_range(low, high, positive=True)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    return np.exp(rng.uniform(math.log(low), math.log(high), size=int(size)))


def _check_space(space) -> None:
    if not isinstance(space, dict) or not space:
        raise ValueError(f"space must be a non-empty dict {{name: values}}, got {space!r}")
    for key in space:
        if not isinstance(key, str) or not key:
            raise ValueError(f"space keys must be hyper-parameter names (strings), got {key!r}")
        if key == "trial" or key in RESULT_COLUMNS:
            raise ValueError(f"space key {key!r} clashes with a results column; rename it")


def grid(space: dict) -> list[dict]:
    """Every combination of the values in ``space`` (``{name: list of values}``); the last key varies fastest."""
    _check_space(space)
    for key, values in space.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"grid values must be a non-empty list, got {key}={values!r} "
                             "(use random search for LogUniform/Uniform ranges)")
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*space.values())]


def sample_configs(space: dict, n_trials: int, seed: int = 0) -> list[dict]:
    """``n_trials`` configs drawn independently: list -> uniform choice, LogUniform/Uniform -> sample, else constant."""
    _check_space(space)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be an int >= 1, got {n_trials!r}")
    rng = np.random.default_rng(seed)
    configs = []
    for _ in range(n_trials):
        config = {}
        for key, values in space.items():
            if isinstance(values, (LogUniform, Uniform)):
                config[key] = values.sample(rng)
            elif isinstance(values, (list, tuple)):
                if not values:
                    raise ValueError(f"space[{key!r}] is an empty list: give at least one value")
                config[key] = values[int(rng.integers(len(values)))]
            else:
                config[key] = values
        configs.append(config)
    return configs


def _row(history) -> dict:
    kept, last = history.kept_row(), history[-1]
    return {"status": "ok", "best_epoch": int(history.best_epoch), "epochs": int(last["epoch"]),
            "train_loss": float(last["train_loss"]), "val_loss": float(kept["val_loss"]),
            "val_acc": float(kept["val_acc"]) if "val_acc" in kept else math.nan,
            "trainable_params": history.trainable_params, "seconds": history.seconds}


def run_trials(train_fn, configs, *, histories: dict | None = None, first_trial: int = 0) -> pd.DataFrame:
    """Train every config with ``train_fn(config) -> History`` and return one row per trial (see module doc).

    A trial whose loss becomes non-finite (``TrainingDiverged``, a ``FloatingPointError``, from ``fit``) is kept
    as ``status="diverged"`` with NaN scores, so a too-high LR shows up in the table instead of stopping the
    search. Pass a dict as ``histories`` to receive ``{trial: History}``. ``results.attrs`` holds the shared
    ``rule`` and ``split_hash``. Trials are numbered from ``first_trial``, so the tables of two searches can be
    concatenated (``pd.concat``).
    """
    if not callable(train_fn):
        raise TypeError(f"train_fn must be callable as train_fn(config) -> History, got {type(train_fn).__name__}")
    configs = list(configs)
    if isinstance(first_trial, bool) or not isinstance(first_trial, int) or first_trial < 0:
        raise ValueError(f"first_trial must be an int >= 0, got {first_trial!r}")
    if not configs:
        raise ValueError("configs is empty: nothing to search")
    rows, kept = [], {}
    for trial, config in enumerate(configs, start=first_trial):
        if not isinstance(config, dict):
            raise TypeError(f"each config must be a dict of hyper-parameters, got {type(config).__name__}")
        t0 = time.perf_counter()
        try:
            history = train_fn(dict(config))
        except FloatingPointError:
            rows.append({"trial": trial, **config, "status": "diverged", "best_epoch": None, "epochs": None,
                         "train_loss": math.nan, "val_loss": math.nan, "val_acc": math.nan,
                         "trainable_params": None, "seconds": time.perf_counter() - t0})
            continue
        if not hasattr(history, "best_epoch") or not hasattr(history, "kept_row"):
            raise TypeError(f"train_fn must return the History of course_lib.train.fit, got {type(history).__name__}")
        kept[trial] = history
        rows.append({"trial": trial, **config, **_row(history)})
    split, rule = check_comparable({f"trial {t}": h for t, h in kept.items()}) if kept else (None, None)
    if histories is not None:
        histories.update(kept)
    results = pd.DataFrame(rows).set_index("trial")
    results.attrs.update(rule=rule, split_hash=split)
    return results


def grid_search(train_fn, space: dict, *, histories: dict | None = None, first_trial: int = 0) -> pd.DataFrame:
    """``run_trials`` over ``grid(space)``."""
    return run_trials(train_fn, grid(space), histories=histories, first_trial=first_trial)


def select_best(results: pd.DataFrame, metric: str = "val_loss", mode: str = "min") -> pd.Series:
    """The row of the best trial by the validation column ``metric`` (``mode`` "min" or "max").

    Only ``val_*`` columns are accepted: a config is chosen on data it was not trained on, never on its
    training loss. NaN rows (diverged trials) are skipped; ties keep the earlier row.
    """
    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    if not isinstance(metric, str) or not metric.startswith("val"):
        raise ValueError(f"metric must be a validation column such as 'val_loss' or 'val_acc', got {metric!r}: "
                         "selecting on the training loss rewards memorization")
    if metric not in results.columns:
        raise KeyError(f"metric {metric!r} is not a column of results; columns are {list(results.columns)}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    scores = pd.to_numeric(results[metric], errors="coerce")
    if scores.isna().all():
        raise ValueError(f"every {metric!r} value is NaN (all trials diverged?): nothing to select")
    label = scores.idxmin() if mode == "min" else scores.idxmax()  # both skip NaN; ties -> first
    return results.loc[label]


def train_val_disagreement(results: pd.DataFrame, metric: str = "val_loss", mode: str = "min") -> dict | None:
    """The trap: the trial with the lowest final training loss is not the best by ``metric``.

    Returns ``{"lowest_train_loss": trial, "best_val": trial, "val_cost": how much worse the first is by
    metric}`` when they differ, else None.
    """
    best_val = select_best(results, metric, mode).name
    best_train = pd.to_numeric(results["train_loss"], errors="coerce").idxmin()
    if best_train == best_val:
        return None
    cost = results.loc[best_train, metric] - results.loc[best_val, metric]
    return {"lowest_train_loss": best_train, "best_val": best_val,
            "val_cost": float(cost if mode == "min" else -cost)}
