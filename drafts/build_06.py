import sys

sys.path.insert(0, "/tmp/nbsrc")
from nbkit import Notebook  # noqa: E402
from transfer_setup import SETUP  # noqa: E402

nb = Notebook("06_lora_by_hand")

nb.header(r"""
# 06 · LoRA by hand: a low-rank adapter, its rank, and merging it away

**What this notebook teaches.** What a LoRA layer computes ($W x + \frac{\alpha}{r} B A x$), why it starts
exactly at the pretrained model, how many numbers it trains, how to merge it into the base weight for free
inference, and how to pick the **smallest rank** that holds the validation metric under one checkpoint rule.

**When to use it.** When a frozen backbone is not enough for a new task (notebook 05) but training every weight
is more than you can afford (memory, storage per task, risk of forgetting). LoRA is the default adapter of LLM
fine-tuning recipes (`r`, `lora_alpha`, `target_modules` in PEFT configs mean what they mean here).

**What you will see in the first minute.** A LoRA layer wrapped around a Linear gives *exactly* the Linear's
output before training, and trains a few percent of its numbers.

**Plan.** 1. One LoRA layer: outputs and parameter counts. 2. Exercise: the LoRA forward and merge by hand.
3. Merge / unmerge. 4. Counting: how many numbers LoRA trains, at our size and at LLM size. 5. Pretrain on the
source task. 6. A rank sweep on the target task, one checkpoint rule. 7. Decision: the smallest rank that holds.
""", out_dir_default="artifacts")

nb.code(r"""
import copy

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from course_lib.checkpoint import BestCheckpoint
from course_lib.compare import compare_runs
from course_lib.data import make_loaders
from course_lib.lora import LoRALinear, add_lora, lora_parameter_count, lora_state_dict, merge_lora
from course_lib.models import TinyTransformer
from course_lib.notebook import prepare_out_dir, save_decisions, use_or_fallback
from course_lib.params import count_parameters
from course_lib.plots import plot_comparison, plot_history, save_figure
from course_lib.train import evaluate, fit

OUT = prepare_out_dir(out_dir)
""")

nb.md(r"""
## 1. One LoRA layer

A pretrained Linear layer computes $y = x W^\top + b$ with $W$ of shape `(out, in)`. LoRA freezes $W$ and $b$ and
learns a low-rank correction:

$$
y = x W^\top + b + \frac{\alpha}{r}\, (x A^\top) B^\top, \qquad A \in \mathbb{R}^{r \times \text{in}},\;
B \in \mathbb{R}^{\text{out} \times r}.
$$

* $r$ (the **rank**) is small (1 to 64); the update $\Delta W = \frac{\alpha}{r} B A$ has rank at most $r$.
* $A$ starts random (like a Linear weight), $B$ starts at **zero**: $\Delta W = 0$, so the adapted model starts
  exactly at the pretrained one, and training moves it away only as far as the data asks.
* $\alpha$ scales the update; dividing by $r$ keeps the size of the update about the same when you change $r$
  (a common choice is $\alpha = r$ or $2r$).
* Trainable numbers: $r\,(\text{in} + \text{out})$ instead of $\text{in} \cdot \text{out}$.

`course_lib.lora.LoRALinear(base, r, alpha)` wraps an `nn.Linear`. Before any training it gives the base layer's
output exactly:
""")

nb.code(r"""
torch.manual_seed(seed)
base = nn.Linear(64, 64)
layer = LoRALinear(copy.deepcopy(base), r=4, alpha=8)
x = torch.randn(2, 5, 64)  # (batch, tokens, features): LoRA acts on the last dimension
print(layer)
print("lora_A", tuple(layer.lora_A.shape), "| lora_B", tuple(layer.lora_B.shape), "| scaling alpha/r =", layer.scaling)
print("same output as the base layer before training:", torch.equal(layer(x), base(x)))
trainable, total = count_parameters(layer)
print(f"trainable {trainable} of {total} numbers ({trainable / total:.1%}); "
      f"r * (in + out) = {lora_parameter_count(64, 64, 4)}")
""")

