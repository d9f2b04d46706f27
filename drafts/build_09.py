import sys

sys.path.insert(0, "/tmp/nbsrc")
from nbkit import Notebook  # noqa: E402
from transfer_setup import SETUP  # noqa: E402

nb = Notebook("09_peft_lab")

nb.header(r"""
# 09 · Lab: a PEFT workflow under one validation rule

**What this lab is.** The whole workflow of the course, end to end, with the artifacts a team would review:
pretrain on a source task, then adapt to a target task with few labels in three ways of increasing capacity:
**frozen backbone + new head**, **partial unfreeze** (top block + head, backbone at a smaller LR) and a **LoRA
adapter** (plus the head). Every run uses **one split** and **one checkpoint rule**, next to an honest simple
baseline. The lab ends with the exit standard: which strategy wins, what the bottleneck is, which strategies
are enough, and the next change.

**When to use it.** Before fine-tuning anything: this is the order of experiments that tells you how much
adaptation a task needs, at what cost (trainable parameters, optimizer memory, seconds).

**What you will see in the first minute.** The pretrained model's kept checkpoint, then a frozen backbone that
plateaus well below what the target task allows.

**Artifacts** (in `out_dir`): `peft_summary.csv`, `pretrain_history.csv`, `frozen_head_history.csv`,
`partial_unfreeze_history.csv`, `adapter_history.csv`, `peft_curves.png`, `source_pretrained_best_state.pt`,
`adapter_best_state.pt`.
""", out_dir_default="artifacts")

nb.code(r"""
import copy
import time

import matplotlib.pyplot as plt
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression

from course_lib.checkpoint import BestCheckpoint
from course_lib.compare import compare_runs
from course_lib.data import make_loaders
from course_lib.freezing import param_groups, trainable_names, unfreeze_top_k
from course_lib.lora import add_lora, lora_state_dict
from course_lib.models import TinyTransformer
from course_lib.notebook import prepare_out_dir, save_decisions, use_or_fallback
from course_lib.params import count_parameters
from course_lib.plots import plot_comparison, plot_history, save_figure
from course_lib.train import evaluate, fit

OUT = prepare_out_dir(out_dir)
""")

nb.md(r"""
## 0. The setup: data, model, and the one rule

The transfer scenario of the course (`course_lib.transfer`, as in notebooks 05 and 06): token sequences, a source
task with many labels, a related target task with few labels. Everything below reads its settings from
`TRANSFER_DEFAULTS`, so this lab and the course's tests agree.
""")

nb.code(SETUP + r"""

RULE = dict(metric="val_acc", mode="max")  # THE checkpoint rule of this lab: best validation accuracy
STRATEGIES = ("frozen_head", "partial_unfreeze", "adapter")
print(source)
print(target)
print("rule:", BestCheckpoint(**RULE).rule, "| target split hash:", target.split_hash)
""")

nb.md(r"""
## 1. Pretrain on the source task, keep the best checkpoint

`fit` restores the kept checkpoint into the model at the end (`restore_best=True`), and `history.best_state` holds
a copy of it: that is the file we save, not the last epoch.
""")

nb.code(r"""
seed_everything(seed)
pretrained = TinyTransformer(**MODEL)
src_train, src_val, _ = make_loaders(source, CFG["batch_size"], seed=seed)
pretrain_history = fit(pretrained, src_train, src_val, checkpoint=BestCheckpoint(**RULE), device=DEVICE,
                       name="pretrain", split_hash=source.split_hash, **PRETRAIN)
print(pretrain_history)
pretrain_history.to_csv(OUT / "pretrain_history.csv")
torch.save(pretrain_history.best_state, OUT / "source_pretrained_best_state.pt")
fig = plot_history(pretrain_history, title="pretraining on the source task (dashed: kept checkpoint)")
plt.show()
""")

