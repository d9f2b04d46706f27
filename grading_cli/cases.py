"""The course's per-exercise cases: Python source defining ``cases(f)``, run by ``checks.RUNNER`` in the
check process (learner answers' functions are ``f``'s attributes). Each ``(label, thunk)`` value is encoded by
``plain``; an exception becomes ``{"raised": "ValueError"}``. The same source runs on the solution at release
time (``python -m grading_cli release``) to give the expected values."""

WARMUP_COSINE = '''
def cases(f):
    for w, t in [(0, 50), (1, 7), (10, 110), (17, 340), (34, 680), (3, 3), (0, 1), (5, 6), (2, 1000)]:
        yield f"warmup={w} total={t}", lambda w=w, t=t: [f.warmup_cosine(s, w, t) for s in range(t + 1)]
'''

RESTARTS = '''
def cases(f):
    for w, t, c in [(0, 50, 1), (10, 110, 1), (10, 110, 3), (7, 100, 2.5), (0, 1, 1), (20, 20, 2), (3, 40, 4),
                    (0, 97, 0.5), (1, 2, 1)]:
        yield f"w={w} T={t} cycles={c}", lambda w=w, t=t, c=c: [
            f.cosine_with_restarts_multiplier(s, w, t, c) for s in range(t + 15)]
    yield "default cycles", lambda: [f.cosine_with_restarts_multiplier(s, 0, 100) for s in (0, 30, 99, 100, 120)]
'''

BEST_EPOCH = '''
import math
import random


def cases(f):
    rng = random.Random(4)
    for trial in range(300):
        n = rng.randint(1, 25)
        start = rng.randint(1, 6)
        pool = [0.1, 0.2, 0.3, 0.5, math.nan] if trial % 2 else [rng.random() for _ in range(4)] + [math.nan]
        metric = rng.choice(["val_loss", "val_acc", "f1"])
        rows = [{"epoch": start + i, metric: rng.choice(pool), "other": rng.random()} for i in range(n)]
        for mode in ("min", "max"):
            yield f"trial {trial} {mode}", lambda rows=rows, metric=metric, mode=mode: f.choose_best_epoch(
                [dict(r) for r in rows], metric, mode)
    yield "all NaN", lambda: f.choose_best_epoch([{"epoch": 1, "val_loss": math.nan}], "val_loss", "min")
    yield "no rows", lambda: f.choose_best_epoch([], "val_loss", "min")
    rows = [{"epoch": 1, "val_acc": 0.8}, {"epoch": 2, "val_acc": 0.9}, {"epoch": 3, "val_acc": 0.9}]
    for bad in ("best", "MAX", None):
        yield f"mode={bad!r}", lambda bad=bad: f.choose_best_epoch(rows, "val_acc", bad)
'''

LOG_UNIFORM = '''
import numpy as np


def cases(f):
    yield "30000 in [1e-4, 1e-1]", lambda: _shape(f.sample_log_uniform(1e-4, 1e-1, 30000, np.random.default_rng(1)),
                                                 1e-4, 1e-1)
    yield "20000 in [2, 8]", lambda: _shape(f.sample_log_uniform(2.0, 8.0, 20000, np.random.default_rng(3)), 2.0, 8.0)
    yield "same seed", lambda: bool(np.array_equal(f.sample_log_uniform(1e-4, 1e-1, 50, np.random.default_rng(7)),
                                                   f.sample_log_uniform(1e-4, 1e-1, 50, np.random.default_rng(7))))
    yield "other seed", lambda: bool(np.array_equal(f.sample_log_uniform(1e-4, 1e-1, 50, np.random.default_rng(7)),
                                                    f.sample_log_uniform(1e-4, 1e-1, 50, np.random.default_rng(8))))
    for bad in ((0.0, 1.0), (-1.0, 1.0), (1e-2, 1e-3), (1e-2, 1e-2)):
        yield f"bounds {bad}", lambda bad=bad: f.sample_log_uniform(*bad, 5, np.random.default_rng(0)) is None


def _shape(x, lo, hi):
    """What the hidden test asked of a log-uniform sample: in range, a third per third of the log range,
    the median at the geometric middle."""
    assert type(x) is np.ndarray
    logs = np.log(x)
    edges = np.linspace(np.log(lo), np.log(hi), 4)
    thirds = all(abs(float(np.mean((logs >= a) & (logs < b))) - 1 / 3) < 0.02 for a, b in zip(edges[:-1], edges[1:]))
    middle = abs(float(np.median(np.log10(x))) - (np.log10(lo) + np.log10(hi)) / 2) < 0.05
    return {"shape": list(x.shape), "inside": bool(np.all(x >= lo) and np.all(x <= hi)), "thirds": bool(thirds),
            "median": bool(middle)}
'''

