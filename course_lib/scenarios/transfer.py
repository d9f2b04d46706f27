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
modes. Partial unfreezing (the top block at ``backbone_lr`` 3e-3, a third of the head's LR: 0.75-0.97 in fast
mode on seeds 0-4) varies with the seed, so whether it is *enough* is read from the learner's own run, never
from a constant.

Notebook 05's backbone-LR study (``LR_ARMS``, ``run_lr_study``) adds the same top block at the head's LR and 10x
smaller, staged unfreezing (``adapt_staged``: the head first, then the block), and full fine-tuning with a
too-high backbone LR (10x the head's) next to the first move (10x smaller); every run also reports ``reuse``:
per-block weight drift and the source-task accuracy of the adapted backbone (forgetting). On every tested seed
and in both modes the test checks that the 10x smaller LR moves the top block at most 0.6 times as far, that
the too-high LR ends low on the target (final val_acc <= 0.60) and that the first move repairs it; in fast mode
also that the smaller LR costs target accuracy and that staged unfreezing moves the block less and is not
better by more than 2 points (``check_lr_study`` in ``tests/test_scenario_transfer.py`` gives the measured
ranges). Forgetting is reported, not asserted: in full mode the too-high run often keeps epoch 1 or 2, before
the backbone is rewritten.

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
from ..drift import weight_drift
from ..freezing import fit_stages, param_groups, unfreeze, unfreeze_top_k
from ..lora import add_lora, lora_layers, merge_lora
from ..models import PROJECTIONS, TinyTransformer
from ..runtime import seed_everything
from ..token_tasks import one_hot_features, source_task, target_task
from ..train import History, evaluate, fit
from . import by_mode

__all__ = ["TRANSFER", "STRATEGIES", "RULE", "LR_ARMS", "make_model", "prepare", "fit_kwargs", "pretrain",
           "adapt", "stages", "adapt_staged", "lr_arm", "source_accuracy", "reuse", "train_scratch",
           "logistic_baseline", "run", "run_lr_study", "SPREAD_OFFSETS", "training_spread"]

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
    "backbone_lr": {"partial_unfreeze": 3e-3, "full_finetune": 3e-3},  # pretrained weights that train: < lr
    # notebook 05's backbone-LR study: the same LR as the head, 10x smaller, and a too-high one (10x the head)
    "lr_study": {"same": 1e-2, "smaller": 1e-3, "too_high": 1e-1},
    "scratch_lr": 3e-3,
    "partial_k": 1,
    "stage_epochs": {"fast": (5, 15), "full": (15, 45)},  # staged unfreezing: head only, then the top block too
    "lora_targets": PROJECTIONS, "lora_r": 4, "lora_alpha": 8,
}
"""Every setting of the scenario; the notebooks read them from here, so they and the tests agree."""

STRATEGIES = ("frozen_head", "partial_unfreeze", "adapter", "full_finetune")
"""Adaptation strategies of a pretrained model (``scratch`` is separate: it has no pretrained model)."""

RULE = {"metric": "val_acc", "mode": "max"}
"""The one checkpoint rule of the scenario: ``BestCheckpoint(**RULE)``."""


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