nb.md(r"""
## 2. Your turn: prepare a model for a strategy (2 points)

Write `prepare(model, strategy)`, which changes `model` **in place** for one of the three strategies and returns
it. Start by giving the model a fresh head (`model.head.reset_parameters()`), then:

* `"frozen_head"`: everything frozen except the head (`course_lib.freezing.unfreeze_top_k(model, 0)`);
* `"partial_unfreeze"`: the top block and the head trainable, the rest frozen (`unfreeze_top_k(model, 1)`);
* `"adapter"`: LoRA on `LORA_TARGETS` with rank `LORA_R` and alpha `LORA_ALPHA`, the head trained too
  (`course_lib.lora.add_lora(..., train_modules=("head",))`);
* any other `strategy`: raise `ValueError` naming the strategy and listing `STRATEGIES`.
""")

nb.solution(r'''
def prepare(model, strategy):
    """Set up ``model`` in place for ``strategy`` (one of STRATEGIES) with a fresh head; return it."""
    ### BEGIN SOLUTION
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    model.head.reset_parameters()
    if strategy == "frozen_head":
        unfreeze_top_k(model, 0)
    elif strategy == "partial_unfreeze":
        unfreeze_top_k(model, 1)
    else:
        add_lora(model, LORA_TARGETS, r=LORA_R, alpha=LORA_ALPHA, train_modules=("head",))
    return model
    ### END SOLUTION
''', "n09_prepare")

nb.tests(r"""
_m = prepare(copy.deepcopy(pretrained), "frozen_head")
assert trainable_names(_m) == ["head.weight", "head.bias"], trainable_names(_m)
print("visible test passed")
### BEGIN HIDDEN TESTS
from course_lib.lora import LoRALinear as _LoRALinear


def _reference(strategy):
    _r = copy.deepcopy(pretrained)
    if strategy == "frozen_head":
        unfreeze_top_k(_r, 0)
    elif strategy == "partial_unfreeze":
        unfreeze_top_k(_r, 1)
    else:
        add_lora(_r, LORA_TARGETS, r=LORA_R, alpha=LORA_ALPHA, train_modules=("head",))
    return _r


for _s in STRATEGIES:
    torch.manual_seed(0)
    _got = prepare(copy.deepcopy(pretrained), _s)
    _want = _reference(_s)
    assert _got is not None, "return the model"
    assert trainable_names(_got) == trainable_names(_want), (_s, trainable_names(_got))
    _layers = {n: m for n, m in _got.named_modules() if isinstance(m, _LoRALinear)}
    _ref_layers = {n: m for n, m in _want.named_modules() if isinstance(m, _LoRALinear)}
    assert sorted(_layers) == sorted(_ref_layers), (_s, sorted(_layers))
    assert all(m.r == LORA_R and m.scaling == LORA_ALPHA / LORA_R for m in _layers.values())
    assert not torch.equal(_got.head.weight, pretrained.head.weight), "start from a fresh head"
    for _n, _p in _want.state_dict().items():
        if not _n.startswith("head") and "lora_" not in _n:
            assert torch.equal(_got.state_dict()[_n], _p), f"{_n}: the backbone must stay the pretrained one"
_model_in = copy.deepcopy(pretrained)
assert prepare(_model_in, "partial_unfreeze") is _model_in, "change the model in place and return it"
try:
    prepare(copy.deepcopy(pretrained), "full")
except ValueError as _err:
    assert "full" in str(_err)
else:
    raise AssertionError("an unknown strategy must raise ValueError")
### END HIDDEN TESTS
""", "n09_prepare_tests", points=2)

nb.code(r"""
def reference_prepare(model, strategy):
    # course_lib's calls, used when prepare is not written yet
    model.head.reset_parameters()
    if strategy == "frozen_head":
        unfreeze_top_k(model, 0)
    elif strategy == "partial_unfreeze":
        unfreeze_top_k(model, 1)
    else:
        add_lora(model, LORA_TARGETS, r=LORA_R, alpha=LORA_ALPHA, train_modules=("head",))
    return model


prepare_fn = use_or_fallback(prepare, reference_prepare, copy.deepcopy(pretrained), "frozen_head", name="prepare")
""")

