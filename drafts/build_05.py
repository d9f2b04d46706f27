import sys

sys.path.insert(0, "/tmp/nbsrc")
from nbkit import Notebook  # noqa: E402
from transfer_setup import SETUP  # noqa: E402

nb = Notebook("05_transfer_frozen_partial")

nb.header(r"""
# 05 · Transfer: a frozen backbone or a partial unfreeze?

**What this notebook teaches.** How to reuse a pretrained model on a new task with few labels: train only a new
head on **frozen** features (a linear probe), or **unfreeze the top block** too, with optimizer **parameter
groups** that give the pretrained backbone a smaller learning rate than the new head. And how to tell, under one
validation rule and next to an honest baseline, which *adaptation depth* the task needs.

**When to use it.** Every time you start from a pretrained model. The frozen probe is the cheapest thing to try
and the first measurement to make; when it plateaus low, the bottleneck is **adaptation**: the features do not
contain what the new task needs, and more epochs, schedules or regularization will not fix that.

**What you will see in the first minute.** A model pretrained on a source task, and a frozen-backbone head on the
target task that stops improving far from what the target task allows.

**Plan.** 1. Pretrain on the source task (keep the best checkpoint). 2. The honest baseline. 3. Exercise:
freeze everything but the top k blocks and the head. 4. Frozen backbone + head. 5. Partial unfreeze with
parameter-group LRs. 6. Compare under one rule. 7. Decision: the adaptation depth needed.
""", out_dir_default="artifacts")

nb.code(r"""
import copy

import matplotlib.pyplot as plt
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression

from course_lib.checkpoint import BestCheckpoint
from course_lib.compare import compare_runs
from course_lib.data import make_loaders
from course_lib.freezing import param_groups, trainable_names, unfreeze_top_k
from course_lib.models import TinyTransformer
from course_lib.notebook import prepare_out_dir, save_decisions, use_or_fallback
from course_lib.params import count_parameters
from course_lib.plots import plot_comparison, plot_history, save_figure
from course_lib.train import evaluate, fit

OUT = prepare_out_dir(out_dir)
""")

nb.md(r"""
## 1. The source task, the target task, and pretraining

The course's transfer scenario (`course_lib.transfer`): sequences of tokens, classified by a transformer
(`TinyTransformer` in token mode). The **source task** has many labels; the **target task** is related but asks
for something the source task never needed, and has few labels. Both come as `Split` objects with a split hash,
and every setting comes from `TRANSFER_DEFAULTS` (the course's tests prove the lessons below with the same
settings over several seeds).
""")

nb.code(SETUP + r"""

RULE = dict(metric="val_acc", mode="max")  # one checkpoint rule for every run of this notebook
print(source)
print(target)
print("model:", MODEL)
""")

nb.code(r"""
seed_everything(seed)
pretrained = TinyTransformer(**MODEL)
src_train, src_val, _ = make_loaders(source, CFG["batch_size"], seed=seed)
pretrain_history = fit(pretrained, src_train, src_val, checkpoint=BestCheckpoint(**RULE), device=DEVICE,
                       name="pretrain", split_hash=source.split_hash, **PRETRAIN)
print(pretrain_history)
fig = plot_history(pretrain_history, title="pretraining on the source task (dashed: kept checkpoint)")
plt.show()
""")

nb.md(r"""
`fit` loaded the kept checkpoint (best `val_acc`) back into `pretrained`: that is the model we transfer, not
the last epoch.

## 2. The honest baseline

Before any transfer: how far does a simple model get on the target task with the same few labels? Logistic
regression on one-hot encoded tokens (`one_hot_features`). If a transfer strategy cannot beat it, the
transformer is not worth its cost here.
""")

nb.code(r"""
F_train, F_val = one_hot_features(target.X_train), one_hot_features(target.X_val)
logreg = LogisticRegression(max_iter=2000).fit(F_train, target.y_train.numpy())
baseline_val = logreg.score(F_val, target.y_val.numpy())
print(f"logistic regression on one-hot tokens: val_acc {baseline_val:.3f} "
      f"(chance: {1 / target.n_classes:.3f})")
""")

nb.md(r"""
## 3. Your turn: train only the top k blocks and the head (2 points)

Our models keep their transformer blocks in `model.blocks` (an `nn.ModuleList`, bottom to top) and the classifier
in `model.head`. A **frozen** parameter has `requires_grad=False`: it gets no gradient, no optimizer state and no
update.

Write `set_trainable_top_k(model, k)`:

* freeze **every** parameter of the model (embeddings, position table, all blocks, final norm, head);
* make the parameters of the top `k` blocks (`model.blocks[-k:]`, none when `k == 0`) and of `model.head`
  trainable;
* return `model`.

`k = 0` is the frozen backbone (only the head trains: a linear probe on the pretrained features); `k = 1` is the
partial unfreeze of this notebook. Careful: `model.blocks[-0:]` is the *whole* list in Python.
""")

