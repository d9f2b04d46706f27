"""The memory scenario of notebook 07: its graded answers hold on every seed, with margins."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nbutil import scenario_seeds
from torch import nn

from course_lib.memory import choose_levers, predict_memory
from course_lib.models import MLP
from course_lib.optim8bit import dynamic_map
from course_lib.scenarios import memory_budget as mb

SEEDS = scenario_seeds()
MARGIN = 0.05  # every lever before the answer misses the budget, and the answer fits, by >= 5% of the budget


@pytest.fixture(scope="module")
def evidence():
    """Fast mode, seeds 0-4: AdamW, AdamW8bit, accumulation 4 x 16, bf16 autocast, and the six lever predictions."""
    return {seed: mb.run(seed, fast=True) for seed in SEEDS}


def test_the_smallest_lever_that_fits_is_8bit_state_on_every_seed(evidence):
    for seed, ev in evidence.items():
        cands = ev["candidates"]
        assert ev["lever"] == "8-bit optimizer state", (seed, ev["lever"])
        assert list(cands) == list(mb.LEVERS)
        answer = mb.LEVERS.index(ev["lever"])
        for lever in mb.LEVERS[:answer]:
            assert cands[lever]["total"] >= mb.BUDGET * (1 + MARGIN), (seed, lever, cands[lever]["total"])
        assert cands[ev["lever"]]["total"] <= mb.BUDGET * (1 - MARGIN), (seed, cands[ev["lever"]]["total"])
    first = evidence[0]["candidates"]
    assert all(ev["candidates"] == first for ev in evidence.values()), "bytes depend on shapes only, not the seed"


def test_activation_levers_work_but_the_static_part_alone_is_over_budget(evidence):
    cands = evidence[0]["candidates"]
    none, ckpt, accum = cands["none"], cands["activation checkpointing"], cands["grad accumulation"]
    static = none["weights"] + none["grads"] + none["optimizer"]
    assert static > mb.BUDGET * (1 + MARGIN), static  # even zero activations would not fit
    assert ckpt["activations"] < 0.15 * none["activations"]  # checkpointing keeps only each block's input
    ratio = accum["activations"] / none["activations"]
    assert 0.2 <= ratio <= 0.3, ratio  # micro-batch 2 of 8: about a quarter
    assert none["optimizer"] == 2 * none["weights"] + 4 * sum(1 for _ in mb.budget_model("none").parameters())
    eight = cands["8-bit optimizer state"]["optimizer"]
    assert 0.24 <= eight / none["optimizer"] <= 0.3, eight / none["optimizer"]
    lora = cands["LoRA"]
    assert lora["grads"] < 0.05 * none["grads"] and lora["weights"] > none["weights"]  # frozen weights stay


def test_8bit_adamw_trains_like_adamw_with_about_a_quarter_of_the_state(evidence):
    for seed, ev in evidence.items():
        a, q = ev["runs"]["adamw"], ev["runs"]["adamw8bit"]
        assert abs(q["final_val_acc"] - a["final_val_acc"]) <= 0.02, (seed, q, a)
        assert abs(q["kept_val_acc"] - a["kept_val_acc"]) <= 0.02, (seed, q, a)
        assert a["final_val_acc"] >= 0.93, (seed, a)
        assert 0.25 <= q["state_bytes"] / a["state_bytes"] <= 0.3, (seed, q["state_bytes"], a["state_bytes"])


def test_accumulation_and_autocast_keep_the_run(evidence):
    for seed, ev in evidence.items():
        a = ev["runs"]["adamw"]
        assert ev["accum_max_val_loss_diff"] < 1e-3, (seed, ev["accum_max_val_loss_diff"])
        assert abs(ev["runs"]["accum_4x16"]["final_val_acc"] - a["final_val_acc"]) <= 0.01, seed
        assert abs(ev["runs"]["autocast"]["final_val_acc"] - a["final_val_acc"]) <= 0.02, (seed, ev["runs"])


def test_runs_and_lever_setups_change_one_thing_each():
    expected = {"adamw": set(), "adamw8bit": {"optimizer"}, "adafactor": {"optimizer", "lr"},  # lr: its own scale
                "accum_4x16": {"batch_size", "grad_accum_steps"},  # one lever: same 64 examples per step
                "autocast": {"precision"}, "checkpointing": {"activation_checkpointing"}}
    for arm, change in mb.RUNS.items():
        assert {k for k, v in change.items() if mb.BASE.get(k) != v} == expected[arm], arm
    base = mb.LEVER_SETUPS["none"]
    for lever in mb.LEVERS[1:-1]:
        setup = mb.LEVER_SETUPS[lever]
        assert sum(setup[k] != base[k] for k in base) == 1, lever
    assert mb.epochs(True) < mb.epochs(False)
    with pytest.raises(ValueError, match="arm must be"):
        mb.train_arm("nope", mb.split_for(0), seed=0, fast=True)
    with pytest.raises(ValueError, match="lever must be"):
        mb.budget_model("bigger GPU")
    with pytest.raises(ValueError, match="at least 8"):
        mb.predict_lever("none", mb.budget_model("none"), torch.zeros(2, 64), torch.zeros(2, dtype=torch.long))


def test_checkpointing_changes_memory_not_the_math():
    split = mb.split_for(0)
    plain, _ = mb.train_arm("adamw", split, seed=0, fast=True)
    ckpt, _ = mb.train_arm("checkpointing", split, seed=0, fast=True)
    assert [r["val_loss"] for r in plain] == pytest.approx([r["val_loss"] for r in ckpt], abs=1e-6)


def _nearest(x, code_map):
    return (x[:, None] - code_map[None, :]).abs().argmin(dim=1)


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_block_is_nearest_code_absmax(signed):
    code_map = dynamic_map(signed)
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(256, generator=g), torch.randn(77, generator=g) * 1e-3, torch.zeros(256),
              -torch.rand(256, generator=g), torch.tensor([2.5])]
    if not signed:
        blocks = [b.abs() ** 2 for b in blocks]
    for block in blocks:
        codes, absmax = mb.quantize_block(block, code_map)
        assert codes.dtype == torch.uint8 and codes.shape == block.shape and absmax.dim() == 0
        assert float(absmax) == float(block.abs().max())
        normed = block / absmax if absmax > 0 else block
        want = _nearest(normed, code_map)
        dist = (code_map[codes.long()] - normed).abs()
        assert torch.all((codes.long() == want) | (dist - (code_map[want] - normed).abs() <= 1e-6))
        back = mb.dequantize_block(codes, absmax, code_map)
        assert back.shape == block.shape and back.dtype == torch.float32
        gaps = (code_map[1:] - code_map[:-1]).max()
        assert torch.all((back - block).abs() <= gaps * absmax * (1 + 1e-6))
    zero_codes, zero_max = mb.quantize_block(torch.zeros(8), code_map)
    assert float(zero_max) == 0.0 and torch.all(code_map[zero_codes.long()] == 0)
    with pytest.raises(ValueError, match="block must be"):
        mb.quantize_block(torch.zeros(2, 2), code_map)


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                      lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_accumulate_step_equals_one_step_on_the_whole_batch(make_opt, k):
    torch.manual_seed(0)
    a = MLP(hidden=(32,)).double()
    b = MLP(hidden=(32,)).double()
    b.load_state_dict(a.state_dict())
    x, y = torch.rand(8 * k, 64, dtype=torch.float64), torch.randint(0, 10, (8 * k,))
    opt_a, opt_b = make_opt(a.parameters()), make_opt(b.parameters())
    loss = mb.accumulate_step(a, opt_a, [(x[i:i + 8], y[i:i + 8]) for i in range(0, 8 * k, 8)], F.cross_entropy)
    full = F.cross_entropy(b(x), y)
    full.backward()
    opt_b.step()
    assert loss == pytest.approx(full.item(), rel=1e-12)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-12, atol=1e-14)
        assert pa.grad is None
    with pytest.raises(ValueError, match="micro_batches is empty"):
        mb.accumulate_step(a, opt_a, [])


def test_lever_prediction_is_predict_memory_plus_measured_activations():
    model = mb.budget_model("LoRA + 8-bit")
    x, y = torch.rand(8, 64), torch.randint(0, 10, (8,))
    got = mb.predict_lever("LoRA + 8-bit", model, x, y)
    static = predict_memory(model, "adamw8bit")
    assert all(got[k] == static[k] for k in ("weights", "grads", "optimizer"))
    assert got["activations"] > 0 and got["total"] == sum(got[k] for k in ("weights", "grads", "optimizer",
                                                                              "activations"))
    assert choose_levers(1, {"x": got}) is None
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())  # shapes only: no random masks
