"""The transfer scenario of notebooks 05 (frozen vs partial), 06 (LoRA by hand) and 09 (the PEFT lab).

A ``TinyTransformer`` in token mode is pretrained on ``token_tasks.source_task`` (the symbol after the marker,
4,000 labels), then adapted to ``token_tasks.target_task`` (the symbol after the *last* of two markers, 200
labels) in one of ``STRATEGIES``, from least to most trainable:

* ``frozen_head``: backbone frozen, a fresh head trained (a linear probe on the pretrained features);
* ``adapter``: LoRA (rank 4, alpha 8) on all six projections of every block, plus the head;
* ``partial_unfreeze``: the top block and the head trained, the block at ``backbone_lr`` (parameter groups);
* ``full_finetune``: every parameter trained, the backbone at its own smaller LR.

``scratch`` (the same model, randomly initialised, trained on the 200 target labels only) and a logistic
regression on one-hot tokens are the honest baselines: no pretraining.

Measured on seeds 0-19, fast and full mode (kept validation accuracy): the frozen probe converges at
0.39-0.87, and the best of partial / adapter / full beats it by 13 points or more on every seed; the
adapter reaches 0.91-1.00 and full fine-tuning 0.93-1.00, while scratch stays at or below 0.78 and the
logistic regression at or below 0.45. ``tests/test_scenario_transfer.py`` checks this on seeds 0-4 in both
modes. Partial unfreezing (0.74-1.00) varies with the seed, so whether it is *enough* is read from the
learner's own run, never from a constant.

Every run of one seed shares the split and the checkpoint rule (best ``val_acc``); ``seed_everything(seed)``
before pretraining and ``seed_everything(seed + 1)`` before each strategy's fresh head, as the notebooks do.
"""
from __future__ import annotations

import copy
import time

from torch import nn
from torch.optim import AdamW

from ..checkpoint import BestCheckpoint
from ..data import Split, make_loaders
from ..freezing import param_groups, unfreeze, unfreeze_top_k
from ..lora import add_lora
from ..models import PROJECTIONS, TinyTransformer
from ..runtime import seed_everything
from ..token_tasks import one_hot_features, source_task, target_task
from ..train import History, evaluate, fit
from . import by_mode

__all__ = ["TRANSFER", "STRATEGIES", "RULE", "mode", "make_model", "prepare", "fit_kwargs", "pretrain", "adapt",
           "train_scratch", "logistic_baseline", "run"]

TRANSFER: dict = {
    # TinyTransformer in token mode; position embeddings start as loud as token embeddings (std 1), so
    # "the token right after the marker" is found within a few epochs on every seed
    "model": {"vocab_size": 9, "max_len": 8, "n_classes": 8, "d_model": 32, "n_heads": 4, "n_layers": 2,
              "pos_std": 1.0},
    # pretraining on the source task (the same in fast and full mode: it converges in a few epochs)
    "source_epochs": {"fast": 8, "full": 8}, "source_lr": 1e-2, "source_batch_size": 64,
    # adaptation: the same epochs, batches, schedule and rule for every strategy
    "epochs": {"fast": 20, "full": 60}, "batch_size": 32, "scheduler": "cosine", "warmup_ratio": 0.05,
    "lr": 1e-2,            # the new head, and the LoRA matrices
    "backbone_lr": {"partial_unfreeze": 1e-2, "full_finetune": 3e-3},  # pretrained weights that train
    "scratch_lr": 3e-3,
    "partial_k": 1,
    "lora_targets": PROJECTIONS, "lora_r": 4, "lora_alpha": 8,
}
"""Every setting of the scenario; the notebooks read them from here, so they and the tests agree."""

STRATEGIES = ("frozen_head", "partial_unfreeze", "adapter", "full_finetune")
"""Adaptation strategies of a pretrained model (``scratch`` is separate: it has no pretrained model)."""

RULE = {"metric": "val_acc", "mode": "max"}
"""The one checkpoint rule of the scenario: ``BestCheckpoint(**RULE)``."""


def mode(fast: bool) -> str:
    """``"fast"`` or ``"full"``: the key of ``TRANSFER``'s per-mode settings (``by_mode(fast, **table)`` reads one)."""
    return by_mode(fast, fast="fast", full="full")


def make_model() -> TinyTransformer:
    """A fresh ``TinyTransformer(**TRANSFER["model"])`` (seed first for repeatable weights)."""
    return TinyTransformer(**TRANSFER["model"])


def prepare(model: nn.Module, strategy: str) -> nn.Module:
    """Give ``model`` a fresh head and make trainable what ``strategy`` trains; in place, returns ``model``.

    ``frozen_head``: the head only. ``partial_unfreeze``: the top ``partial_k`` blocks and the head.
    ``adapter``: ``add_lora`` on ``lora_targets`` (``lora_r``, ``lora_alpha``) with the head trained.
    ``full_finetune``: everything.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    model.head.reset_parameters()
    if strategy == "frozen_head":
        unfreeze_top_k(model, 0)
    elif strategy == "partial_unfreeze":
        unfreeze_top_k(model, TRANSFER["partial_k"])
    elif strategy == "adapter":
        add_lora(model, TRANSFER["lora_targets"], r=TRANSFER["lora_r"], alpha=TRANSFER["lora_alpha"],
                 train_modules=("head",))
    else:
        unfreeze(model)
    return model


def fit_kwargs(model: nn.Module, strategy: str, fast: bool) -> dict:
    """The ``fit`` arguments of ``strategy`` for a prepared ``model``: epochs, schedule and the optimizer.

    Strategies that train pretrained weights get parameter groups (``freezing.param_groups``): the head at
    ``lr``, the pretrained backbone at ``backbone_lr[strategy]``; the others AdamW at ``lr``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    kwargs = {"epochs": by_mode(fast, **TRANSFER["epochs"]), "scheduler": TRANSFER["scheduler"],
              "warmup_ratio": TRANSFER["warmup_ratio"]}
    if strategy in TRANSFER["backbone_lr"]:
        groups = param_groups(model, lr=TRANSFER["lr"], backbone_lr=TRANSFER["backbone_lr"][strategy],
                              weight_decay=0.0)
        kwargs["optimizer"] = AdamW(groups)
    else:
        kwargs.update(optimizer="adamw", lr=TRANSFER["lr"])
    return kwargs


