"""Notebook 08 (hyper-parameter search and monitoring): the configuration it shows and the evidence it reads.

Three searches, each on one split with one checkpoint rule (best ``val_loss``):

Every MLP trial trains with the course's recipe (AdamW, ``SCHEDULE``: linear warmup then cosine decay), so the
search tunes what it will ship.

1. ``GRID`` on the MLP with a small training set (300 examples: room to memorize). The config with the lowest
   final training loss (no regularization) is never the best on validation (the tests give the measured range).
   That is the trap of selecting on training loss.
2. ``LR_BATCH_GRID`` with a fixed epoch budget: an 8x larger batch takes 8x fewer steps, so at a small LR it
   starves and its penalty shrinks as the LR grows. LR and batch size are tuned together, never one at a fixed
   value of the other.
3. LoRA on a TinyTransformer pretrained on digits 0-4 and adapted to digits 5-9 (``LORA_GRID``: target modules
   and rank, ``alpha = 2 r``), searched on the target task's validation split.

``seed_spread`` retrains chosen configs with other training seeds (same split): the noise a ranking is read
against. ``run(seed, fast)`` reproduces the notebook's evidence; ``tests/test_scenario_search.py`` checks it over
seeds.
"""
from __future__ import annotations

import copy

import pandas as pd

from ..data import digits_split, make_loaders
from ..lora import add_lora
from ..models import MLP, PROJECTIONS, TinyTransformer
from ..runtime import seed_everything
from ..search import LogUniform, Uniform, grid_search, run_trials, sample_configs, select_best, train_val_disagreement
from ..train import evaluate, fit
from . import by_mode

__all__ = ["SPLIT", "MODEL", "BATCH_SIZE", "EPOCHS", "GRID", "LR_BATCH_GRID", "LR_BATCH_EPOCHS", "RANDOM_LR",
           "RANDOM_OTHER", "N_RANDOM", "TRANSFORMER", "SOURCE_CLASSES", "TARGET_CLASSES", "TARGET_N_TRAIN",
           "PRETRAIN", "ADAPT", "LORA_GRID", "TARGET_SETS", "SCHEDULE", "SPREAD_SEEDS", "train_mlp", "random_configs",
           "seed_spread", "pretrain_source", "adapt_lora", "run"]

SPLIT = {"n_train": 300}
"""``digits_split(seed, **SPLIT)``: 300 training examples (stratified), the usual 360 val and 359 test."""
MODEL = {"hidden": (256, 256)}
BATCH_SIZE = 32
EPOCHS = 30
SCHEDULE = {"scheduler": "cosine", "warmup_ratio": 0.1}
"""The schedule of every MLP trial: the course's recipe (notebook 02), not a constant LR."""
SPREAD_SEEDS = 3
"""Training seeds per config in ``seed_spread`` (the trial's own seed and the next two)."""
GRID = {"lr": [1e-3, 1e-2], "weight_decay": [0.0, 0.5], "dropout": [0.0, 0.5]}
LR_BATCH_GRID = {"lr": [1e-3, 3e-3, 1e-2], "batch_size": [16, 128]}
LR_BATCH_EPOCHS = 10
RANDOM_LR = (1e-4, 1e-1)
"""Random search: the LR log-uniform in this range, ..."""
RANDOM_OTHER = {"weight_decay": [0.0, 0.5], "dropout": (0.0, 0.5)}
"""... weight decay one of the list, dropout uniform in the interval."""
N_RANDOM = {"fast": 3, "full": 12}
"""Random-search trials in fast / full mode: ``by_mode(fast, **N_RANDOM)``."""

TRANSFORMER = {"d_model": 32, "n_heads": 4, "n_layers": 2}
SOURCE_CLASSES = range(5)
TARGET_CLASSES = range(5, 10)
TARGET_N_TRAIN = 200
PRETRAIN = {"epochs": {"fast": 20, "full": 40}, "lr": 3e-3, "batch_size": 64, "warmup_ratio": 0.1}
ADAPT = {"epochs": {"fast": 10, "full": 20}, "lr": 1e-2, "batch_size": 32, "warmup_ratio": 0.1}
LORA_GRID = {"targets": ["q,v", "all"], "r": [2, 8]}
TARGET_SETS = {"q,v": ("q_proj", "v_proj"),
               "all": PROJECTIONS}


def train_mlp(split, config: dict, seed: int, *, epochs: int = EPOCHS, device="cpu", name=None,
              progress: bool | None = False):
    """One MLP run with ``SCHEDULE``: ``config`` has ``lr`` and optionally ``weight_decay``, ``dropout``,
    ``batch_size``. ``seed`` sets the initial weights and the batch order (the split is ``split``)."""
    seed_everything(seed)
    train_loader, val_loader, _ = make_loaders(split, config.get("batch_size", BATCH_SIZE), seed=seed)
    model = MLP(**MODEL, dropout=config.get("dropout", 0.0))
    return fit(model, train_loader, val_loader, epochs=epochs, lr=config["lr"],
               weight_decay=config.get("weight_decay", 0.0), device=device, name=name,
               split_hash=split.split_hash, progress=progress, **SCHEDULE)