nb.md(r"""
## 2. Your turn: the LoRA forward and the merged weight (3 points)

Write two functions with plain tensor operations (no `nn.Linear`, no `LoRALinear`):

* `lora_forward(x, W, b, A, B, alpha, r)`: `x` has shape `(*, in)` (any number of leading dimensions), `W` is
  `(out, in)`, `b` is `(out,)` or `None`, `A` is `(r, in)`, `B` is `(out, r)`. Return
  $x W^\top + b + \frac{\alpha}{r} (x A^\top) B^\top$ with shape `(*, out)`.
  Compute the low-rank path as $(x A^\top) B^\top$: first the small `(*, r)` product, never the full
  `(out, in)` matrix $BA$ (that is what makes LoRA cheap in training).
* `lora_merged_weight(W, A, B, alpha, r)`: the plain weight $W + \frac{\alpha}{r} B A$, shape `(out, in)`, that
  gives the same outputs with an ordinary Linear layer. Do not change `W` in place.
""")

nb.solution(r'''
def lora_forward(x, W, b, A, B, alpha, r):
    """LoRA output ``x W^T + b + (alpha / r) (x A^T) B^T``.

    Shapes: x (*, in), W (out, in), b (out,) or None, A (r, in), B (out, r) -> (*, out).
    """
    ### BEGIN SOLUTION
    out = x @ W.T
    if b is not None:
        out = out + b
    return out + (alpha / r) * ((x @ A.T) @ B.T)
    ### END SOLUTION


def lora_merged_weight(W, A, B, alpha, r):
    """The merged weight ``W + (alpha / r) B A``, shape (out, in); W itself is not modified."""
    ### BEGIN SOLUTION
    return W + (alpha / r) * (B @ A)
    ### END SOLUTION
''', "n06_lora_forward")

nb.tests(r"""
# Visible test: with B = 0 the output is the base layer's, and the merged weight is W.
_g = torch.Generator().manual_seed(0)
_W, _b, _A = torch.randn(3, 4, generator=_g), torch.randn(3, generator=_g), torch.randn(2, 4, generator=_g)
_x = torch.randn(5, 4, generator=_g)
_out = lora_forward(_x, _W, _b, _A, torch.zeros(3, 2), 4.0, 2)
assert _out.shape == (5, 3), f"expected shape (5, 3), got {tuple(_out.shape)}"
assert torch.allclose(_out, _x @ _W.T + _b, atol=1e-6), "with B = 0, LoRA must give the base layer's output"
assert torch.allclose(lora_merged_weight(_W, _A, torch.zeros(3, 2), 4.0, 2), _W)
print("visible test passed")
### BEGIN HIDDEN TESTS
for _seed, (_in, _outf, _r, _alpha, _shape, _bias) in enumerate([
        (8, 6, 2, 4.0, (5,), True), (16, 16, 4, 4.0, (2, 7), True), (12, 5, 1, 3.0, (3, 2, 4), False),
        (32, 24, 8, 16.0, (9,), True)]):
    torch.manual_seed(100 + _seed)
    _lin = nn.Linear(_in, _outf, bias=_bias)
    _ref = LoRALinear(_lin, r=_r, alpha=_alpha)
    with torch.no_grad():
        _ref.lora_B.normal_()  # a trained-looking B (at init it is zero)
    _x = torch.randn(*_shape, _in)
    _W0 = _lin.weight.detach().clone()
    _args = (_lin.weight.detach(), None if _lin.bias is None else _lin.bias.detach(),
             _ref.lora_A.detach(), _ref.lora_B.detach(), _alpha, _r)
    _got = lora_forward(_x, *_args)
    _want = _ref(_x).detach()
    assert _got.shape == _want.shape, (tuple(_got.shape), tuple(_want.shape))
    assert torch.allclose(_got, _want, rtol=1e-5, atol=1e-5), (_got - _want).abs().max()
    _Wm = lora_merged_weight(_lin.weight.detach(), _ref.lora_A.detach(), _ref.lora_B.detach(), _alpha, _r)
    assert torch.equal(_lin.weight.detach(), _W0), "lora_merged_weight must not modify W"
    _ref.merge()
    assert torch.allclose(_Wm, _ref.base.weight.detach(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(_ref(_x).detach(), _want, rtol=1e-4, atol=1e-5)
    _y = _x @ _Wm.T + (0 if _lin.bias is None else _lin.bias.detach())
    assert torch.allclose(_y, _want, rtol=1e-4, atol=1e-4), "merged weight must reproduce the LoRA output"
# gradients flow to A and B through lora_forward
_A = torch.randn(2, 6, requires_grad=True)
_B = torch.randn(4, 2, requires_grad=True)
lora_forward(torch.randn(3, 6), torch.randn(4, 6), torch.zeros(4), _A, _B, 2.0, 2).sum().backward()
assert _A.grad is not None and _B.grad is not None and _A.grad.abs().sum() > 0
### END HIDDEN TESTS
""", "n06_lora_forward_tests", points=3)