nb.solution(r'''
def set_trainable_top_k(model, k):
    """Freeze all parameters of ``model``, then unfreeze its top ``k`` blocks and its head; return the model."""
    ### BEGIN SOLUTION
    for p in model.parameters():
        p.requires_grad_(False)
    n = len(model.blocks)
    for block in list(model.blocks)[n - k:]:
        for p in block.parameters():
            p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return model
    ### END SOLUTION
''', "n05_set_trainable")

nb.tests(r"""
_m = set_trainable_top_k(TinyTransformer(**MODEL), 0)
assert _m is not None, "return the model"
assert trainable_names(_m) == ["head.weight", "head.bias"], trainable_names(_m)
print("visible test passed")
### BEGIN HIDDEN TESTS
for _kw in (MODEL, dict(d_model=16, n_heads=2, n_layers=3, vocab_size=7, max_len=9, n_classes=4)):
    for _k in range(_kw["n_layers"] + 1):
        _ref = TinyTransformer(**_kw)
        unfreeze_top_k(_ref, _k)
        for _start in ("all_trainable", "all_frozen"):
            _got = TinyTransformer(**_kw)
            if _start == "all_frozen":
                for _p in _got.parameters():
                    _p.requires_grad_(False)
            _out = set_trainable_top_k(_got, _k)
            assert _out is _got, "change the model in place and return it"
            assert trainable_names(_got) == trainable_names(_ref), (_k, _start, trainable_names(_got))
### END HIDDEN TESTS
""", "n05_set_trainable_tests", points=2)

nb.code(r"""
set_trainable = use_or_fallback(set_trainable_top_k, unfreeze_top_k, TinyTransformer(**MODEL), 0,
                                name="set_trainable_top_k")

rows = []
for k in range(MODEL["n_layers"] + 1):
    m = TinyTransformer(**MODEL)
    set_trainable(m, k)
    tr, tot = count_parameters(m)
    rows.append({"k (top blocks trained)": k, "trainable": tr, "total": tot, "trainable %": round(100 * tr / tot, 1)})
pd.DataFrame(rows)
""")

nb.md(r"""
## 4. Frozen backbone + new head

Start from the kept pretrained checkpoint, replace the head by a fresh one (the target task has its own
classes), freeze everything else, and train. Only the head's numbers move, so a large LR is fine.
""")

nb.code(r"""
tgt_train, tgt_val, tgt_test = make_loaders(target, CFG["batch_size"], seed=seed)
histories, models = {}, {}


def adapt(name, k, fit_kwargs):
    # pretrained backbone, a fresh head (same seed for every arm), the top k blocks + head trainable
    model = copy.deepcopy(pretrained)
    seed_everything(seed + 1)
    model.head.reset_parameters()
    set_trainable(model, k)
    opts = dict(fit_kwargs)
    if "backbone_lr" in opts:  # parameter groups: backbone LR below the head's
        groups = param_groups(model, lr=opts.pop("lr"), backbone_lr=opts.pop("backbone_lr"),
                              weight_decay=opts.pop("weight_decay", 0.0))
        for g in groups:
            print(f"  group {g['name']:18s} lr={g['lr']:g} weight_decay={g['weight_decay']:g} "
                  f"({sum(p.numel() for p in g['params'])} numbers)")
        opts["optimizer"] = torch.optim.AdamW(groups)
    history = fit(model, tgt_train, tgt_val, checkpoint=BestCheckpoint(**RULE), device=DEVICE, name=name,
                  split_hash=target.split_hash, **opts)
    return history, model


print("frozen_head:", STRATEGY_FIT["frozen_head"])
histories["frozen_head"], models["frozen_head"] = adapt("frozen_head", 0, STRATEGY_FIT["frozen_head"])
print(histories["frozen_head"])
fig = plot_history(histories["frozen_head"], title="frozen backbone + new head")
plt.show()
""")

nb.md(r"""
**What to look at.** Train and validation accuracy both stall at a level far from 100%: this is not
overfitting (train is not far above val) and not an optimization problem (the loss has flattened, with a convex
problem for the head on fixed features). The frozen features simply do not contain the information the target
rule needs. That is the **adaptation** bottleneck.

## 5. Partial unfreeze: the top block + the head, with parameter groups

Now the top block may change too. The pretrained block should move *less* than the fresh head: its weights are
already useful, and a large LR would wreck them in the first steps. `course_lib.freezing.param_groups(model,
lr=..., backbone_lr=..., weight_decay=...)` builds optimizer parameter groups: the head at `lr`, the (trainable)
backbone at `backbone_lr`, and no weight decay on biases and norm scales.
""")

nb.code(r"""
print("partial_unfreeze:", STRATEGY_FIT["partial_unfreeze"])
histories["partial_unfreeze"], models["partial_unfreeze"] = adapt("partial_unfreeze", 1,
                                                                  STRATEGY_FIT["partial_unfreeze"])
print(histories["partial_unfreeze"])
""")