def _train(model: nn.Module, split: Split, batch_size: int, seed: int, name: str, **kwargs) -> History:
    """``fit`` on ``split`` with fresh seeded loaders, under ``RULE``; ``kwargs``: epochs, optimizer and the rest."""
    train, val, _ = make_loaders(split, batch_size, seed=seed)
    return fit(model, train, val, checkpoint=BestCheckpoint(**RULE), name=name, split_hash=split.split_hash, **kwargs)


def pretrain(seed: int = 0, fast: bool = True, source: Split | None = None, *, device="cpu",
             progress=None) -> tuple[TinyTransformer, History]:
    """Train a fresh model on ``source`` (default ``source_task(seed)``) and keep its best checkpoint."""
    source = source_task(seed) if source is None else source
    seed_everything(seed)
    model = make_model()
    history = _train(model, source, TRANSFER["source_batch_size"], seed, "pretrain",
                     epochs=by_mode(fast, **TRANSFER["source_epochs"]), optimizer="adamw", lr=TRANSFER["source_lr"],
                     scheduler=TRANSFER["scheduler"], warmup_ratio=TRANSFER["warmup_ratio"], device=device,
                     progress=progress)
    return model, history


def adapt(pretrained: nn.Module, strategy: str, target: Split, seed: int = 0, fast: bool = True, *,
          device="cpu", progress=None) -> tuple[nn.Module, History]:
    """Adapt a copy of ``pretrained`` to ``target`` with ``strategy``; returns (model at its kept epoch, history)."""
    model = copy.deepcopy(pretrained)
    seed_everything(seed + 1)  # the same fresh head (and LoRA A) for every strategy of this seed
    prepare(model, strategy)
    history = _train(model, target, TRANSFER["batch_size"], seed, strategy, device=device, progress=progress,
                     **fit_kwargs(model, strategy, fast))
    return model, history


def train_scratch(target: Split, seed: int = 0, fast: bool = True, *, device="cpu",
                  progress=None) -> tuple[nn.Module, History]:
    """The no-pretraining baseline: a fresh model trained on the target labels only, same epochs and rule."""
    seed_everything(seed + 1)
    model = make_model()
    history = _train(model, target, TRANSFER["batch_size"], seed, "scratch", epochs=by_mode(fast, **TRANSFER["epochs"]),
                     optimizer="adamw", lr=TRANSFER["scratch_lr"], scheduler=TRANSFER["scheduler"],
                     warmup_ratio=TRANSFER["warmup_ratio"], device=device, progress=progress)
    return model, history


def logistic_baseline(target: Split) -> dict:
    """Logistic regression on ``one_hot_features`` of the target training set.

    Returns ``{"val", "test"}`` accuracies, ``"params"`` (its coefficients) and ``"seconds"`` (features and
    fit, not the import of scikit-learn).
    """
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    V = target.info.get("vocab_size", TRANSFER["model"]["vocab_size"])
    clf = LogisticRegression(max_iter=2000).fit(one_hot_features(target.X_train, V), target.y_train.numpy())
    seconds = time.perf_counter() - t0
    return {"val": float(clf.score(one_hot_features(target.X_val, V), target.y_val.numpy())),
            "test": float(clf.score(one_hot_features(target.X_test, V), target.y_test.numpy())),
            "params": int(clf.coef_.size + clf.intercept_.size), "seconds": seconds}


def _evidence(model: nn.Module, history: History, test_loader) -> dict:
    kept = history.kept_row()
    return {"best_value": history.best_value, "best_epoch": history.best_epoch, "final_value": history[-1]["val_acc"],
            "train_acc": kept["train_acc"], "test_acc": evaluate(model, test_loader)["acc"],
            "trainable_params": history.trainable_params}


def run(seed: int = 0, fast: bool = True, strategies=STRATEGIES, baselines: bool = True) -> dict:
    """Replay the scenario for one seed: pretrain, adapt with each strategy, and the baselines.

    Returns ``{"source_val_acc": float, strategy: {"best_value", "best_epoch", "final_value", "train_acc",
    "test_acc", "trainable_params"}, ...}``, plus ``"scratch"`` and ``"logreg"`` (``logistic_baseline``'s dict)
    when ``baselines``. ``best_value`` is the kept validation accuracy under ``RULE``.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"strategies must be names from {STRATEGIES}, got {unknown}")
    target = target_task(seed)
    _, _, test = make_loaders(target, TRANSFER["batch_size"], seed=seed)
    pretrained, history = pretrain(seed, fast)
    out = {"source_val_acc": history.best_value}
    for strategy in strategies:
        out[strategy] = _evidence(*adapt(pretrained, strategy, target, seed, fast), test)
    if baselines:
        out["scratch"] = _evidence(*train_scratch(target, seed, fast), test)
        out["logreg"] = logistic_baseline(target)
    return out
