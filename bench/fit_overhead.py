"""course_lib ``fit`` vs a bare hand-written torch loop: same model, data, steps and seed.

Both loops evaluate on the validation set once per epoch (a loop without it trains blind). The ratio
fit / bare is what the course's bookkeeping costs: per-step LR, loss, pre-clip grad norm and clip flag,
per-epoch history, best-checkpoint copy. Target: <= 1.05.

Timed with ``timing.py``'s tools, but with one thread and CPU time by default (``BENCH_THREADS=2`` for
wall-clock time on two): what differs between the loops is a few small ops and some Python per step, and
two threads' jitter on a 2-core VM swamps it (1.07-1.25 for the same code here, against 1.04-1.07 with
one thread). The loops alternate round by round (the order rotates); the figure is the median of the
paired ratios. What the ~5% buys, per step: the loss, the pre-clip global gradient norm (about 3.5% of a
step of this small MLP: it reads every gradient once), the LR and the clip flag.

    python -m bench.fit_overhead [--epochs 8] [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from bench.timing import Timings, print_rows, setup_cpu
from course_lib import seed_everything
from course_lib.data import digits_split, make_loaders
from course_lib.models import MLP
from course_lib.train import evaluate, fit

TARGET = 1.05


def _setup(seed=0):
    seed_everything(seed)
    split = digits_split(seed)
    train, val, _ = make_loaders(split, 64, seed=seed)
    return MLP(hidden=(512, 512)), train, val


def bare(epochs: int, now=time.perf_counter) -> float:
    model, train, val = _setup()
    t0 = now()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # what fit builds, also timed there
    for _ in range(epochs):
        model.train()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        evaluate(model, val)
    return now() - t0


def course(epochs: int, now=time.perf_counter) -> float:
    model, train, val = _setup()
    t0 = now()
    fit(model, train, val, epochs=epochs, lr=1e-3, device="cpu", progress=False)
    return now() - t0


def run(epochs: int = 8, repeats: int = 7) -> list[dict]:
    cpu = setup_cpu(None if os.environ.get("BENCH_THREADS") else 1)
    now = time.process_time if cpu["clock"] == "cpu" else time.perf_counter
    variants = {"bare": bare, "fit": course}
    for fn in variants.values():
        fn(1, now)  # warm up allocators and lazy imports
    samples = {name: [] for name in variants}
    for r in range(repeats):  # the setup (data, model) stays outside the timed region of each run
        names = list(variants)[r % 2:] + list(variants)[:r % 2]
        for name in names:
            samples[name].append(variants[name](epochs, now))
    t = Timings(samples)
    ratio = t.ratio("fit", "bare")
    return [{"bench": "fit_overhead", "figure": "fit / bare loop seconds", "value": round(ratio, 3),
             "target": f"<= {TARGET}", "ok": ratio <= TARGET,
             "detail": f"bare {t.best['bare']:.3f}s, fit {t.best['fit']:.3f}s, {epochs} epochs MLP 64-512-512-10 "
                       f"on digits, median of {repeats} paired runs, {cpu['note']}"}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    return print_rows(run(args.epochs, args.repeats))


if __name__ == "__main__":
    sys.exit(main())