ADAM_STEP = '''
import torch


def _step(f, tensors, step, kw):
    copies = [t.clone() for t in tensors]
    got = f.adam_step(*tensors, step, **kw)
    return {"out": got, "inputs unchanged": all(torch.equal(a, b) for a, b in zip(copies, tensors))}


def _chain(f, decoupled, gen):
    w = torch.nn.Parameter(torch.randn(6, generator=gen))
    p1, m1, v1 = w.detach().clone(), torch.zeros(6), torch.zeros(6)
    grads = [torch.randn(6, generator=gen) for _ in range(5)]
    return lambda: _chained(f, p1, m1, v1, grads, decoupled)


def _chained(f, p1, m1, v1, grads, decoupled):
    for i, grad in enumerate(grads):
        p1, m1, v1 = f.adam_step(p1, grad, m1, v1, i, lr=1e-2, weight_decay=0.2, decoupled=decoupled)
    return p1


def cases(f):
    gen = torch.Generator().manual_seed(123)
    for shape in [(7,), (3, 5), (2, 3, 4)]:
        for decoupled in (True, False):
            for wd in (0.0, 0.1, 0.5):
                for step in (0, 1, 9):
                    p0 = torch.randn(shape, generator=gen)
                    g0 = torch.randn(shape, generator=gen) * 0.01
                    m0 = torch.randn(shape, generator=gen) * 0.01 if step else torch.zeros(shape)
                    v0 = torch.rand(shape, generator=gen) * 1e-4 if step else torch.zeros(shape)
                    kw = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, decoupled=decoupled)
                    yield (f"shape={shape} decoupled={decoupled} wd={wd} step={step}",
                           lambda t=(p0, g0, m0, v0), step=step, kw=kw: _step(f, t, step, kw))
    for decoupled in (True, False):
        yield f"five chained steps, decoupled={decoupled}", _chain(f, decoupled, gen)
'''

CLIP = '''
import torch


def _make(seed, scale):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(4, 3), (7,), (2, 2, 5), (3,)]]
    for i, q in enumerate(ps):
        if i != 3:  # the last one has no gradient: it must be skipped
            q.grad = torch.randn(q.shape, generator=g) * scale
    return ps


def _clip(f, seed, scale, max_norm):
    ps = _make(seed, scale)
    before = [q.grad.clone() for q in ps[:3]]
    norm = f.clip_global_norm_((q for q in ps), max_norm)  # a generator, like model.parameters()
    ok = torch.is_tensor(norm) and norm.dim() == 0
    return {"norm": float(norm) if ok else "not a 0-dim tensor", "grads": [q.grad for q in ps[:3]],
            "unchanged": all(torch.equal(q.grad, b) for q, b in zip(ps[:3], before)), "skipped": ps[3].grad is None}


def _bad(f, max_norm):
    try:
        f.clip_global_norm_(_make(0, 1.0), max_norm)
    except ValueError as err:
        return {"raised": "ValueError", "names max_norm": "max_norm" in str(err)}
    return "no error"


def cases(f):
    for seed, scale, max_norm in [(0, 10.0, 1.0), (1, 0.01, 1.0), (2, 3.0, 0.5), (3, 100.0, 250.0), (4, 1.0, 1e-3)]:
        yield f"seed={seed} scale={scale} max_norm={max_norm}", lambda a=(seed, scale, max_norm): _clip(f, *a)
    yield "no gradients", lambda: float(f.clip_global_norm_([torch.nn.Parameter(torch.ones(2))], 1.0))
    for bad in (0.0, -1.0):
        yield f"max_norm={bad}", lambda bad=bad: _bad(f, bad)
'''

