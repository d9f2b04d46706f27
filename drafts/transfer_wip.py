"""A generated transfer scenario: pretrain on one token rule, adapt to a related rule with few labels.

Sequences are ``seq_len`` tokens. Tokens ``0 .. n_symbols-1`` are ordinary symbols; token ``MARKER =
n_symbols`` is a marker, so ``vocab_size = n_symbols + 1``. Every label is a symbol (``n_classes =
n_symbols``) and both tasks draw symbols uniformly at random::

    source ("after the marker"):   exactly one marker;  label = the symbol right after it
        3 7 M 5 0 2 6 1   ->  5
    target ("after the LAST marker"): exactly two markers, never adjacent; label = the symbol right
        after the second one (the one further right)
        M 4 6 1 M 2 0 7   ->  2

Why this is a good stage for frozen vs partial vs adapter (measured over seeds, see tests/test_transfer.py):

* Frozen backbone + new head (a linear probe) is not enough. The pretrained model has learned "find the
  symbol that follows a marker". Shown two markers, it reads *both* followers and its ``[CLS]`` summary
  mixes the two candidates; which of them came second is not in that summary, so no linear head can
  recover it reliably.
* Partial unfreeze (top block + head) and LoRA adapters are enough: the lower block already marks every
  position that follows a marker; the top block's attention only has to learn to prefer the later one.
  Few labels (200) suffice because the hard part (finding marker followers) is pretrained.
* Non-transfer baselines are clearly worse: a linear model on one-hot (position, token) features
  (``one_hot_features``) cannot tell where the markers are relative to a symbol, and the same transformer
  trained from scratch on 200 labels does not discover the marker rule.

Everything is fixed by ``seed``: the source and target data of one seed come from separate random streams,
and each ``Split`` carries a ``split_hash`` of its exact contents. ``TRANSFER_DEFAULTS`` holds the model
size, epochs (fast / full mode), learning rates and the LoRA setup that the notebooks use.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from .data import Split, TensorLoader, split_hash
from .freezing import unfreeze_top_k
from .lora import add_lora
from .models import TinyTransformer
from .train import History, evaluate, fit

__all__ = ["TRANSFER_DEFAULTS", "STRATEGIES", "source_task", "target_task", "one_hot_features", "make_model",
           "after_last_marker", "pretrain", "adapt", "logistic_baseline", "run"]

STRATEGIES = ("frozen_head", "partial_unfreeze", "lora", "full_finetune", "scratch")
"""Adaptation strategies, from least to most trainable (``scratch``: no pretraining at all)."""

TRANSFER_DEFAULTS: dict = {
    # data
    "n_symbols": 8, "seq_len": 8, "source_n_train": 4000, "target_n_train": 200,
    # model (TinyTransformer in token mode); position embeddings start at std 1, like token embeddings
    "d_model": 32, "n_heads": 2, "n_layers": 2, "pos_std": 1.0,
    # pretraining on the source task
    "pretrain_epochs": {"fast": 8, "full": 30}, "pretrain_lr": 1e-2, "pretrain_batch_size": 64,
    # adaptation on the target task (same schedule for every strategy, one checkpoint rule)
    "adapt_epochs": {"fast": 20, "full": 60}, "adapt_batch_size": 32,
    "adapt_lr": {"frozen_head": 1e-2, "partial_unfreeze": 1e-2, "lora": 1e-2, "full_finetune": 3e-3,
                 "scratch": 3e-3},
    "scheduler": "cosine", "warmup_ratio": 0.05,
    # partial unfreeze: top k blocks + head; LoRA on all six projections + trained head
    "partial_k": 1,
    "lora_r": 4, "lora_alpha": 8,
    "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
}

_SOURCE_STREAM, _TARGET_STREAM = 0, 1


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_common(seed, n_train, n_val, n_test, n_symbols, seq_len, min_len: int) -> None:
    _check_int("seed", seed, 0)
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        _check_int(name, value, 1)
    _check_int("n_symbols", n_symbols, 2)
    _check_int("seq_len", seq_len, min_len)


def _random_symbols(rng: np.random.Generator, n: int, seq_len: int, n_symbols: int) -> np.ndarray:
    return rng.integers(0, n_symbols, size=(n, seq_len), dtype=np.int64)


def _make_split(parts, tag: str, n_symbols: int, info: dict) -> Split:
    """``parts`` = [(X, y)] for train, val, test (numpy) -> ``Split`` with a hash of the exact contents."""
    arrays = [a.ravel() for X, y in parts for a in (X, y)]
    tensors = [torch.from_numpy(a) for X, y in parts for a in (X, y)]
    return Split(*tensors, split_hash=split_hash(*arrays, tag=tag), n_classes=n_symbols, info=info)


def _source_sample(rng, n, seq_len, n_symbols):
    X = _random_symbols(rng, n, seq_len, n_symbols)
    pos = rng.integers(0, seq_len - 1, size=n)           # marker position, leaves room for a follower
    rows = np.arange(n)
    X[rows, pos] = n_symbols                             # the marker token
    return X, X[rows, pos + 1].copy()


def _marker_pairs(seq_len: int) -> np.ndarray:
    """All (p1, p2) with p1 + 2 <= p2 <= seq_len - 2: two markers, not adjacent, each followed by a symbol."""
    return np.array([(a, b) for a, b in itertools.combinations(range(seq_len - 1), 2) if b - a >= 2])


def _target_sample(rng, n, seq_len, n_symbols):
    X = _random_symbols(rng, n, seq_len, n_symbols)
    pairs = _marker_pairs(seq_len)[rng.integers(0, len(_marker_pairs(seq_len)), size=n)]  # (n, 2), uniform
    rows = np.arange(n)
    X[rows, pairs[:, 0]] = n_symbols
    X[rows, pairs[:, 1]] = n_symbols
    return X, X[rows, pairs[:, 1] + 1].copy()


def source_task(seed: int = 0, *, n_train: int = 4000, n_val: int = 1000, n_test: int = 1000,
                n_symbols: int = 8, seq_len: int = 8) -> Split:
    """The pretraining task: one marker per sequence, label = the symbol right after it.

    Returns a ``Split`` with ``X_*`` long ``(n, seq_len)`` in ``[0, n_symbols]`` (``n_symbols`` is the
    marker), ``y_*`` long ``(n,)`` in ``[0, n_symbols)``, ``n_classes = n_symbols`` and ``info`` describing
    the rule (``vocab_size``, ``marker``, ``rule``). The marker position is uniform over ``0 .. seq_len-2``.
    """
    _check_common(seed, n_train, n_val, n_test, n_symbols, seq_len, min_len=2)
    rng = np.random.default_rng([int(seed), _SOURCE_STREAM])
    parts = [_source_sample(rng, n, seq_len, n_symbols) for n in (n_train, n_val, n_test)]
    info = {"task": "source", "rule": "label = the symbol right after the (only) marker", "seed": int(seed),
            "n_symbols": n_symbols, "seq_len": seq_len, "marker": n_symbols, "vocab_size": n_symbols + 1,
            "n_markers": 1}
    tag = f"transfer-source|seed={seed}|n_symbols={n_symbols}|seq_len={seq_len}"
    return _make_split(parts, tag, n_symbols, info)


def target_task(seed: int = 0, *, n_train: int = 200, n_val: int = 500, n_test: int = 2000,
                n_symbols: int = 8, seq_len: int = 8) -> Split:
    """The shifted task: two markers per sequence, label = the symbol right after the second (last) one.

    Same vocabulary, shapes and label space as ``source_task`` (so a pretrained model's input layer fits);
    only the rule changed. The two marker positions are a uniform draw of ``(p1, p2)`` with
    ``p1 + 2 <= p2 <= seq_len - 2`` (not adjacent, both followed by a symbol); needs ``seq_len >= 4``.
    Few labels by default (``n_train=200``): the point of transfer. Val/test are large so that accuracy
    differences between strategies are not noise (2000 test examples: one standard error <= 1.1 points).
    """
    _check_common(seed, n_train, n_val, n_test, n_symbols, seq_len, min_len=4)
    rng = np.random.default_rng([int(seed), _TARGET_STREAM])
    parts = [_target_sample(rng, n, seq_len, n_symbols) for n in (n_train, n_val, n_test)]
    info = {"task": "target", "rule": "label = the symbol right after the second (last) of two markers",
            "seed": int(seed), "n_symbols": n_symbols, "seq_len": seq_len, "marker": n_symbols,
            "vocab_size": n_symbols + 1, "n_markers": 2}
    tag = f"transfer-target|seed={seed}|n_symbols={n_symbols}|seq_len={seq_len}"
    return _make_split(parts, tag, n_symbols, info)


def after_last_marker(X, marker: int) -> torch.Tensor:
    """The symbol right after the last ``marker`` in each row: the label of both tasks (one marker or two).

    ``X`` long ``(n, T)``; returns long ``(n,)``. Raises ``ValueError`` if a row has no marker or ends with it.
    """
    X = torch.as_tensor(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n, seq_len), got shape {tuple(X.shape)}")
    is_marker = X == marker
    if not bool(is_marker.any(dim=1).all()):
        raise ValueError(f"every row of X must contain the marker {marker}; some rows have none")
    T = X.shape[1]
    last = T - 1 - torch.flip(is_marker, dims=[1]).int().argmax(dim=1)  # index of the last marker per row
    if bool((last == T - 1).any()):
        raise ValueError("a row ends with the marker: there is no symbol after it")
    return X.gather(1, (last + 1).unsqueeze(1)).squeeze(1)


def one_hot_features(X, vocab_size: int) -> np.ndarray:
    """One-hot (position, token) features for a linear baseline: ``(n, T)`` long -> ``(n, T * vocab_size)`` float32.

    Feature ``t * vocab_size + v`` is 1 when position ``t`` holds token ``v``. A linear model on these can
    learn "token v at position t votes for class c" but not "the token one place after wherever the marker
    is": that needs an interaction between positions, which is what attention provides.
    """
    _check_int("vocab_size", vocab_size, 1)
    X = np.asarray(X.cpu() if torch.is_tensor(X) else X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n, seq_len), got shape {X.shape}")
    if X.size and (X.min() < 0 or X.max() >= vocab_size):
        raise ValueError(f"tokens must be in [0, {vocab_size}), got values in [{X.min()}, {X.max()}]: "
                         "pass vocab_size = split.info['vocab_size']")
    n, T = X.shape
    out = np.zeros((n, T * vocab_size), dtype=np.float32)
    out[np.arange(n)[:, None], np.arange(T)[None, :] * vocab_size + X] = 1.0
    return out


def make_model(seed: int | None = None, **overrides) -> TinyTransformer:
    """The scenario's ``TinyTransformer`` (token mode), built from ``TRANSFER_DEFAULTS`` plus ``overrides``.

    Keys read: ``n_symbols`` (classes; vocabulary = ``n_symbols + 1``), ``seq_len`` (``max_len``),
    ``d_model``, ``n_heads``, ``n_layers``, ``pos_std``. ``seed`` (optional) seeds torch first, so the
    initial weights repeat. Position embeddings are drawn from ``N(0, pos_std^2)`` (std 1, like the token
    embeddings) instead of the model's small default: with positions as loud as tokens, "the token right
    after the marker" is found within a few epochs on every seed instead of after a long plateau.
    """
    cfg = {k: TRANSFER_DEFAULTS[k] for k in ("n_symbols", "seq_len", "d_model", "n_heads", "n_layers", "pos_std")}
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise TypeError(f"make_model got unknown keys {unknown}; allowed: {sorted(cfg)}")
    cfg.update(overrides)
    if not cfg["pos_std"] > 0:
        raise ValueError(f"pos_std must be > 0, got {cfg['pos_std']}")
    if seed is not None:
        torch.manual_seed(seed)
    model = TinyTransformer(vocab_size=cfg["n_symbols"] + 1, max_len=cfg["seq_len"], n_classes=cfg["n_symbols"],
                            d_model=cfg["d_model"], n_heads=cfg["n_heads"], n_layers=cfg["n_layers"])
    nn.init.normal_(model.pos, std=cfg["pos_std"])
    return model


def _mode(fast: bool) -> str:
    return "fast" if fast else "full"


def _fit(model, split: Split, *, epochs: int, lr: float, batch_size: int, seed: int, name: str) -> History:
    cfg = TRANSFER_DEFAULTS
    train = TensorLoader(split.X_train, split.y_train, batch_size, shuffle=True, seed=seed)
    val = TensorLoader(split.X_val, split.y_val, 1024)
    return fit(model, train, val, epochs=epochs, optimizer="adamw", lr=lr, scheduler=cfg["scheduler"],
               warmup_ratio=cfg["warmup_ratio"], device="cpu", name=name, split_hash=split.split_hash,
               progress=False)


def pretrain(seed: int = 0, fast: bool = True, source: Split | None = None) -> tuple[TinyTransformer, History]:
    """Train ``make_model(seed)`` on ``source`` (default ``source_task(seed)``); the best checkpoint is kept."""
    cfg = TRANSFER_DEFAULTS
    source = source_task(seed) if source is None else source
    model = make_model(seed)
    history = _fit(model, source, epochs=cfg["pretrain_epochs"][_mode(fast)], lr=cfg["pretrain_lr"],
                   batch_size=cfg["pretrain_batch_size"], seed=seed, name="pretrain")
    return model, history


def adapt(pretrained: nn.Module | None, strategy: str, target: Split, seed: int = 0,
          fast: bool = True) -> tuple[nn.Module, History]:
    """Adapt a *copy* of ``pretrained`` to ``target`` with one strategy of ``STRATEGIES``; returns (model, history).

    Every strategy gets a fresh head and the same epochs, schedule, batches and checkpoint rule:

    * ``frozen_head``: backbone frozen, head trained (a linear probe on the pretrained features).
    * ``partial_unfreeze``: the top ``partial_k`` block(s) + head trained.
    * ``lora``: ``add_lora`` on ``lora_targets`` (rank ``lora_r``, ``lora_alpha``) + head trained.
    * ``full_finetune``: every parameter trained.
    * ``scratch``: a new randomly initialised model trained on the target labels only (``pretrained`` unused).
    """
    import copy

    cfg = TRANSFER_DEFAULTS
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "scratch" and pretrained is None:
        raise ValueError(f"strategy {strategy!r} needs the pretrained model (pass None only for 'scratch')")
    torch.manual_seed(seed + 1)
    if strategy == "scratch":
        model = make_model()
    else:
        model = copy.deepcopy(pretrained)
        model.head.reset_parameters()
    if strategy == "frozen_head":
        unfreeze_top_k(model, 0)
    elif strategy == "partial_unfreeze":
        unfreeze_top_k(model, cfg["partial_k"])
    elif strategy == "lora":
        add_lora(model, cfg["lora_targets"], r=cfg["lora_r"], alpha=cfg["lora_alpha"], train_modules=("head",))
    history = _fit(model, target, epochs=cfg["adapt_epochs"][_mode(fast)], lr=cfg["adapt_lr"][strategy],
                   batch_size=cfg["adapt_batch_size"], seed=seed, name=strategy)
    return model, history


def logistic_baseline(target: Split, C: float = 1.0) -> float:
    """Test accuracy of scikit-learn's logistic regression on ``one_hot_features`` of the target training set."""
    from sklearn.linear_model import LogisticRegression

    V = target.info.get("vocab_size", int(target.X_train.max()) + 1)
    clf = LogisticRegression(C=C, max_iter=2000).fit(one_hot_features(target.X_train, V), target.y_train.numpy())
    return float(clf.score(one_hot_features(target.X_test, V), target.y_test.numpy()))


def run(seed: int = 0, fast: bool = True, strategies=STRATEGIES, baseline: bool = True) -> dict:
    """Replay the scenario for one seed: pretrain, then each strategy on the target; return the evidence.

    Returns ``{"source_val_acc", "pretrain_seconds", "logistic_regression" (test acc), strategy: {"test_acc",
    "val_acc", "trainable_params", "seconds", "best_epoch"}}``.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"strategies must be names from {STRATEGIES}, got {unknown}")
    target = target_task(seed)
    test = TensorLoader(target.X_test, target.y_test, 2048)
    model, hist = pretrain(seed, fast)
    out = {"source_val_acc": max(r["val_acc"] for r in hist), "pretrain_seconds": hist.seconds}
    for strategy in strategies:
        adapted, h = adapt(model, strategy, target, seed, fast)
        out[strategy] = {"test_acc": evaluate(adapted, test)["acc"], "val_acc": h[h.best_epoch - 1]["val_acc"],
                         "trainable_params": h.trainable_params, "seconds": h.seconds, "best_epoch": h.best_epoch}
    if baseline:
        out["logistic_regression"] = logistic_baseline(target)
    return out
