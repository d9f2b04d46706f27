"""The optimization scenario of notebooks 00 and 03: its graded answers hold on every seed, with margins."""
from __future__ import annotations

import pytest
import torch
from nbutil import scenario_seeds
from torch import nn

from course_lib.scenarios import recipe
from course_lib.train import History

SEEDS = scenario_seeds()


@pytest.fixture(scope="module")
def evidence():
    """Fast mode, seeds 0-4, every arm (5 x 5 runs of 20 epochs).

    One intra-op thread: these tiny matmuls gain nothing from two, and a busy machine makes two spin. The margins
    below were also checked with two threads (the float rounding, hence the chaotic lr=0.1 runs, differ a little).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {seed: recipe.run(seed, fast=True) for seed in SEEDS}
    finally:
        torch.set_num_threads(threads)


def test_too_high_lr_is_visibly_broken_and_the_recipe_fixes_it(evidence):
    """Notebook 00: the first visible problem is the optimization (max loss, grad norm, dead units, accuracy).

    Measured on seeds 0-19 in fast and full mode under native (AVX-512), pinned (avx2) and the oldest kernels
    (120 runs per arm): max loss ratio 10.4-38x, grad norm ratio 15-51x, dead units +0.69..+0.86, kept val loss
    ratio 2.3-15.8x, kept accuracy gap 1.9-63 points (the recipe: 95.8-98.9%). The accuracy gap is small on some
    seeds (seed 16: a broken run with 87% dead units still keeps 92-94%), so the margin is asserted on the val
    loss the checkpoint rule reads; accuracy only has to be behind.
    """
    for seed, ev in evidence.items():
        bad, good = ev["too_high_lr"], ev["recipe"]
        assert bad["max_loss"] > 8 * good["max_loss"], (seed, bad["max_loss"], good["max_loss"])
        assert good["max_loss"] < 3.0, (seed, good["max_loss"])  # never above the loss at initialisation (~2.3)
        assert bad["max_grad_norm"] > 10 * good["max_grad_norm"], (seed, bad, good)
        assert bad["dead_frac"] > good["dead_frac"] + 0.5, (seed, bad["dead_frac"], good["dead_frac"])
        assert bad["val_loss"] > 2 * good["val_loss"], (seed, bad["val_loss"], good["val_loss"])
        assert good["val_acc"] > bad["val_acc"], (seed, good["val_acc"], bad["val_acc"])
        assert good["val_acc"] >= 0.95, (seed, good["val_acc"])


def test_clipping_alone_does_not_rescue_the_too_high_lr(evidence):
    """Notebook 03: clipping is active on many steps, yet the loss still explodes, most units die, and the checkpoint
    kept under the rule (best val loss) is far behind the lower-LR run's.

    Measured as above (120 runs per arm): clip fraction 0.32-0.72, second half 0.15-0.65 (the recipe: <= 0.012);
    clip-only's worst step 13.6-43x the lower LR's; dead units 0.75-0.97; kept val loss 2.0-13.9x the lower LR's.
    Its kept *accuracy* is a chaotic number (71-96%, and 1.1 to 27 points behind the lower LR): the margin is
    asserted on the rule's own metric. Schedule only never explodes (worst step <= 5.2, the lower LR's ~2.3).
    """
    for seed, ev in evidence.items():
        clip, lower, sched = ev["clip_only"], ev["lower_lr"], ev["schedule_only"]
        assert clip["clip_frac"] >= 0.25, (seed, clip["clip_frac"])
        # clipping that fights the LR does not fade; the recipe's clipping does
        assert clip["late_clip_frac"] >= 0.1 > 0.05 >= ev["recipe"]["late_clip_frac"], (seed, clip, ev["recipe"])
        assert clip["max_loss"] > 8 * lower["max_loss"], (seed, clip["max_loss"], lower["max_loss"])
        assert clip["dead_frac"] >= 0.65, (seed, clip["dead_frac"])
        assert clip["val_loss"] >= 1.6 * lower["val_loss"], (seed, clip["val_loss"], lower["val_loss"])
        assert sched["max_loss"] < 3 * lower["max_loss"] < clip["max_loss"] / 3, (seed, sched, lower, clip)


def test_lower_lr_is_the_first_fix(evidence):
    """Lowering the LR matches the full recipe; the schedule alone rescues accuracy but leaves many dead units.

    Measured as above: lower LR minus recipe -0.8..+1.1 points, minus schedule-only -0.8..+5.8 points; dead units
    schedule-only minus lower LR +0.39..+0.61, lower LR minus recipe +0.01..+0.07.
    """
    for seed, ev in evidence.items():
        lower, sched, full = ev["lower_lr"], ev["schedule_only"], ev["recipe"]
        assert lower["val_acc"] >= full["val_acc"] - 0.02, (seed, lower["val_acc"], full["val_acc"])
        assert lower["val_acc"] >= sched["val_acc"] - 0.02, (seed, lower["val_acc"], sched["val_acc"])
        assert sched["dead_frac"] >= lower["dead_frac"] + 0.3, (seed, sched["dead_frac"], lower["dead_frac"])
        assert lower["dead_frac"] <= full["dead_frac"] + 0.12, (seed, lower["dead_frac"], full["dead_frac"])
        assert lower["max_loss"] < 3.0 and lower["clip_frac"] == 0.0


def test_clip_only_differs_from_the_unclipped_run(evidence):
    """Clipping really acts on the gradients (a no-op clip would give the same run bit for bit)."""
    assert any(ev["clip_only"]["val_acc"] != ev["too_high_lr"]["val_acc"]
               or ev["clip_only"]["dead_frac"] != ev["too_high_lr"]["dead_frac"] for ev in evidence.values())


def test_dead_relu_fraction_counts_units_that_never_fire():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]))
        model[2].bias.zero_()
    X = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # unit 1 and unit 2 of layer 1 never fire; layer 2: unit 1 dead
    model.train()
    assert recipe.dead_relu_fraction(model, X) == pytest.approx(3 / 5)
    assert model.training, "the training flag is restored"
    assert recipe.dead_relu_fraction(model, torch.tensor([[1.0, 1.0], [-1.0, 0.0]])) == pytest.approx(1 / 5)
    assert not model[1]._forward_hooks, "hooks are removed"
    with pytest.raises(ValueError, match="X must be"):
        recipe.dead_relu_fraction(model, torch.zeros(0, 2))
    with pytest.raises(ValueError, match="no nn.ReLU"):
        recipe.dead_relu_fraction(nn.Linear(2, 2), X)


def test_kept_val_acc_and_clip_fraction():
    h = History([{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.9}, {"epoch": 3, "val_acc": 0.7}])
    h.best_epoch = 2
    assert recipe.kept_val_acc(h) == 0.9
    h.best_epoch = None
    with pytest.raises(ValueError, match="best epoch"):
        recipe.kept_val_acc(h)
    steps = [{"clipped": True}, {"clipped": False}, {"clipped": True}, {"clipped": False}]
    assert recipe.clip_fraction(steps) == 0.5
    with pytest.raises(ValueError, match="steps is empty"):
        recipe.clip_fraction([])


def test_run_checks_its_arms_and_config_is_consistent():
    with pytest.raises(ValueError, match="arms must be"):
        recipe.run(0, arms=("nope",))
    assert recipe.epochs(True) < recipe.epochs(False)
    assert set(recipe.FIX_OF_RUN.values()) == set(recipe.FIXES)
    base = recipe.RUNS["too_high_lr"]
    for arm, change in (("clip_only", {"clip_grad_norm"}), ("schedule_only", {"scheduler", "warmup_ratio"}),
                        ("lower_lr", {"lr"})):
        cfg = recipe.RUNS[arm]
        changed = {k for k in set(cfg) | set(base) if cfg.get(k) != base.get(k)}
        assert changed == change, (arm, changed)  # one change at a time


def _params_with_grads(seed, scale):
    g = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.randn(s, generator=g)) for s in [(4, 3), (7,), (2, 2, 5), (3,)]]
    for p in ps[:3]:  # the last one has no gradient
        p.grad = torch.randn(p.shape, generator=g) * scale
    return ps


@pytest.mark.parametrize("scale, max_norm", [(10.0, 1.0), (0.01, 1.0), (3.0, 0.5), (1.0, 1e-3)])
def test_clip_global_norm_matches_torch(scale, max_norm):
    ours, ref = _params_with_grads(0, scale), _params_with_grads(0, scale)
    before = [p.grad.clone() for p in ours[:3]]
    norm = recipe.clip_global_norm_(iter(ours), max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert norm.dim() == 0 and torch.allclose(norm, ref_norm, rtol=1e-6)
    for a, b, b0 in zip(ours[:3], ref[:3], before):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-8)
        if ref_norm <= max_norm:
            assert torch.equal(a.grad, b0)
    assert ours[3].grad is None


def test_clip_global_norm_edge_cases():
    assert float(recipe.clip_global_norm_([nn.Parameter(torch.ones(2))], 1.0)) == 0.0
    single = nn.Parameter(torch.zeros(2))
    single.grad = torch.tensor([3.0, 4.0])
    assert float(recipe.clip_global_norm_(single, 1.0)) == pytest.approx(5.0)
    assert torch.allclose(single.grad, torch.tensor([0.6, 0.8]), atol=1e-6)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="max_norm"):
            recipe.clip_global_norm_(_params_with_grads(0, 1.0), bad)


def test_the_nan_row_of_the_symptom_table_stops_fit_loudly():
    """00 shows it: SGD at lr=1e5 hits a non-finite loss within a few steps on every seed, and fit says so."""
    for seed in SEEDS:
        err = recipe.run_until_nan(seed)
        assert err is not None, seed
        assert 1 <= err.step <= 10, (seed, err.step)
        assert "lower the LR" in str(err) and "non-finite" in str(err), str(err)