nb.code(r"""
def reference_lora_forward(x, W, b, A, B, alpha, r):
    # course_lib's LoRALinear on the same tensors (the reference the tests compare with)
    layer = LoRALinear(nn.Linear(W.shape[1], W.shape[0], bias=b is not None), r=r, alpha=alpha)
    with torch.no_grad():
        layer.base.weight.copy_(W)
        if b is not None:
            layer.base.bias.copy_(b)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    return layer(x)


_probe = (torch.randn(2, 4), torch.randn(3, 4), torch.zeros(3), torch.randn(2, 4), torch.randn(3, 2), 2.0, 2)
forward_fn = use_or_fallback(lora_forward, reference_lora_forward, *_probe, name="lora_forward")
""")

nb.md(r"""
## 3. Merge and unmerge

After training, $W' = W + \frac{\alpha}{r} B A$ is an ordinary weight: `merge()` writes it into the base layer,
and inference costs exactly what the original model cost. `unmerge()` subtracts the update again (to keep
training, or to swap in another task's adapter). Give the layer a non-zero $B$ (as training would) and check:
""")

nb.code(r"""
with torch.no_grad():
    layer.lora_B.normal_(std=0.1)  # pretend training moved B away from zero
y_adapter = layer(x).detach()
y_yours = forward_fn(x, base.weight.detach(), base.bias.detach(), layer.lora_A.detach(), layer.lora_B.detach(),
                     layer.alpha, layer.r).detach()
print("your forward matches LoRALinear:", torch.allclose(y_yours, y_adapter, atol=1e-5))
layer.merge()
print("merged:", layer.merged, "| max |merged - adapter output|:", f"{(layer(x) - y_adapter).abs().max():.1e}")
layer.unmerge()
print("unmerged:", layer.merged, "| base weight restored:", torch.allclose(layer.base.weight, base.weight, atol=1e-6))
""")

nb.md(r"""
The differences are rounding errors of float32 (about $10^{-7}$), not a change of function. Merging twice would
add the update twice and silently corrupt the weight, so `LoRALinear` refuses it (`RuntimeError`).

## 4. Counting: what LoRA trains

`add_lora(model, target_modules, r, alpha, train_modules=("head",))` wraps every Linear whose name ends with one
of `target_modules`, freezes everything else except the new classifier head. Our model's projections are named
like an LLM's (`q_proj k_proj v_proj o_proj up_proj down_proj`), so the counts below read like an LLM recipe's.
""")

nb.code(SETUP + r"""

def count_lora(model_kwargs, targets, r):
    # trainable / total numbers after add_lora (built on the meta device: no memory, no time)
    with torch.device("meta"):
        m = TinyTransformer(**model_kwargs)
        add_lora(m, targets, r=r, alpha=2 * r, train_modules=("head",))
    return count_parameters(m)


rows = []
for targets in (("q_proj", "v_proj"), LORA_TARGETS):
    for r in (1, 4, 8, 16):
        tr, tot = count_lora(MODEL, targets, r)
        rows.append({"targets": "+".join(t.replace("_proj", "") for t in targets), "r": r,
                     "trainable": tr, "total": tot, "trainable %": round(100 * tr / tot, 2)})
print("our model:", MODEL)
pd.DataFrame(rows)
""")