LORA_FORWARD = '''
import torch


def _merged(f, W, A, B, alpha, r):
    W0 = W.clone()
    merged = f.lora_merged_weight(W, A, B, alpha, r)
    return {"merged": merged, "W unchanged": torch.equal(W, W0)}


def _grads(f):
    g = torch.Generator().manual_seed(7)
    A = torch.randn(2, 6, generator=g).requires_grad_()
    B = torch.randn(4, 2, generator=g).requires_grad_()
    f.lora_forward(torch.randn(3, 6, generator=g), torch.randn(4, 6, generator=g), torch.zeros(4), A, B, 2.0,
                   2).sum().backward()
    return {"A": A.grad, "B": B.grad}


def cases(f):
    for seed, (d_in, d_out, r, alpha, shape, bias) in enumerate([
            (8, 6, 2, 4.0, (5,), True), (16, 16, 4, 4.0, (2, 7), True), (12, 5, 1, 3.0, (3, 2, 4), False),
            (32, 24, 8, 16.0, (9,), True)]):
        g = torch.Generator().manual_seed(100 + seed)
        W, A, B = (torch.randn(d_out, d_in, generator=g), torch.randn(r, d_in, generator=g) / d_in ** 0.5,
                   torch.randn(d_out, r, generator=g))
        b = torch.randn(d_out, generator=g) if bias else None
        x = torch.randn(*shape, d_in, generator=g)
        yield f"forward {seed}", lambda a=(x, W, b, A, B, alpha, r): f.lora_forward(*a)
        yield f"merged {seed}", lambda a=(W, A, B, alpha, r): _merged(f, *a)
    yield "gradients reach A and B", lambda: _grads(f)
'''

NO_DECAY = '''
import torch

from course_lib.freezing import freeze, unfreeze_top_k
from course_lib.models import MLP, TinyTransformer


def _split(f, model, wd):
    """The groups by parameter name: which names decay at ``wd``, which at 0, none twice, none empty."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = f.no_decay_groups(model, wd)
    if type(groups) is not list or not groups:
        return "not a non-empty list"
    out, seen = {"decay": [], "no_decay": []}, []
    for g in groups:
        if type(g) is not dict or "params" not in g or "weight_decay" not in g:
            return "a group is not a dict with params and weight_decay"
        w = g["weight_decay"]
        if type(w) not in (int, float):
            return "a weight_decay is not a number"
        ids = [names.get(id(p), "?") for p in list(g["params"])]
        if not ids:
            return "an empty group"
        if w != 0 and w != wd:
            return "a weight_decay is neither 0 nor the one given"
        seen += ids
        out["no_decay" if w == 0 else "decay"] += ids
    out = {k: sorted(v) for k, v in out.items()}
    out["each once"] = len(seen) == len(set(seen))
    torch.optim.AdamW([dict(g, params=list(g["params"])) for g in groups], lr=1e-3)  # torch accepts them
    return out


def _models():
    torch.manual_seed(0)
    partial = TinyTransformer(d_model=16, n_heads=2, n_layers=2)
    unfreeze_top_k(partial, 1)
    head_only = MLP(hidden=(8,))
    unfreeze_top_k(head_only, 0)
    biases_only = MLP(hidden=(8,))
    freeze(biases_only, "*.weight")  # the decay group is empty and must be left out
    return {"MLP(16, 8)": MLP(hidden=(16, 8), dropout=0.2),
            "TinyTransformer": TinyTransformer(d_model=16, n_heads=2, n_layers=2), "top block only": partial,
            "head only": head_only, "biases only": biases_only, "LayerNorm": torch.nn.Sequential(
                torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))}


def cases(f):
    for label, model in _models().items():
        for wd in (0.3, 0.05):
            yield f"{label} wd={wd}", lambda model=model, wd=wd: _split(f, model, wd)
'''