nb.md(r"""
## 6. Compare under one rule

Both runs used the same target split (same hash) and the same checkpoint rule, so `compare_runs` accepts them.
The baseline's validation accuracy is shown as a dotted line.
""")

nb.code(r"""
table = compare_runs(histories, sort=False)
table["test_acc (kept)"] = [evaluate(models[n], tgt_test, device=DEVICE)["acc"] for n in histories]
print(f"baseline (logistic regression) val_acc: {baseline_val:.3f}")
table[["best_epoch", "best_value", "final_value", "best_before_final", "trainable_params",
       "optimizer_state_bytes", "test_acc (kept)"]].round(3)
""")

nb.code(r"""
fig = plot_comparison(histories, keys=("train_acc", "val_acc"),
                      title="frozen backbone vs partial unfreeze (dots: kept checkpoint)")
fig.axes[1].axhline(baseline_val, color="grey", linestyle=":", label="logreg baseline")
fig.axes[1].legend(fontsize=8)
save_figure(fig, OUT / "transfer_frozen_vs_partial.png")
plt.show()
""")

nb.md(r"""
**Reading the evidence.** Unfreezing one block (a fraction of the parameters, at a smaller LR) lifts the kept
validation accuracy far above the frozen head and above the baseline. The extra capacity was needed *inside* the
backbone: the top block's attention and MLP can learn what the target rule asks, a head on frozen features
cannot. Notebook 06 gets the same effect with a LoRA adapter and far fewer trainable numbers.

## 7. Decision

* `adaptation_depth`: the smallest depth that the target task needed, one of `DEPTHS`;
* `bottleneck`: what limited the frozen model, one of `BOTTLENECKS`;
* `partial_gain`: from **your** runs, the kept validation accuracy of `partial_unfreeze` minus that of
  `frozen_head` (a float, e.g. `0.25` for 25 points), from `histories[...].best_value`.
""")

nb.code(r"""
DEPTHS = ("frozen", "partial", "full")
""")

nb.solution(r'''
adaptation_depth = None  # one of DEPTHS
bottleneck = None        # one of BOTTLENECKS
partial_gain = None      # float
### BEGIN SOLUTION
adaptation_depth = "partial"
bottleneck = "adaptation"
partial_gain = histories["partial_unfreeze"].best_value - histories["frozen_head"].best_value
### END SOLUTION
print(f"adaptation_depth={adaptation_depth!r}, bottleneck={bottleneck!r}, partial_gain={partial_gain:.3f}")
''', "n05_decision")

nb.tests(r"""
assert adaptation_depth in DEPTHS, f"adaptation_depth must be one of {DEPTHS}"
assert bottleneck in BOTTLENECKS, f"bottleneck must be one of {BOTTLENECKS}"
### BEGIN HIDDEN TESTS
assert type(adaptation_depth) is str and adaptation_depth == "partial"
assert type(bottleneck) is str and bottleneck == "adaptation"
### END HIDDEN TESTS
""", "n05_decision_depth_tests", points=2)

nb.tests(r"""
assert type(partial_gain) in (float, int), "partial_gain must be a number"
assert -1.0 <= partial_gain <= 1.0, "a difference of two accuracies"
### BEGIN HIDDEN TESTS
_gain = histories["partial_unfreeze"].best_value - histories["frozen_head"].best_value
assert histories["frozen_head"].split_hash == target.split_hash == histories["partial_unfreeze"].split_hash
assert abs(float(partial_gain) - _gain) < 1e-3, (partial_gain, _gain)
### END HIDDEN TESTS
""", "n05_decision_gain_tests", points=1)

nb.code(r"""
_ = save_decisions(OUT, adaptation_depth=adaptation_depth, bottleneck=bottleneck, partial_gain=partial_gain)
print("decisions saved to decisions.json in out_dir")
""")

nb.md(r"""
## Recipe note (2 points, graded by hand)

Four short lines from **your** evidence: the **symptom**, the **change** (one), **what moved** (kept val
accuracy, trainable parameters), and the **next move**.
""")

nb.manual(r"""
- **Symptom:** with the backbone frozen, the new head's train and val accuracy both stall far below 100%, under
  the logistic-regression baseline's level or near it: the pretrained features miss what the target rule needs.
- **Change:** unfreeze the top block (head at the frozen run's LR, backbone at a smaller LR via parameter groups),
  same split, same rule (best val_acc).
- **What moved:** the kept val accuracy rose by tens of points (partial_gain), well above the baseline, for a
  fraction of the parameters trained; the kept epoch is recorded by the rule, not the last one.
- **Next move:** the bottleneck is adaptation: keep the partial unfreeze, and try a LoRA adapter (notebook 06),
  which adapts every block with fewer trainable numbers, under the same rule.
""", "n05_recipe_note", points=2)

print(nb.write())
