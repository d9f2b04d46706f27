"""Digits data with one fixed split per seed, a split hash, and a fast in-memory batch loader.

scikit-learn's digits (1,797 8x8 grey images, 10 classes) ships inside the package: nothing downloads.
Pixels are scaled to [0, 1] (the raw values are 0..16). Every split is stratified by class and fixed by
``seed``; ``split_hash`` names it so that runs on different splits cannot be compared by accident.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

__all__ = ["Split", "TensorLoader", "digits_split", "make_loaders", "split_hash"]


@dataclass
class Split:
    """Train / validation / test tensors of one split.

    ``X_*``: float32 ``(n, 64)`` (or long ``(n, L)`` for token tasks); ``y_*``: long ``(n,)``.
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    split_hash: str
    n_classes: int = 10
    info: dict = field(default_factory=dict)

    def sizes(self) -> dict:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def __repr__(self) -> str:
        s = self.sizes()
        return (f"Split(train={s['train']}, val={s['val']}, test={s['test']}, n_classes={self.n_classes}, "
                f"split_hash={self.split_hash!r})")


def split_hash(*index_arrays, tag: str = "") -> str:
    """12 hex characters identifying a split: a SHA-1 over ``tag`` and the index arrays, in order."""
    h = hashlib.sha1(tag.encode())
    for idx in index_arrays:
        h.update(b"|")
        h.update(np.asarray(idx, dtype=np.int64).tobytes())
    return h.hexdigest()[:12]


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def _stratified(labels: np.ndarray, fractions, rng: np.random.Generator):
    """Split indices class by class so each part keeps the class proportions."""
    parts = [[] for _ in fractions]
    bounds = np.cumsum(fractions)[:-1]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(bounds * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _stratified_take(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``n`` positions of ``labels``, class proportions kept (largest remainder), at least one per class."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / counts.sum()
    take = np.maximum(np.floor(quota).astype(int), 1)
    for i in np.argsort(-(quota - np.floor(quota)))[: max(n - take.sum(), 0)]:
        take[i] += 1
    while take.sum() > n:  # only when the one-per-class floor overshot
        take[np.argmax(take)] -= 1
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)])


def digits_split(seed: int = 0, *, fractions=(0.6, 0.2, 0.2), classes=None, n_train: int | None = None,
                 label_noise: float = 0.0) -> Split:
    """The digits split for ``seed``: stratified train/val/test with the given ``fractions``.

    Args:
        classes: keep only these digits (relabelled 0..k-1 in the given order), e.g. ``range(5)``.
        n_train: keep only this many training examples (stratified): the small-data, memorizing scenario.
        label_noise: fraction of *training* labels replaced by a random other class (val/test stay clean).
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers (train, val, test) summing to 1, got {fractions}")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    X, y = _digits()
    tag = f"digits|seed={seed}|fractions={tuple(fractions)}"
    if classes is not None:
        classes = [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c <= 9]
        if bad or len(set(classes)) != len(classes) or len(classes) < 2:
            raise ValueError(f"classes must be >= 2 distinct digits in 0..9, got {classes}")
        keep = np.flatnonzero(np.isin(y, classes))
        remap = {c: i for i, c in enumerate(classes)}
        X, y = X[keep], np.array([remap[c] for c in y[keep]], dtype=np.int64)
        tag += f"|classes={classes}"
    rng = np.random.default_rng(seed)
    train, val, test = _stratified(y, fractions, rng)
    if n_train is not None:
        n_classes_here = len(np.unique(y))
        if not n_classes_here <= n_train <= len(train):
            raise ValueError(f"n_train must be between {n_classes_here} (one per class) and {len(train)}, "
                             f"got {n_train}")
        train = np.sort(train[_stratified_take(y[train], n_train, rng)])
        tag += f"|n_train={n_train}"
    y_train = y[train].copy()
    n_classes = int(y.max()) + 1
    if label_noise > 0:
        flip = rng.random(len(train)) < label_noise
        shift = rng.integers(1, n_classes, size=len(train))
        y_train[flip] = (y_train[flip] + shift[flip]) % n_classes
        tag += f"|label_noise={label_noise}"
    t = torch.from_numpy
    return Split(t(X[train]), t(y_train), t(X[val]), t(y[val]), t(X[test]), t(y[test]),
                 split_hash=split_hash(train, val, test, tag=tag), n_classes=n_classes,
                 info={"seed": seed, "classes": classes, "n_train": n_train, "label_noise": label_noise})


class TensorLoader:
    """Mini-batches ``(x, y)`` from in-memory tensors, much faster than a DataLoader over tiny data.

    Shuffles with its own ``torch.Generator`` (seeded), so the batch order is reproducible and its state
    can be saved and restored (``state_dict`` / ``load_state_dict``) for an exact resume.
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor, batch_size: int = 64, *, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False):
        if len(X) != len(y):
            raise ValueError(f"X and y must have the same length, got {len(X)} and {len(y)}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if len(X) == 0:
            raise ValueError("X is empty: a loader needs at least one example")
        self.X, self.y, self.batch_size = X, y, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.X[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def make_loaders(split: Split, batch_size: int = 64, *, seed: int = 0, eval_batch_size: int = 512):
    """``(train_loader, val_loader, test_loader)``: the train loader shuffles (seeded), the others don't."""
    return (TensorLoader(split.X_train, split.y_train, batch_size, shuffle=True, seed=seed),
            TensorLoader(split.X_val, split.y_val, eval_batch_size),
            TensorLoader(split.X_test, split.y_test, eval_batch_size))