def fit_kwargs(model: nn.Module, strategy: str, fast: bool, *, backbone_lr: float | None = None,
               layer_decay: float | None = None) -> dict:
    """The ``fit`` arguments of ``strategy`` for a prepared ``model``: epochs, schedule and the optimizer.

    Strategies that train pretrained weights get parameter groups (``freezing.param_groups``): the head at
    ``lr``, the pretrained backbone at ``backbone_lr`` (default ``TRANSFER["backbone_lr"][strategy]``), each
    block ``layer_decay`` times the block above when given; the others AdamW at ``lr``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    kwargs = {"epochs": by_mode(fast, **TRANSFER["epochs"]), "scheduler": TRANSFER["scheduler"],
              "warmup_ratio": TRANSFER["warmup_ratio"]}
    if strategy in TRANSFER["backbone_lr"]:
        groups = param_groups(model, lr=TRANSFER["lr"], weight_decay=0.0, layer_decay=layer_decay,
                              backbone_lr=TRANSFER["backbone_lr"][strategy] if backbone_lr is None else backbone_lr)
        kwargs["optimizer"] = AdamW(groups)
    elif backbone_lr is not None or layer_decay is not None:
        raise ValueError(f"backbone_lr and layer_decay are for strategies that train pretrained weights "
                         f"{tuple(TRANSFER['backbone_lr'])}, not {strategy!r}")
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
          device="cpu", progress=None, backbone_lr: float | None = None, layer_decay: float | None = None,
          prepare_fn=None, name: str | None = None) -> tuple[nn.Module, History]:
    """Adapt a copy of ``pretrained`` to ``target`` with ``strategy``; returns (model at its kept epoch, history).

    ``backbone_lr`` / ``layer_decay``: override ``fit_kwargs``'s for the strategies that train pretrained
    weights. ``prepare_fn(model, strategy)``: replaces ``prepare`` (a learner's own version; it must give the
    fresh head itself). ``name``: the history's name (default ``strategy``).
    """
    model = copy.deepcopy(pretrained)
    seed_everything(seed + 1)  # the same fresh head (and LoRA A) for every strategy of this seed
    model = (prepare if prepare_fn is None else prepare_fn)(model, strategy)
    history = _train(model, target, TRANSFER["batch_size"], seed, name or strategy, device=device, progress=progress,
                     **fit_kwargs(model, strategy, fast, backbone_lr=backbone_lr, layer_decay=layer_decay))
    return model, history


def stages(fast: bool) -> list[tuple[int, int]]:
    """The staged unfreezing schedule: ``[(0, head epochs), (partial_k, the rest)]``, as many epochs as one run."""
    head_epochs, block_epochs = by_mode(fast, **TRANSFER["stage_epochs"])
    return [(0, head_epochs), (TRANSFER["partial_k"], block_epochs)]


def adapt_staged(pretrained: nn.Module, target: Split, seed: int = 0, fast: bool = True, *, device="cpu",
                 progress=None, backbone_lr: float | None = None, name: str = "staged_unfreeze"
                 ) -> tuple[nn.Module, History]:
    """Staged unfreezing of a copy of ``pretrained`` (``freezing.fit_stages`` over ``stages(fast)``).

    The same fresh head, batches, rule and total epochs as ``adapt``; every stage has its own warmup + cosine
    schedule, the head at ``lr`` and the unfrozen block at ``backbone_lr`` (default
    ``TRANSFER["backbone_lr"]["partial_unfreeze"]``). Returns (model at its kept epoch, history).
    """
    model = copy.deepcopy(pretrained)
    seed_everything(seed + 1)
    model.head.reset_parameters()
    train, val, _ = make_loaders(target, TRANSFER["batch_size"], seed=seed)
    backbone_lr = TRANSFER["backbone_lr"]["partial_unfreeze"] if backbone_lr is None else backbone_lr
    history = fit_stages(model, stages(fast), train, val, lr=TRANSFER["lr"], weight_decay=0.0, backbone_lr=backbone_lr,
                         checkpoint=BestCheckpoint(**RULE), name=name, split_hash=target.split_hash,
                         scheduler=TRANSFER["scheduler"], warmup_ratio=TRANSFER["warmup_ratio"], device=device,
                         progress=progress)
    return model, history


def source_accuracy(model: nn.Module, pretrained: nn.Module, source: Split, *, device="cpu") -> float:
    """Forgetting: the adapted backbone of ``model`` with ``pretrained``'s (source-task) head, on ``source``'s val set.

    1.0 means the adapted backbone still solves the source task as well as it did; a drop is what adaptation
    overwrote. LoRA layers are merged in a copy; ``model`` is not changed.
    """
    probe = copy.deepcopy(model)
    if lora_layers(probe):
        merge_lora(probe)
    probe.head.load_state_dict(pretrained.head.state_dict())
    _, val, _ = make_loaders(source, TRANSFER["source_batch_size"], seed=0)
    return float(evaluate(probe, val, device=device)["acc"])


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


SPREAD_OFFSETS = (100, 200)
"""Notebook 09's spread: the training seeds ``seed + offset`` rerun next to the notebook's own ``seed``."""


def training_spread(source: Split, target: Split, strategies, seed: int = 0, fast: bool = True, *,
                    offsets=SPREAD_OFFSETS, device="cpu", prepare_fn=None) -> dict:
    """Kept val_acc of ``strategies`` retrained with the training seeds ``seed + offset``, on the same splits.

    For each offset the whole training is redone with that seed: ``pretrain(seed + offset, fast, source)`` (a new
    initialisation and batch order of pretraining), then ``adapt(..., seed + offset)`` for every strategy (a new
    fresh head, LoRA ``A`` and batch order). The data stay the notebook's (``source`` and ``target``, split by the
    notebook's ``seed``), so the values are comparable under one rule with the notebook's own run: what a
    learner's ``seed`` changes in training, without changing the task. Returns ``{strategy: [value per offset]}``.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"strategies must be names from {STRATEGIES}, got {unknown}")
    if not offsets or any(int(k) != k or k <= 0 for k in offsets):
        raise ValueError(f"offsets must be positive whole numbers (seed + offset), got {offsets}")
    out = {s: [] for s in strategies}
    for k in offsets:
        pretrained, _ = pretrain(seed + k, fast, source, device=device, progress=False)
        for s in strategies:
            _, history = adapt(pretrained, s, target, seed + k, fast, device=device, progress=False,
                               prepare_fn=prepare_fn)
            out[s].append(history.best_value)
    return out