nb.md(r"""
At LLM size the same arithmetic is what makes fine-tuning fit on one GPU. A 7B-class shape (4096 wide, 32
layers; our blocks have no vocabulary or gated MLP, so the total is a bit smaller than a real 7B model):
""")

nb.code(r"""
llm = dict(d_model=4096, n_heads=32, n_layers=32, d_ff=11008, vocab_size=32000, max_len=4096, n_classes=2)
for targets, r in ((("q_proj", "v_proj"), 8), (LORA_TARGETS, 16)):
    tr, tot = count_lora(llm, targets, r)
    print(f"targets {'+'.join(targets):45s} r={r:2d}: {tr / 1e6:6.2f} M trainable of {tot / 1e9:.2f} B "
          f"({100 * tr / tot:.3f}%)")
""")

nb.md(r"""
## 5. Pretrain on the source task

The transfer scenario of this course (`course_lib.transfer`, the same one as notebooks 05 and 09): token
sequences, a **source task** with many labels to pretrain on, and a related **target task** with few labels
whose rule needs a new attention pattern, so a frozen backbone is not enough (notebook 05 showed it). We keep
the pretrained checkpoint with the best validation accuracy.
""")

nb.code(r"""
RULE = dict(metric="val_acc", mode="max")  # one checkpoint rule for every run of this notebook
print(source)
print(target)
seed_everything(seed)
pretrained = TinyTransformer(**MODEL)
src_train, src_val, _ = make_loaders(source, CFG["batch_size"], seed=seed)
pretrain_history = fit(pretrained, src_train, src_val, checkpoint=BestCheckpoint(**RULE), device=DEVICE,
                       name="pretrain", split_hash=source.split_hash, **PRETRAIN)
print(pretrain_history)
""")

nb.md(r"""
## 6. A rank sweep on the target task

Each arm starts from the same pretrained checkpoint and the same new head, wraps the same target modules with
LoRA at rank `r` (with $\alpha = 2r$), and trains with the same optimizer settings, on the same split, under the
same checkpoint rule (best `val_acc`). Only `r` changes.
""")

nb.code(r"""
RANKS = (1, 4) if fast else (1, 2, 4, 8)
tgt_train, tgt_val, tgt_test = make_loaders(target, CFG["batch_size"], seed=seed)


def lora_run(r):
    # pretrained backbone + fresh head, LoRA of rank r on LORA_TARGETS, trained on the target task
    model = copy.deepcopy(pretrained)
    seed_everything(seed + 1)
    model.head.reset_parameters()  # same new head in every arm
    add_lora(model, LORA_TARGETS, r=r, alpha=2 * r, train_modules=("head",))
    history = fit(model, tgt_train, tgt_val, checkpoint=BestCheckpoint(**RULE), device=DEVICE,
                  name=f"r={r}", split_hash=target.split_hash, **ADAPT)
    return history, model


print("LoRA targets:", LORA_TARGETS, "| fit:", ADAPT)
sweep, sweep_models = {}, {}
for r in RANKS:
    sweep[r], sweep_models[r] = lora_run(r)
    print(sweep[r])
""")

nb.code(r"""
table = compare_runs({f"r={r}": h for r, h in sweep.items()}, sort=False)
table["test_acc (kept)"] = [evaluate(sweep_models[r], tgt_test, device=DEVICE)["acc"] for r in RANKS]
table[["best_epoch", "best_value", "final_value", "best_before_final", "trainable_params",
       "test_acc (kept)"]].round(3)
""")

nb.code(r"""
fig = plot_comparison({f"r={r}": h for r, h in sweep.items()}, keys=("val_loss", "val_acc"),
                      title="LoRA rank sweep on the target task (dots: kept checkpoint)")
save_figure(fig, OUT / "lora_rank_sweep.png")
plt.show()
""")

nb.md(r"""
**What to look at.** The kept `val_acc` per rank (`best_value`), and the trainable parameters it cost. Larger
ranks train more numbers; whether they buy accuracy is what the sweep measures. Differences of one or two
validation examples are noise, hence a tolerance below.

## 7. Merge the adapter and check that nothing changed

Take the largest rank's kept model, compute its validation logits, merge every LoRA layer into its base weight
(`merge_lora` puts plain `nn.Linear` layers back), and compare.
""")