SELECT_BEST = '''
import math
import random

import numpy as np
import pandas as pd


def _best(f, df, metric, mode):
    row = f.select_best(df.copy(), metric, mode)
    if type(row) is not pd.Series:
        return "not a pd.Series (results.loc[label])"
    name = int(row.name) if isinstance(row.name, (int, np.integer)) else row.name
    return {"name": name, "row": [float(v) if v == v else "nan" for v in row.astype(float).tolist()]}


def cases(f):
    df = pd.DataFrame({"lr": [1e-3, 1e-2, 3e-2, 1e-1], "train_loss": [0.2, 0.01, 0.001, math.nan],
                       "val_loss": [0.30, 0.35, 0.40, math.nan], "val_acc": [0.90, 0.89, 0.95, math.nan]},
                      index=pd.Index([10, 11, 12, 13], name="trial"))
    yield "val_loss min", lambda: _best(f, df, "val_loss", "min")
    yield "val_acc max", lambda: _best(f, df, "val_acc", "max")
    tie = pd.DataFrame({"train_loss": [0.1, 0.0, 0.3], "val_loss": [0.2, 0.2, 0.5]}, index=[5, 3, 7])
    yield "tie", lambda: _best(f, tie, "val_loss", "min")
    nan = pd.DataFrame({"train_loss": [0.0, 0.3, 0.4], "val_loss": [math.nan, 0.5, 0.45]})
    yield "NaN first", lambda: _best(f, nan, "val_loss", "min")
    rng = random.Random(8)
    for trial in range(40):
        n = rng.randint(1, 12)
        pool = [0.1, 0.2, 0.3, math.nan] if trial % 2 else [rng.random() for _ in range(3)] + [math.nan]
        data = {"lr": [rng.choice([1e-3, 3e-3, 1e-2]) for _ in range(n)],
                "train_loss": [rng.random() for _ in range(n)], "val_loss": [rng.choice(pool) for _ in range(n)],
                "val_acc": [rng.choice(pool) for _ in range(n)]}
        if any(v == v for v in data["val_loss"]) and any(v == v for v in data["val_acc"]):
            t = pd.DataFrame(data, index=pd.Index(rng.sample(range(100), n), name="trial"))
            yield f"random {trial} min", lambda t=t: _best(f, t, "val_loss", "min")
            yield f"random {trial} max", lambda t=t: _best(f, t, "val_acc", "max")
    for metric, mode in (("train_loss", "min"), ("train_acc", "max"), ("val_loss", "best"), ("val_loss", "MIN")):
        yield f"metric={metric} mode={mode}", lambda metric=metric, mode=mode: _best(f, df, metric, mode)
'''

NF4_BLOCK = '''
import torch

from course_lib.qlora import NF4_CODE

LEVELS = NF4_CODE.clone()  # before any answer could change the module's tensor


def _nf4(f, b):
    """What the hidden test asked: uint8 codes of the block's shape, a 0-dim fp32 absmax, each code the nearest
    NF4 level (a near-tie may go either way), the codes where the nearest level is clear."""
    c, a = f.nf4_quantize_block(b.clone())
    if not (torch.is_tensor(c) and c.dtype == torch.uint8 and tuple(c.shape) == tuple(b.shape)):
        return "codes: not uint8 of the block's shape"
    if not (torch.is_tensor(a) and a.dim() == 0 and a.dtype == torch.float32):
        return "absmax: not a 0-dim float32 tensor"
    if bool((c.long() > 15).any()):
        return "a code is not in 0..15"
    s = b.float() / a if float(a) > 0 else torch.zeros(b.shape)
    dist = (s[:, None] - LEVELS[None, :]).abs()
    mine = dist.gather(1, c.long()[:, None])[:, 0]
    clear = (dist.sort(dim=1).values[:, 1] - dist.min(dim=1).values) > 1e-6
    return {"absmax": float(a), "nearest": bool(torch.all(mine <= dist.min(dim=1).values + 1e-6)),
            "clear codes": c[clear]}


def cases(f):
    g = torch.Generator().manual_seed(10)
    blocks = [torch.randn(64, generator=g), torch.randn(64, generator=g) * 1e-3, torch.zeros(64),
              -torch.rand(64, generator=g) - 0.1, torch.randn(37, generator=g) * 40, torch.tensor([-3.0]),
              torch.zeros(1), torch.randn(64, generator=g).to(torch.bfloat16), torch.linspace(-1, 1, 64),
              torch.tensor([0.5, -1.0, 0.0, 0.25])]
    for i, b in enumerate(blocks):
        yield f"block {i} ({b.numel()} values, {b.dtype})", lambda b=b: _nf4(f, b)
'''

