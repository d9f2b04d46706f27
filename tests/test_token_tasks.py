"""The generated token tasks of the transfer scenario: rules, determinism, baselines' features, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from course_lib.models import TinyTransformer
from course_lib.token_tasks import (
    marker_pairs,
    one_hot_features,
    show_examples,
    source_task,
    target_task,
)


def after_last_marker(X: torch.Tensor, marker: int) -> torch.Tensor:
    """The oracle of both rules: the symbol right after the last ``marker`` of each row, ``(n, T) -> (n,)``."""
    T = X.shape[1]
    last = T - 1 - torch.flip(X == marker, dims=[1]).int().argmax(dim=1)
    assert bool((X == marker).any(1).all()) and bool((last < T - 1).all()), "every row has a marker with a follower"
    return X.gather(1, (last + 1).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("make, n_markers", [(source_task, 1), (target_task, 2)])
def test_every_label_follows_the_last_marker(make, n_markers):
    split = make(3, n_train=300, n_val=200, n_test=100)
    marker = split.info["marker"]
    assert split.info["vocab_size"] == marker + 1 == split.n_classes + 1
    for X, y in ((split.X_train, split.y_train), (split.X_val, split.y_val), (split.X_test, split.y_test)):
        assert X.dtype == torch.int64 and y.dtype == torch.int64 and X.shape[1] == 8
        assert ((X >= 0) & (X <= marker)).all() and ((y >= 0) & (y < marker)).all()
        assert ((X == marker).sum(1) == n_markers).all()
        assert torch.equal(after_last_marker(X, marker), y)
    assert split.sizes() == {"train": 300, "val": 200, "test": 100}


def test_target_markers_are_never_adjacent_and_never_last():
    split = target_task(0, n_train=2000)
    pos = torch.nonzero(split.X_train == split.info["marker"])[:, 1].view(-1, 2)
    assert ((pos[:, 1] - pos[:, 0]) >= 2).all() and (pos[:, 1] <= 6).all()
    # every allowed pair shows up, and nothing else
    seen = {tuple(p) for p in pos.tolist()}
    assert seen == {tuple(p) for p in marker_pairs(8).tolist()}


def test_labels_are_balanced_and_not_readable_from_one_position():
    split = target_task(1, n_train=4000)
    counts = torch.bincount(split.y_train, minlength=8).float() / 4000
    assert counts.min() > 0.10 and counts.max() < 0.15
    # no single position gives the label away: the best one is the last (the second marker is often at
    # position 6, 5 pairs of 15) and agrees with it 40-45% of the time: about what the linear baseline reaches
    agree = (split.X_train == split.y_train[:, None]).float().mean(0)
    assert agree.argmax() == 7 and agree.max() < 0.46, agree


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = target_task(5), target_task(5), target_task(6)
    assert a.split_hash == b.split_hash and torch.equal(a.X_train, b.X_train)
    assert c.split_hash != a.split_hash and not torch.equal(c.X_train, a.X_train)
    assert source_task(5).split_hash != a.split_hash  # separate streams and tags
    assert target_task(5, n_train=100).split_hash != a.split_hash


def test_one_hot_features_mark_position_and_token():
    X = torch.tensor([[0, 8, 3], [2, 2, 8]])
    F = one_hot_features(X)
    assert F.shape == (2, 27) and F.dtype == np.float32
    assert F.sum(1).tolist() == [3, 3]
    assert F[0, 0 * 9 + 0] == F[0, 1 * 9 + 8] == F[0, 2 * 9 + 3] == 1
    assert F[1, 2 * 9 + 8] == 1 and F[1, 2 * 9 + 2] == 0
    assert one_hot_features(X.numpy(), vocab_size=10).shape == (2, 30)


def test_show_examples_prints_the_marker_as_M():
    split = source_task(0)
    lines = show_examples(split, 2).splitlines()
    assert len(lines) == 2 and all(line.count("M") == 1 and "->" in line for line in lines)
    tokens, label = lines[0].split("  ->  ")
    first = split.X_train[0].tolist()
    assert tokens.split() == ["M" if t == 8 else str(t) for t in first] and int(label) == split.y_train[0]


def test_the_tasks_fit_the_scenario_model():
    split = target_task(0)
    model = TinyTransformer(vocab_size=split.info["vocab_size"], max_len=8, n_classes=split.n_classes,
                            d_model=16, n_heads=2, n_layers=1, pos_std=1.0)
    assert model(split.X_val[:5]).shape == (5, 8)
    assert 0.8 < model.pos.std().item() < 1.2
    default = TinyTransformer(vocab_size=9, max_len=8, d_model=64)
    assert default.pos.std().item() < 0.2  # 1/sqrt(d_model) unless asked otherwise


@pytest.mark.parametrize("call, match", [
    (lambda: source_task(-1), "seed must be >= 0"),
    (lambda: source_task(1.5), "seed must be an int"),
    (lambda: target_task(0, n_train=0), "n_train must be >= 1"),
    (lambda: target_task(0, seq_len=3), "seq_len must be >= 4"),
    (lambda: source_task(0, n_symbols=1), "n_symbols must be >= 2"),
    (lambda: one_hot_features(torch.tensor([[0, 9]])), r"tokens must be in \[0, 9\).*vocab_size"),
    (lambda: one_hot_features(torch.tensor([0, 1])), "X must be 2-D"),
    (lambda: show_examples(source_task(0), 0), "n must be >= 1"),
    (lambda: TinyTransformer(vocab_size=9, pos_std=0.0), "pos_std must be None"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