nb.code(r"""
r_check = max(RANKS)
adapted = sweep_models[r_check].eval()
adapter_state = lora_state_dict(adapted)  # what you would save per task: A, B and the head
print(f"adapter state: {len(adapter_state)} tensors, {sum(t.numel() for t in adapter_state.values())} numbers")
with torch.no_grad():
    X_val = target.X_val.to(DEVICE)
    logits_adapter = adapted(X_val)
    merged = merge_lora(copy.deepcopy(adapted)).eval()
    logits_merged = merged(X_val)
merged_max_diff = (logits_merged - logits_adapter).abs().max().item()
print("LoRA layers left after merging:", sum(isinstance(m, LoRALinear) for m in merged.modules()))
print("same predictions:", torch.equal(logits_merged.argmax(-1), logits_adapter.argmax(-1)),
      "| max |logit difference| < 1e-4:", merged_max_diff < 1e-4)
""")

nb.md(r"""
## 8. Decision: the smallest rank that holds

**Rule (stated before looking):** a rank *holds* when its kept validation accuracy is within `TOLERANCE` (one
point of accuracy) of the best rank's: `gap[r] <= TOLERANCE` below. The smallest rank that holds is the one to ship: fewer trainable
numbers, a smaller adapter file, the same validation result.

Set `smallest_rank` (an `int` from `RANKS`) from **your** sweep above, and `merged_matches` (a `bool`): did the
merged model give the same logits as the adapter, up to `1e-4`?
""")

nb.code(r"""
TOLERANCE = 0.01
kept = {r: h.best_value for r, h in sweep.items()}
gap = {r: round(max(kept.values()) - v, 6) for r, v in kept.items()}  # rounded: 0.01 must read as 0.01
print("kept val_acc:", {r: round(v, 3) for r, v in kept.items()}, "| gap to the best:", gap)
""")

nb.solution(r'''
smallest_rank = None   # an int from RANKS
merged_matches = None  # True or False
### BEGIN SOLUTION
smallest_rank = min(r for r in RANKS if gap[r] <= TOLERANCE)
merged_matches = merged_max_diff < 1e-4
### END SOLUTION
print("smallest_rank:", smallest_rank, "| merged_matches:", merged_matches)
''', "n06_decision")

nb.tests(r"""
assert type(smallest_rank) is int and smallest_rank in RANKS, f"smallest_rank must be an int from {RANKS}"
assert type(merged_matches) is bool, "merged_matches must be True or False"
### BEGIN HIDDEN TESTS
_kept = {r: sweep[r].best_value for r in RANKS}
_best = max(_kept.values())
_expected = min(r for r in RANKS if round(_best - _kept[r], 6) <= TOLERANCE)
assert smallest_rank == _expected, "recompute from your sweep: the smallest r within TOLERANCE of the best"
assert merged_matches is (merged_max_diff < 1e-4)
assert merged_matches is True
### END HIDDEN TESTS
""", "n06_decision_tests", points=2)

nb.code(r"""
_ = save_decisions(OUT, smallest_rank=smallest_rank, merged_matches=merged_matches)
print("decisions saved to decisions.json in out_dir")
""")

nb.md(r"""
## Recipe note (2 points)

In 3-5 sentences: the symptom or question, what you changed (one thing), what moved in the evidence (kept
`val_acc`, trainable parameters, the merge check), and what you would do next.
""")

nb.manual(r"""
**Question:** how much adapter capacity does the target task need once frozen features are not enough?
**Change:** only the LoRA rank `r` (alpha = 2r, same targets, same split, same checkpoint rule on `val_acc`).
**Evidence:** the kept validation accuracy of the smallest rank is within one point of the best rank's, while
the larger ranks train several times more numbers; the adapter is a few percent of the model, and merging it
into the base weights gives the same logits (differences around 1e-7), so inference costs nothing extra.
**Next:** ship the smallest rank that holds (merged), and spend the next experiment on targets (attention only vs
all projections) rather than on rank.
""", "n06_recipe_note", points=2)

nb.write()
print("written")
