"""course_lib ``fit`` vs a bare hand-written torch loop: same model, data, steps and seed.

Both loops evaluate on the validation set once per epoch (a loop without it trains blind). The ratio
fit / bare is what the course's bookkeeping costs: per-step LR, loss, pre-clip grad norm and clip flag,
per-epoch history, best-checkpoint copy. Target: <= 1.05.

    python bench/fit_overhead.py [--epochs 8] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import print_rows  # noqa: E402

from course_lib import seed_everything  # noqa: E402
from course_lib.data import digits_split, make_loaders  # noqa: E402
from course_lib.models import MLP  # noqa: E402
from course_lib.train import evaluate, fit  # noqa: E402

TARGET = 1.05


def _setup(seed=0):
    seed_everything(seed)
    split = digits_split(seed)
    train, val, _ = make_loaders(split, 64, seed=seed)
    return MLP(hidden=(512, 512)), train, val


def bare(epochs: int) -> float:
    model, train, val = _setup()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        evaluate(model, val)
    return time.perf_counter() - t0


def course(epochs: int) -> float:
    model, train, val = _setup()
    t0 = time.perf_counter()
    fit(model, train, val, epochs=epochs, lr=1e-3, device="cpu", progress=False)
    return time.perf_counter() - t0


def run(epochs: int = 8, repeats: int = 5) -> list[dict]:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    bare(1), course(1)  # warm up allocators and lazy imports
    b, c = [], []
    for _ in range(repeats):  # interleaved, best of N: robust to a busy machine
        b.append(bare(epochs))
        c.append(course(epochs))
    ratio = min(c) / min(b)
    return [{"bench": "fit_overhead", "figure": "fit / bare loop seconds", "value": round(ratio, 3),
             "target": f"<= {TARGET}", "ok": ratio <= TARGET,
             "detail": f"bare {min(b):.3f}s, fit {min(c):.3f}s, {epochs} epochs MLP 64-512-512-10 on digits, CPU"}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    return print_rows(run(args.epochs, args.repeats))


if __name__ == "__main__":
    sys.exit(main())
