"""The LoRA rank sweep of notebook 06 (course_lib.scenarios.lora_rank): it runs what the transfer scenario proves.

The graded rank is computed from the learner's own sweep (mean of three training seeds, a stated tolerance) by
the hidden tests, and the ranks are the same in fast and full mode, so there is no fixed answer to prove over
seeds here. What is proven: the notebook's adapter run *is* ``transfer.adapt``'s (one source), the three scaling
rules are one run at r = 1 (the notebook reuses it), the arms differ where they should, and the 7B count's
explanation in the notebook adds up; and the one variant fact that held on every seed measured in fast mode (the high LR
at r = 8, ``test_alpha_2r_at_rank_8_loses_at_the_high_lr``).
"""
from __future__ import annotations

import functools

import pytest
import torch
from nbutil import scenario_seeds

from course_lib.lora import lora_layers, lora_scaling
from course_lib.lora_variants import DoRALinear
from course_lib.models import TinyTransformer
from course_lib.params import count_parameters
from course_lib.scenarios import lora_rank, transfer
from course_lib.token_tasks import source_task, target_task

SEEDS = scenario_seeds()


@functools.lru_cache(maxsize=1)
def _pretrained(seed: int):
    """Fast-mode pretraining of ``seed``, once per seed for the whole module (seed 0 serves every test)."""
    return transfer.pretrain(seed, True, source_task(seed))[0]


@pytest.fixture(scope="module")
def setting():
    seed = 0
    return seed, _pretrained(seed), target_task(seed)


def _same_history(a, b):
    keys = ("train_loss", "val_loss", "val_acc")
    return [[row[k] for k in keys] for row in a] == [[row[k] for k in keys] for row in b]


def test_adapt_lora_is_the_transfer_scenarios_adapter(setting, one_thread):
    seed, pretrained, target = setting
    cfg = transfer.TRANSFER
    assert (cfg["lora_r"], cfg["lora_alpha"]) == (4, 8)  # arm "lora" at r = 4 has alpha 2 r = 8
    ours_model, ours = lora_rank.adapt_lora(pretrained, target, 4, arm="lora", seed=seed, fast=True)
    ref_model, ref = transfer.adapt(pretrained, "adapter", target, seed, True)
    assert _same_history(ours, ref) and ours.best_epoch == ref.best_epoch
    for (n, p), (m, q) in zip(ours_model.state_dict().items(), ref_model.state_dict().items()):
        assert n == m and torch.equal(p, q), n


def test_scaling_rules_agree_at_rank_one_and_arms_differ(setting, one_thread):
    seed, pretrained, target = setting
    runs = {arm: lora_rank.adapt_lora(pretrained, target, 1, arm=arm, seed=seed, fast=True)
            for arm in ("lora", "lora_fixed_alpha", "rslora", "dora")}
    for arm in ("lora_fixed_alpha", "rslora"):
        assert _same_history(runs[arm][1], runs["lora"][1]), arm  # the notebook runs r = 1 once for all three
    assert all(isinstance(m, DoRALinear) for m in lora_layers(runs["dora"][0]).values())
    assert not _same_history(runs["dora"][1], runs["lora"][1])
    scalings = {}
    for arm in ("lora", "lora_fixed_alpha", "rslora"):
        alpha, flags = lora_rank.ARMS[arm]
        scalings[arm] = lora_scaling(4, alpha(4), flags.get("use_rslora", False))
    assert scalings == {"lora": 2.0, "lora_fixed_alpha": 0.5, "rslora": 1.0}


def test_rank_sweep_settings_and_errors(setting):
    _, pretrained, target = setting
    assert lora_rank.RANK_SWEEP["ranks"] == (1, 2, 4, 8)  # one decision space in fast and full mode
    assert lora_rank.RANK_SWEEP["lr_arms"][0] == "lora"  # the notebook's r = 1 reuse needs it first
    assert transfer.TRANSFER["lr"] in lora_rank.RANK_SWEEP["lr_grid"]
    with pytest.raises(ValueError, match="arm must be one of"):
        lora_rank.adapt_lora(pretrained, target, 2, arm="qlora")
    with pytest.raises(ValueError, match="lr must be"):
        lora_rank.adapt_lora(pretrained, target, 2, lr=0)


class _Run:
    def __init__(self, acc, loss):
        self.best_value, self._loss = acc, loss

    def kept(self, metric):
        assert metric == "val_loss"
        return self._loss


def test_best_lr_rule():
    assert lora_rank.best_lr({1e-3: _Run(0.99, 0.1), 1e-2: _Run(1.0, 0.3)}) == 1e-2  # accuracy first
    assert lora_rank.best_lr({1e-3: _Run(0.9996, 0.1), 1e-2: _Run(1.0, 0.3)}) == 1e-3  # 1.000 vs 1.000: loss
    assert lora_rank.best_lr({1e-3: _Run(1.0, 0.1004), 1e-2: _Run(1.0, 0.1)}) == 1e-3  # full tie: the lower LR
    with pytest.raises(ValueError, match="empty"):
        lora_rank.best_lr({})


def test_seven_b_count_explained():
    """Notebook 06: our 7B-class shape is ~5.2 B; a gate matrix per block and a vocabulary-sized output layer
    make it a Llama-7B's 6.74 B."""
    shape = dict(d_model=4096, n_heads=32, n_layers=32, d_ff=11008, vocab_size=32000, max_len=4096, n_classes=2)
    with torch.device("meta"):
        _, total = count_parameters(TinyTransformer(**shape))
    assert round(total / 1e9, 1) == 5.2
    llama = total + 32 * 4096 * 11008 + 32000 * 4096 - (4096 * 2 + 2) - 4096 * 4096  # + gate, + LM head, - our
    assert abs(llama / 6.738e9 - 1) < 0.01, llama  # head and learned positions (Llama's are rotary: no weights)


@pytest.mark.parametrize("seed", SEEDS)
def test_alpha_2r_at_rank_8_loses_at_the_high_lr(seed, one_thread):
    """Notebook 06, section 9 (fast mode): under ``alpha = 2 r`` (s = 2 at every rank) the update grows with r, so
    at r = 8 the probe's highest LR (3e-2) keeps a lower val_acc than the course's 1e-2.

    Measured in fast mode on seeds 0-9 with the pinned and with the oldest CPU kernels (20 runs): ``lora`` r=8 at
    lr=3e-2 kept 0.32-0.988, 0.010-0.68 below the same rank at 1e-2 (smallest on seed 9, pinned), and it was the
    lowest of the three LRs on all 20; rsLoRA r=8 at 3e-2 kept 0.98-1.000, 0.004-0.68 above ``lora``. rsLoRA's
    own claim (the grid's best LR stops moving with r) was seen on 3 of the 20: not asserted.
    """
    pretrained, target = _pretrained(seed), target_task(seed)
    grid = lora_rank.RANK_SWEEP["lr_grid"]
    assert (transfer.TRANSFER["lr"], 3e-2) == (1e-2, max(grid)) and 8 in lora_rank.RANK_SWEEP["lr_ranks"]
    acc = {lr: lora_rank.adapt_lora(pretrained, target, 8, arm="lora", lr=lr, seed=seed, fast=True)[1].best_value
           for lr in (1e-2, 3e-2)}
    assert acc[1e-2] - acc[3e-2] >= 0.004, acc  # two validation examples of 500