def random_configs(n_trials: int, seed: int, sampler=None) -> list[dict]:
    """``n_trials`` configs from ``search.sample_configs``: LR log-uniform in ``RANDOM_LR`` (drawn with
    ``sampler(low, high, n, rng)`` when given, e.g. the notebook's exercise), weight decay one of
    ``RANDOM_OTHER["weight_decay"]``, dropout uniform in ``RANDOM_OTHER["dropout"]`` rounded to 3 decimals."""
    space = {"lr": LogUniform(*RANDOM_LR, sampler=sampler), "weight_decay": RANDOM_OTHER["weight_decay"],
             "dropout": Uniform(*RANDOM_OTHER["dropout"])}
    return [{**config, "dropout": round(config["dropout"], 3)} for config in sample_configs(space, n_trials, seed)]


def seed_spread(split, configs: dict, seed: int, *, n_seeds: int = SPREAD_SEEDS, device="cpu",
                progress: bool | None = False) -> pd.DataFrame:
    """Kept val loss of each config retrained with training seeds ``seed .. seed + n_seeds - 1`` (same split).

    ``configs`` is ``{trial: config}``. Returns one row per trial: a column per training seed, ``mean`` and
    ``spread`` (max - min over the seeds). A ranking whose gaps are smaller than the spreads is a tie.
    """
    if not isinstance(n_seeds, int) or n_seeds < 2:
        raise ValueError(f"n_seeds must be an int >= 2 (a spread needs two runs), got {n_seeds!r}")
    rows = {}
    for trial, config in configs.items():
        rows[trial] = {f"seed {s}": train_mlp(split, config, s, device=device, progress=progress).best_value
                       for s in range(seed, seed + n_seeds)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "trial"
    table["mean"] = table.mean(axis=1)
    table["spread"] = table.iloc[:, :n_seeds].max(axis=1) - table.iloc[:, :n_seeds].min(axis=1)
    return table


def pretrain_source(seed: int, fast: bool = True, device="cpu", progress: bool | None = False):
    """``(model, history)``: a TinyTransformer trained on digits 0-4 (its kept checkpoint loaded)."""
    source = digits_split(seed, classes=SOURCE_CLASSES)
    seed_everything(seed)
    train_loader, val_loader, _ = make_loaders(source, PRETRAIN["batch_size"], seed=seed)
    model = TinyTransformer(**TRANSFORMER, n_classes=len(SOURCE_CLASSES))
    history = fit(model, train_loader, val_loader, epochs=by_mode(fast, **PRETRAIN["epochs"]), lr=PRETRAIN["lr"],
                  scheduler="cosine", warmup_ratio=PRETRAIN["warmup_ratio"], device=device, name="source",
                  split_hash=source.split_hash, progress=progress)
    return model, history


def adapt_lora(base, target, config: dict, seed: int, fast: bool = True, device="cpu", progress: bool | None = False):
    """LoRA (``targets``, ``r``, ``alpha = 2 r``) on a copy of ``base``, new head trained, on split ``target``."""
    seed_everything(seed)
    model = copy.deepcopy(base)
    add_lora(model, TARGET_SETS[config["targets"]], r=config["r"], alpha=2 * config["r"], train_modules=["head"])
    train_loader, val_loader, _ = make_loaders(target, ADAPT["batch_size"], seed=seed)
    return fit(model, train_loader, val_loader, epochs=by_mode(fast, **ADAPT["epochs"]), lr=ADAPT["lr"],
               scheduler="cosine", warmup_ratio=ADAPT["warmup_ratio"], device=device, split_hash=target.split_hash,
               progress=progress)


def run(seed: int = 0, fast: bool = True, device="cpu", *, random: bool = True, lora: bool = True) -> dict:
    """The notebook's evidence for ``seed``: the grid, the trap, the LR x batch table, the holdout, LoRA.

    ``random=False`` skips the random search (the chosen config then comes from the grid alone), ``lora=False``
    the LoRA search: the tests use them to stay fast.
    """
    split = digits_split(seed, **SPLIT)
    histories: dict = {}
    grid = grid_search(lambda c: train_mlp(split, c, seed, device=device), GRID, histories=histories)
    results = grid
    if random:
        configs = random_configs(by_mode(fast, **N_RANDOM), seed)
        rand = run_trials(lambda c: train_mlp(split, c, seed, device=device), configs, histories=histories,
                          first_trial=len(grid))
        results = pd.concat([grid, rand])
    best = select_best(results, "val_loss", "min")
    model = MLP(**MODEL, dropout=float(best["dropout"]))
    model.load_state_dict(histories[best.name].best_state)
    _, _, test_loader = make_loaders(split, BATCH_SIZE, seed=seed)
    holdout = evaluate(model, test_loader, device="cpu")
    lr_batch = grid_search(lambda c: train_mlp(split, c, seed, epochs=LR_BATCH_EPOCHS, device=device), LR_BATCH_GRID)
    out = {"seed": seed, "grid": grid, "results": results, "trap": train_val_disagreement(grid, "val_loss", "min"),
           "chosen": int(best.name), "chosen_val_acc": float(best["val_acc"]), "test_acc": holdout["acc"],
           "lr_batch": lr_batch.pivot(index="lr", columns="batch_size", values="val_loss")}
    if lora:
        base, source_history = pretrain_source(seed, fast, device)
        target = digits_split(seed, classes=TARGET_CLASSES, n_train=TARGET_N_TRAIN)
        out["source_val_acc"] = source_history.kept("val_acc")
        out["lora"] = grid_search(lambda c: adapt_lora(base, target, c, seed, fast, device), LORA_GRID)
    return out
