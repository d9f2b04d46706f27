"""Notebook 02's evidence holds on every seed: the finder's range, and cosine winning at the top of it."""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import pytest

from course_lib.scenarios import schedules as sc

SEEDS = range(5)


def _evidence(seed):
    import torch

    torch.set_num_threads(1)
    return sc.run(seed, fast=True)


@pytest.fixture(scope="module")
def evidence():
    # two worker processes, one thread each: the two cores of CI
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_evidence, SEEDS))


def test_finder_suggestions_are_stable_and_inside_the_range(evidence):
    for ev in evidence:
        low, high = ev["range"]
        assert 2e-3 < ev["minimum/10"] < 5e-2, ev  # the finder sees Adam's usual decade on every seed
        assert low <= ev["lr"] <= high, ev  # the LR the notebook trains with is one the grader accepts
        assert ev["top_lr"] > high, ev  # and the aggressive LR is not
        assert high <= 10 * ev["minimum/10"] / 3 + 1e-12, ev  # never at the loss minimum


def test_cosine_rescues_the_aggressive_lr_on_every_seed(evidence):
    margins = [ev["top_margin"] for ev in evidence]
    relative = [ev["top_margin"] / ev["best_val_loss"]["constant @ top"] for ev in evidence]
    # measured (1 thread, seeds 0-9): 0.021..0.343, relative 7%..53%; the aggressive runs are chaotic, so the
    # thread count moves single values (seed 2 with 2 threads: 0.015), never the sign
    assert min(margins) > 0.005 and min(relative) > 0.03, (margins, relative)
    assert sum(margins) / len(margins) > 0.03, margins


def test_the_finder_lr_beats_the_aggressive_constant_run(evidence):
    for ev in evidence:
        best = ev["best_val_loss"]
        assert min(best["constant @ finder"], best["cosine @ finder"]) < best["constant @ top"], ev


def test_sensible_range_caps_a_steepest_point_past_the_minimum():
    from course_lib.lr_finder import LRFinderResult

    # the minimum at i=20, a rise, then a sharp drop at i=35 (noise in the blow-up): "steepest" lands past it
    lrs = [10 ** (-4 + i * 0.1) for i in range(41)]  # 1e-4 .. 1
    losses = [2.3 - 0.09 * i if i <= 20 else 0.5 + 0.2 * (i - 20) for i in range(41)]
    losses[35] = 1.0
    result = LRFinderResult(lrs=lrs, losses=losses, raw_losses=losses)
    assert result.suggestion("steepest") > 10 * result.suggestion("minimum/10")  # the premise
    low, high = sc.sensible_lr_range(result)
    assert high <= 10 * result.suggestion("minimum/10") / 3 + 1e-12
    assert low <= result.suggestion("minimum/10") <= high