def _evidence(model: nn.Module, history: History, test_loader, pretrained: nn.Module | None = None,
              source: Split | None = None) -> dict:
    kept = history.kept_row()
    ev = {"best_value": history.best_value, "best_epoch": history.best_epoch, "final_value": history[-1]["val_acc"],
          "train_acc": kept["train_acc"], "test_acc": evaluate(model, test_loader)["acc"],
          "trainable_params": history.trainable_params}
    if pretrained is not None:
        ev["drift"] = weight_drift(pretrained, model)
        ev["source_acc"] = source_accuracy(model, pretrained, source)
    return ev


def reuse(model: nn.Module, pretrained: nn.Module, source: Split, *, device="cpu") -> dict:
    """How much of the pretrained model an adapted ``model`` kept: ``{"drift": weight_drift(...), "source_acc": ...}``.

    ``drift``: per layer ``||W - W0|| / ||W0||`` (``course_lib.drift.weight_drift``, head excluded);
    ``source_acc``: ``source_accuracy`` (forgetting: the source task read through the adapted backbone).
    """
    return {"drift": weight_drift(pretrained, model), "source_acc": source_accuracy(model, pretrained, source,
                                                                                   device=device)}


def run(seed: int = 0, fast: bool = True, strategies=STRATEGIES, baselines: bool = True) -> dict:
    """Replay the scenario for one seed: pretrain, adapt with each strategy, and the baselines.

    Returns ``{"source_val_acc": float, strategy: {"best_value", "best_epoch", "final_value", "train_acc",
    "test_acc", "trainable_params", "drift", "source_acc"}, ...}``, plus ``"scratch"`` and ``"logreg"``
    (``logistic_baseline``'s dict) when ``baselines``. ``best_value`` is the kept validation accuracy under
    ``RULE``; ``drift`` and ``source_acc`` are ``reuse``'s (per-layer weight drift, forgetting).
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"strategies must be names from {STRATEGIES}, got {unknown}")
    source, target = source_task(seed), target_task(seed)
    _, _, test = make_loaders(target, TRANSFER["batch_size"], seed=seed)
    pretrained, history = pretrain(seed, fast, source)
    out = {"source_val_acc": history.best_value}
    for strategy in strategies:
        out[strategy] = _evidence(*adapt(pretrained, strategy, target, seed, fast), test, pretrained, source)
    if baselines:
        out["scratch"] = _evidence(*train_scratch(target, seed, fast), test)
        out["logreg"] = logistic_baseline(target)
    return out


LR_ARMS = ("partial_same_lr", "partial_smaller_lr", "staged_unfreeze", "full_too_high_lr", "full_smaller_lr")
"""Notebook 05's backbone-LR study, by name (see ``lr_arm``)."""


def lr_arm(pretrained: nn.Module, arm: str, target: Split, seed: int = 0, fast: bool = True, *, device="cpu",
           progress=None) -> tuple[nn.Module, History]:
    """One run of the backbone-LR study (``LR_ARMS``), under the same rule, batches and epochs as ``adapt``.

    ``partial_same_lr`` / ``partial_smaller_lr``: the top block at ``lr_study["same"]`` (the head's LR) /
    ``lr_study["smaller"]`` (10x smaller); ``staged_unfreeze``: ``adapt_staged`` (head first, then the top block
    at ``backbone_lr["partial_unfreeze"]``); ``full_too_high_lr``: full fine-tuning with the backbone at
    ``lr_study["too_high"]`` (10x the head); ``full_smaller_lr``: the first move, the backbone 10x smaller than
    that (``lr_study["same"]``).
    """
    study = TRANSFER["lr_study"]
    arms = {"partial_same_lr": ("partial_unfreeze", study["same"]),
            "partial_smaller_lr": ("partial_unfreeze", study["smaller"]),
            "full_too_high_lr": ("full_finetune", study["too_high"]),
            "full_smaller_lr": ("full_finetune", study["same"])}
    if arm == "staged_unfreeze":
        return adapt_staged(pretrained, target, seed, fast, device=device, progress=progress, name=arm)
    if arm not in arms:
        raise ValueError(f"arm must be one of {LR_ARMS}, got {arm!r}")
    strategy, backbone_lr = arms[arm]
    return adapt(pretrained, strategy, target, seed, fast, device=device, progress=progress, backbone_lr=backbone_lr,
                 name=arm)


def run_lr_study(seed: int = 0, fast: bool = True, arms=LR_ARMS + ("partial_unfreeze",)) -> dict:
    """Replay notebook 05's backbone-LR study for one seed: ``{arm: {"best_value", ..., "drift", "source_acc"}}``.

    ``arms``: names from ``LR_ARMS``, or ``"partial_unfreeze"`` (the scenario's one-shot partial unfreeze).
    """
    source, target = source_task(seed), target_task(seed)
    _, _, test = make_loaders(target, TRANSFER["batch_size"], seed=seed)
    pretrained, _ = pretrain(seed, fast, source)
    out = {}
    for arm in arms:
        run_ = adapt(pretrained, arm, target, seed, fast) if arm in STRATEGIES else lr_arm(pretrained, arm, target,
                                                                                             seed, fast)
        out[arm] = _evidence(*run_, test, pretrained, source)
    return out