nb.md(r"""
## 3. Three strategies, one split, one rule

Each strategy starts from the kept pretrained checkpoint and the same fresh head (same seed), trains on the same
target split with the same batches, and keeps its best epoch under the same rule. What differs is only what is
trainable, and the learning rates that go with it (`STRATEGY_FIT` below): a frozen backbone's head can take a
large LR; when backbone weights move, the backbone gets a smaller LR than the head (parameter groups).
""")

nb.code(r"""
tgt_train, tgt_val, tgt_test = make_loaders(target, CFG["batch_size"], seed=seed)
histories, models = {}, {}


def run_strategy(strategy):
    seed_everything(seed + 1)  # the same fresh head for every strategy
    model = prepare_fn(copy.deepcopy(pretrained), strategy)
    opts = dict(STRATEGY_FIT[strategy])
    if "backbone_lr" in opts:  # parameter groups: the backbone moves more slowly than the head
        groups = param_groups(model, lr=opts.pop("lr"), backbone_lr=opts.pop("backbone_lr"),
                              weight_decay=opts.pop("weight_decay", 0.0))
        opts["optimizer"] = torch.optim.AdamW(groups)
    history = fit(model, tgt_train, tgt_val, checkpoint=BestCheckpoint(**RULE), device=DEVICE, name=strategy,
                  split_hash=target.split_hash, **opts)
    history.to_csv(OUT / f"{strategy}_history.csv")
    return history, model


for strategy in STRATEGIES:
    print(strategy, STRATEGY_FIT[strategy])
    histories[strategy], models[strategy] = run_strategy(strategy)
    print(" ", histories[strategy])
torch.save(lora_state_dict(models["adapter"]), OUT / "adapter_best_state.pt")  # A, B and the head: kept epoch
""")

nb.md(r"""
`fit` restored each model to its kept epoch, so `lora_state_dict(models["adapter"])` is the kept adapter: the
LoRA matrices and the head, a small file next to the pretrained checkpoint.

## 4. The honest baseline

Would a simple model, without any pretraining, do as well? Logistic regression on one-hot tokens
(`one_hot_features`), trained on the same target training set, measured on the same validation set.
""")

nb.code(r"""
# NBVAL_IGNORE_OUTPUT
t0 = time.perf_counter()
F_train, F_val, F_test = (one_hot_features(X) for X in (target.X_train, target.X_val, target.X_test))
logreg = LogisticRegression(max_iter=2000).fit(F_train, target.y_train.numpy())
baseline_seconds = time.perf_counter() - t0
baseline = {"val": logreg.score(F_val, target.y_val.numpy()), "test": logreg.score(F_test, target.y_test.numpy())}
print(f"logistic regression on one-hot tokens: val_acc {baseline['val']:.3f}, test_acc {baseline['test']:.3f}")
""")

nb.md(r"""
## 5. The summary table

`compare_runs` checks that the runs share the split and the rule, and gives one row per strategy: kept epoch and
value, final value, whether the kept checkpoint came before the last epoch, trainable parameters, optimizer-state
bytes, seconds. We add the test accuracy of the kept checkpoint (looked at once, at the end) and the baseline row.
""")

nb.code(r"""
summary = compare_runs(histories, sort=False)
summary["test_acc"] = [evaluate(models[s], tgt_test, device=DEVICE)["acc"] for s in STRATEGIES]
summary.loc["logreg_baseline"] = pd.Series({
    "best_epoch": None, "best_value": baseline["val"], "final_epoch": None, "final_value": baseline["val"],
    "best_before_final": False, "trainable_params": logreg.coef_.size + logreg.intercept_.size,
    "optimizer_state_bytes": 0, "seconds": round(baseline_seconds, 2), "split_hash": target.split_hash,
    "rule": summary["rule"].iloc[0], "test_acc": baseline["test"]})
summary.index.name = "strategy"
summary["rule"] = summary["rule"].astype(str)
summary[["best_epoch", "final_epoch"]] = summary[["best_epoch", "final_epoch"]].astype("Int64")
summary.to_csv(OUT / "peft_summary.csv")
summary[["best_epoch", "best_value", "final_value", "best_before_final", "trainable_params",
         "optimizer_state_bytes", "test_acc"]].round(3)
""")