QUANTIZE_BLOCK = '''
import torch

from course_lib.optim8bit import dynamic_map


def _one(f, m, b):
    """What the hidden test asked of one block: uint8 codes of its shape, the input unchanged, absmax = max |x|,
    each code the nearest map entry (a near-tie either way), dequantize = map[codes] * absmax, a round trip
    within one map step."""
    b_in = b.clone()
    c, a = f.quantize_block(b_in, m)
    if not torch.equal(b_in, b):
        return "the input block changed"
    if not (torch.is_tensor(c) and c.dtype == torch.uint8 and tuple(c.shape) == tuple(b.shape)):
        return "codes: not uint8 of the block's shape"
    ref_a = b.abs().max()
    normed = b / ref_a if ref_a > 0 else torch.zeros_like(b)
    dist = (normed[:, None] - m[None, :]).abs()
    mine = dist.gather(1, c.long()[:, None])[:, 0]
    clear = (dist.sort(dim=1).values[:, 1] - dist.min(dim=1).values) > 1e-6
    ref_codes = dist.argmin(dim=1).to(torch.uint8)
    back = f.dequantize_block(ref_codes, ref_a, m)
    if not (torch.is_tensor(back) and tuple(back.shape) == tuple(b.shape)):
        return "dequantize_block: not one value per code"
    trip = f.dequantize_block(c, a, m)
    step = float((m[1:] - m[:-1]).max()) * float(ref_a) * (1 + 1e-6)
    return {"absmax": float(a), "nearest": bool(torch.all(mine <= dist.min(dim=1).values + 1e-6)),
            "clear codes": c[clear], "dequantized": back.float(),
            "round trip": bool(torch.all((trip.float() - b).abs() <= step)),
            "zero block gets 0": bool(torch.all(m[c.long()] == 0)) if float(ref_a) == 0.0 else None}


def cases(f):
    g = torch.Generator().manual_seed(7)
    for signed in (True, False):
        m = dynamic_map(signed)
        blocks = [torch.randn(256, generator=g), torch.randn(100, generator=g) * 1e-3, torch.zeros(256),
                  -torch.rand(256, generator=g) - 0.1, torch.randn(64, generator=g) * 50, torch.tensor([3.0]),
                  torch.zeros(1), torch.randn(256, generator=g) * torch.exp(torch.randn(256, generator=g) * 3)]
        if not signed:
            blocks = [b.abs() ** 2 for b in blocks]
        for i, b in enumerate(blocks):
            yield f"signed={signed} block {i}", lambda m=m, b=b: _one(f, m, b)
'''

SET_TRAINABLE = '''
import torch

from course_lib.models import TinyTransformer

CONFIGS = {"05's model": dict(vocab_size=9, max_len=8, n_classes=8, d_model=32, n_heads=4, n_layers=2, pos_std=1.0),
           "3 blocks": dict(d_model=16, n_heads=2, n_layers=3, vocab_size=7, max_len=9, n_classes=4),
           "1 block": dict(d_model=8, n_heads=2, n_layers=1, vocab_size=5, max_len=4, n_classes=3)}


def _set(f, kw, k, start):
    """The names left trainable, from all trainable or all frozen; the model changed in place and returned."""
    torch.manual_seed(0)
    model = TinyTransformer(**kw)
    if start == "all_frozen":
        for p in model.parameters():
            p.requires_grad_(False)
    out = f.set_trainable_top_k(model, k)
    return {"returned the model": out is model,
            "trainable": [n for n, p in model.named_parameters() if p.requires_grad]}


def cases(f):
    for label, kw in CONFIGS.items():
        for k in range(kw["n_layers"] + 1):
            for start in ("all_trainable", "all_frozen"):
                yield f"{label} k={k} from {start}", lambda kw=kw, k=k, start=start: _set(f, kw, k, start)
'''
