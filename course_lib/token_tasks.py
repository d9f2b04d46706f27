"""Generated token-sequence tasks for transfer: pretrain on one marker rule, adapt to a related rule.

Sequences have ``seq_len`` tokens. Tokens ``0 .. n_symbols-1`` are ordinary symbols and token
``n_symbols`` is the *marker*, so ``vocab_size = n_symbols + 1``. Every label is a symbol
(``n_classes = n_symbols``); the symbols are drawn uniformly at random::

    source ("after the marker"):  one marker, label = the symbol right after it
        3 7 M 5 0 2 6 1   ->  5
    target ("after the LAST marker"):  two markers, never adjacent, label = the symbol right after the second
        M 4 6 1 M 2 0 7   ->  2

Why this pair is a fair stage for frozen vs partial vs adapter:

* A model pretrained on the source task has learned to find the symbol that follows a marker. Shown two
  markers, its summary of the sequence mixes both followers; which of them came second is not in it, so a
  new head on frozen features (a linear probe) cannot recover the label reliably.
* The lower layers' work (marking every position that follows a marker) is still useful: the top layers
  only have to learn to prefer the later follower. That needs changes inside the backbone, which partial
  unfreezing and LoRA adapters provide, and few labels suffice because the hard part is pretrained.
* Simple baselines cannot express the rule: a linear model on one-hot ``(position, token)`` features
  (``one_hot_features``) sees each token on its own, not where it sits relative to the marker.

Everything is fixed by ``seed``: source and target data of one seed come from separate random streams, and
each ``Split`` carries a ``split_hash`` of its exact contents, so runs on different data cannot be compared.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from .data import Split, split_hash

__all__ = ["source_task", "target_task", "one_hot_features", "marker_pairs", "show_examples"]

_SOURCE_STREAM, _TARGET_STREAM = 0, 1


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_args(seed, n_train, n_val, n_test, n_symbols, seq_len, min_len: int) -> None:
    _check_int("seed", seed, 0)
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        _check_int(name, value, 1)
    _check_int("n_symbols", n_symbols, 2)
    _check_int("seq_len", seq_len, min_len)


def marker_pairs(seq_len: int) -> np.ndarray:
    """All marker positions ``(p1, p2)`` of the target task: ``p1 + 2 <= p2 <= seq_len - 2``, shape ``(m, 2)``.

    The two markers are never adjacent and each is followed by a symbol.
    """
    _check_int("seq_len", seq_len, 4)
    return np.array([(a, b) for a, b in itertools.combinations(range(seq_len - 1), 2) if b - a >= 2])


def _source_sample(rng: np.random.Generator, n: int, seq_len: int, n_symbols: int):
    X = rng.integers(0, n_symbols, size=(n, seq_len), dtype=np.int64)
    pos = rng.integers(0, seq_len - 1, size=n)  # the marker, with room for a follower
    rows = np.arange(n)
    X[rows, pos] = n_symbols
    return X, X[rows, pos + 1].copy()


def _target_sample(rng: np.random.Generator, n: int, seq_len: int, n_symbols: int):
    X = rng.integers(0, n_symbols, size=(n, seq_len), dtype=np.int64)
    pairs = marker_pairs(seq_len)
    pairs = pairs[rng.integers(0, len(pairs), size=n)]  # (n, 2), uniform over the allowed pairs
    rows = np.arange(n)
    X[rows, pairs[:, 0]] = n_symbols
    X[rows, pairs[:, 1]] = n_symbols
    return X, X[rows, pairs[:, 1] + 1].copy()


def _make_split(sampler, rng, sizes, tag: str, info: dict, n_symbols: int, seq_len: int) -> Split:
    parts = [sampler(rng, n, seq_len, n_symbols) for n in sizes]
    arrays = [a for X, y in parts for a in (X.ravel(), y)]
    tensors = [torch.from_numpy(a) for X, y in parts for a in (X, y)]
    return Split(*tensors, split_hash=split_hash(*arrays, tag=tag), n_classes=n_symbols, info=info)


def source_task(seed: int = 0, *, n_train: int = 4000, n_val: int = 1000, n_test: int = 1000,
                n_symbols: int = 8, seq_len: int = 8) -> Split:
    """The pretraining task: one marker per sequence, label = the symbol right after it.

    Returns a ``Split``: ``X_*`` long ``(n, seq_len)`` with values in ``[0, n_symbols]`` (``n_symbols`` is the
    marker), ``y_*`` long ``(n,)`` in ``[0, n_symbols)``, ``n_classes = n_symbols``, and ``info`` with
    ``vocab_size``, ``marker`` and the ``rule`` in words. The marker position is uniform over ``0 .. seq_len-2``.
    """
    _check_args(seed, n_train, n_val, n_test, n_symbols, seq_len, min_len=2)
    rng = np.random.default_rng([int(seed), _SOURCE_STREAM])
    info = {"task": "source", "rule": "label = the symbol right after the marker", "seed": int(seed),
            "n_symbols": n_symbols, "seq_len": seq_len, "marker": n_symbols, "vocab_size": n_symbols + 1}
    tag = f"tokens-source|seed={seed}|n_symbols={n_symbols}|seq_len={seq_len}"
    return _make_split(_source_sample, rng, (n_train, n_val, n_test), tag, info, n_symbols, seq_len)


def target_task(seed: int = 0, *, n_train: int = 200, n_val: int = 500, n_test: int = 2000,
                n_symbols: int = 8, seq_len: int = 8) -> Split:
    """The shifted task: two markers per sequence, label = the symbol right after the second (last) one.

    Same vocabulary, shapes and label space as ``source_task`` (a pretrained model's input layer fits); only
    the rule changed. The marker positions are a uniform draw from ``marker_pairs(seq_len)`` (needs
    ``seq_len >= 4``). Few labels by default (``n_train=200``): the point of transfer. Validation and test
    are larger, so that differences between strategies are not noise (2,000 test sequences: one standard
    error is at most 1.1 points of accuracy).
    """
    _check_args(seed, n_train, n_val, n_test, n_symbols, seq_len, min_len=4)
    rng = np.random.default_rng([int(seed), _TARGET_STREAM])
    info = {"task": "target", "rule": "label = the symbol right after the second (last) of two markers",
            "seed": int(seed), "n_symbols": n_symbols, "seq_len": seq_len, "marker": n_symbols,
            "vocab_size": n_symbols + 1}
    tag = f"tokens-target|seed={seed}|n_symbols={n_symbols}|seq_len={seq_len}"
    return _make_split(_target_sample, rng, (n_train, n_val, n_test), tag, info, n_symbols, seq_len)


def one_hot_features(X, vocab_size: int = 9) -> np.ndarray:
    """One-hot ``(position, token)`` features for a linear baseline: ``(n, T)`` -> ``(n, T * vocab_size)`` float32.

    Feature ``t * vocab_size + v`` is 1 when position ``t`` holds token ``v``. A linear model on these can learn
    "token v at position t votes for class c", but not "the token one place after wherever the marker is":
    that needs an interaction between positions, which is what attention provides. ``vocab_size`` defaults
    to the tasks' default (8 symbols + the marker); pass ``split.info["vocab_size"]`` for other sizes.
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


def show_examples(split: Split, n: int = 4) -> str:
    """The first ``n`` training sequences of a token task as text, the marker printed as ``M``::

        3 7 M 5 0 2 6 1  ->  5
    """
    _check_int("n", n, 1)
    marker = split.info.get("marker")
    if marker is None:
        raise ValueError("split has no info['marker']: pass a split from source_task or target_task")
    lines = []
    for x, y in zip(split.X_train[:n].tolist(), split.y_train[:n].tolist()):
        tokens = " ".join("M" if t == marker else str(t) for t in x)
        lines.append(f"{tokens}  ->  {y}")
    return "\n".join(lines)