nb.code(r"""
# NBVAL_IGNORE_OUTPUT
summary[["seconds", "split_hash", "rule"]]
""")

nb.code(r"""
fig = plot_comparison(histories, keys=("val_loss", "val_acc"),
                      title="frozen head vs partial unfreeze vs LoRA adapter (dots: kept checkpoint)")
fig.axes[1].axhline(baseline["val"], color="grey", linestyle=":", label="logreg baseline")
fig.axes[1].legend(fontsize=8)
save_figure(fig, OUT / "peft_curves.png")
plt.show()
ARTIFACTS = ("peft_summary.csv", "pretrain_history.csv", "frozen_head_history.csv", "partial_unfreeze_history.csv",
             "adapter_history.csv", "peft_curves.png", "source_pretrained_best_state.pt", "adapter_best_state.pt")
print("artifacts written:", all((OUT / f).is_file() for f in ARTIFACTS), ARTIFACTS)
""")

nb.md(r"""
**What to look at.** The frozen head's curve flattens early, well below the others: the pretrained features do
not contain what the target rule needs, and no head on top can create it. Partial unfreeze and the adapter both
change the attention of the backbone and get much further; the adapter does it with fewer trainable numbers and
less optimizer state. The baseline sees tokens independently of each other and cannot express the rule.

## 6. The exit standard

**The rules, stated before reading the table:**

* `winner`: the strategy (row of `peft_summary.csv`, baseline included) with the highest kept validation
  accuracy (`best_value`); ties go to the row with fewer trainable parameters.
* `main_bottleneck`: one of `BOTTLENECKS`: what limited the frozen model on this task.
* `frozen_enough`, `partial_enough`, `adapter_enough` (`bool`): a strategy is *enough* when its kept validation
  accuracy is within `BAR` (2 points) of the winner's: `gap <= BAR` in the table below.
* `next_change`: one of `NEXT_CHANGES`, the action of the **cheapest** row (fewest trainable parameters) that is
  enough: the smallest change that survives the validation rule.

Answer from **your** `peft_summary.csv` (read it back below, as a reviewer would).
""")

nb.code(r"""
BAR = 0.02
NEXT_CHANGES = {
    "frozen_head": "keep the frozen backbone and ship the head",
    "partial_unfreeze": "unfreeze the top block",
    "adapter": "train a LoRA adapter",
    "logreg_baseline": "drop the transformer for the baseline",
}
table = pd.read_csv(OUT / "peft_summary.csv", index_col="strategy")
table["gap"] = (table["best_value"].max() - table["best_value"]).round(6)  # to the best row; rounded
table[["best_value", "gap", "trainable_params"]].round(3)
""")

nb.solution(r'''
winner = None            # a row name of peft_summary.csv
main_bottleneck = None   # one of BOTTLENECKS
frozen_enough = None     # True / False
partial_enough = None
adapter_enough = None
next_change = None       # one of NEXT_CHANGES.values()
### BEGIN SOLUTION
ranked = table.sort_values(["best_value", "trainable_params"], ascending=[False, True], kind="stable")
winner = str(ranked.index[0])
main_bottleneck = "adaptation"
enough = {s: bool(table.loc[s, "gap"] <= BAR) for s in table.index}
frozen_enough, partial_enough, adapter_enough = (enough[s] for s in STRATEGIES)
cheapest = table.loc[[s for s in table.index if enough[s]], "trainable_params"].idxmin()
next_change = NEXT_CHANGES[cheapest]
### END SOLUTION
print(f"winner={winner!r} main_bottleneck={main_bottleneck!r}")
print(f"frozen_enough={frozen_enough} partial_enough={partial_enough} adapter_enough={adapter_enough}")
print(f"next_change={next_change!r}")
''', "n09_decision")

nb.tests(r"""
assert type(winner) is str and winner in list(table.index), f"winner must be one of {list(table.index)}"
assert main_bottleneck in BOTTLENECKS, f"main_bottleneck must be one of {BOTTLENECKS}"
### BEGIN HIDDEN TESTS
_t = pd.read_csv(OUT / "peft_summary.csv", index_col="strategy")
assert set(STRATEGIES) <= set(_t.index) and len(_t) == 4
for _s in STRATEGIES:
    assert abs(_t.loc[_s, "best_value"] - histories[_s].best_value) < 1e-9, "the summary of this run"
_top = _t["best_value"].max()
_cands = _t[_t["best_value"] >= _top - 1e-12]
_win = _cands["trainable_params"].idxmin()
assert winner == _win, (winner, _win)
assert type(main_bottleneck) is str and main_bottleneck == "adaptation"
### END HIDDEN TESTS
""", "n09_decision_winner_tests", points=2)

nb.tests(r"""
for _name, _v in (("frozen_enough", frozen_enough), ("partial_enough", partial_enough),
                  ("adapter_enough", adapter_enough)):
    assert type(_v) is bool, f"{_name} must be True or False"
assert type(next_change) is str and next_change in NEXT_CHANGES.values(), f"next_change: one of {list(NEXT_CHANGES.values())}"
### BEGIN HIDDEN TESTS
_t = pd.read_csv(OUT / "peft_summary.csv", index_col="strategy")
_top = _t["best_value"].max()
_enough = {s: bool(round(_top - _t.loc[s, "best_value"], 6) <= BAR) for s in _t.index}
assert frozen_enough is _enough["frozen_head"]
assert partial_enough is _enough["partial_unfreeze"]
assert adapter_enough is _enough["adapter"]
_cheapest = _t.loc[[s for s in _t.index if _enough[s]], "trainable_params"].idxmin()
assert next_change == NEXT_CHANGES[_cheapest], (next_change, NEXT_CHANGES[_cheapest])
for _f in ARTIFACTS:
    assert (OUT / _f).is_file(), f"missing artifact {_f}"
### END HIDDEN TESTS
""", "n09_decision_enough_tests", points=2)

nb.code(r"""
_ = save_decisions(OUT, winner=winner, main_bottleneck=main_bottleneck, frozen_enough=frozen_enough,
                   partial_enough=partial_enough, adapter_enough=adapter_enough, next_change=next_change)
print("decisions saved to decisions.json in out_dir")
""")

nb.md(r"""
## Recipe note (2 points, graded by hand)

Four short lines from **your** evidence (numbers from your summary): the **symptom**, the **changes** tried (one
at a time: frozen -> partial -> adapter), **what moved** (kept val accuracy, trainable parameters, optimizer
bytes), and the **next move**.
""")

nb.manual(r"""
- **Symptom:** the frozen backbone + new head plateaus far below the other strategies on the target task: the
  pretrained features do not encode the target rule; the one-hot logistic-regression baseline is lower still.
- **Changes (one at a time, same split and rule):** frozen head -> top block + head unfrozen (backbone at a
  smaller LR) -> LoRA adapter on all projections + head.
- **What moved:** unfreezing the top block and the adapter both raised the kept val accuracy by tens of points
  over the frozen head; the adapter got there with fewer trainable parameters and less optimizer state than
  partial unfreeze, and its kept checkpoint is a small file next to the pretrained one.
- **Next move:** the bottleneck was adaptation capacity; ship the cheapest strategy that is within the bar (the
  adapter here), merged for inference; next, try a smaller rank or fewer target modules under the same rule.
""", "n09_recipe_note", points=2)

print(nb.write())
