"""8-bit AdamW benchmark: course_lib's AdamW8bit against torch's AdamW (foreach) and bitsandbytes' AdamW8bit.

For one fp32 parameter of 1M, 4M and 16M elements (square matrices) with a fixed gradient, each optimizer
takes its first step (allocating its state; not timed), then steps are timed with the optimizers
interleaved; a ratio is the median over rounds of two times measured back to back (bench/timing.py).
Figures per size: optimizer-state bytes / fp32 AdamW's (target <= 0.27x; the 8-bit floor is 0.25x plus
one fp32 absmax per 256 elements per moment) and step time ratios. Target on CPU: course_lib's step no
slower than bitsandbytes' (course / bnb <= 1.00), reported for both paths of AdamW8bit: eager
(``compile=False``, the CPU default) and ``torch.compile``d (``compile=True``). Compilation happens in
the first compiled step: its seconds are reported on their own row and never enter a step time. Where
no compiler works, the compiled rows say so. On CUDA, torch's fused AdamW joins as the moonshot reference.

    python -m bench.optim8bit [--device cpu|cuda] [--sizes 1 4 16] [--rounds 9] [--no-compile]

bitsandbytes is optional (its rows are skipped without it); on CPU it prints a harmless "Failed to load
CPU gemm_4bit_forward" line at import. ``run()`` returns the rows for bench/run_all.py.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from bench.timing import interleaved, print_rows, setup_cpu
from course_lib.optim8bit import AdamW8bit
from course_lib.optimizers import optimizer_state_bytes

SEED, LR, WD = 0, 1e-3, 1e-2
STATE_TARGET, CPU_SPEED_TARGET = 0.27, 1.00


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001 - missing, or a broken native library: skip its rows
        return None
    return bnb


def _make(kind: str, p: torch.nn.Parameter, bnb):
    if kind == "torch AdamW":
        return torch.optim.AdamW([p], lr=LR, weight_decay=WD, foreach=True)
    if kind == "torch AdamW fused":  # CUDA only: the GPU reference (one kernel per step)
        return torch.optim.AdamW([p], lr=LR, weight_decay=WD, fused=True)
    if kind == "course eager":
        return AdamW8bit([p], lr=LR, weight_decay=WD, compile=False)
    if kind == "course compiled":
        return AdamW8bit([p], lr=LR, weight_decay=WD, compile=True)
    return bnb.optim.AdamW8bit([p], lr=LR, weight_decay=WD)


def _row(figure, value, target, ok, detail):
    return dict(bench="optim8bit", figure=figure, value=value, target=target, ok=bool(ok), detail=detail)


def _bench_size(millions: int, device, env: dict, rounds: int, kinds: list[str], bnb, compile_info: dict) -> list[dict]:
    cuda = device.type == "cuda"
    side = int(math.isqrt(millions << 20))
    g = torch.Generator().manual_seed(SEED)
    weight = torch.randn(side, side, generator=g).mul_(0.02).to(device)
    grad = torch.randn(side, side, generator=g).mul_(1e-3).to(device)
    opts, steps = {}, {}
    for kind in kinds:
        p = torch.nn.Parameter(weight.clone())
        p.grad = grad.clone()
        opt = _make(kind, p, bnb)
        env["sync"]()
        t0 = time.perf_counter()
        opt.step()  # allocates the state; the compiled path compiles here
        env["sync"]()
        if kind == "course compiled":
            if not opt.compiled:
                compile_info["error"] = "torch.compile failed here: AdamW8bit fell back to eager"
                continue
            compile_info.setdefault("first_step_s", time.perf_counter() - t0)
            compile_info.setdefault("first_size", millions)
        opts[kind], steps[kind] = opt, opt.step
    iters = 20 if cuda else max(1, 8 // millions)
    tm = interleaved(steps, rounds, iters, env["sync"], env["clock"], warmup=1)
    t = tm.best
    state = {k: optimizer_state_bytes(o) for k, o in opts.items()}  # bitsandbytes' shared code maps count: 2 KB
    n = side * side
    ms = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items())
    tag = f"{millions}M"
    rows = []
    for kind, label in (("course eager", "course_lib"), ("bnb", "bitsandbytes")):
        if kind in state:
            ratio = state[kind] / state["torch AdamW"]
            target, ok = (f"<= {STATE_TARGET:.2f}", ratio <= STATE_TARGET) if kind != "bnb" else ("reported", True)
            rows.append(_row(f"{tag}: state bytes {label} / fp32 AdamW", round(ratio, 4), target, ok,
                             f"{state[kind]:,} B vs {state['torch AdamW']:,} B for {n:,} params"))
    for kind in ("course eager", "course compiled"):
        if kind not in t:
            continue
        if "bnb" in t:
            ratio = tm.ratio(kind, "bnb")
            target = "reported" if cuda else f"<= {CPU_SPEED_TARGET:.2f}"
            rows.append(_row(f"{tag}: step time {kind} / bitsandbytes", round(ratio, 3), target,
                             cuda or ratio <= CPU_SPEED_TARGET,
                             f"median of {rounds} paired rounds of {iters}; best: {ms} ({env['note']})"))
        rows.append(_row(f"{tag}: step time {kind} / torch AdamW", round(tm.ratio(kind, "torch AdamW"), 3), "reported",
                         True, "fp32 AdamW (foreach): 16 B/param of state traffic vs ~2 B for 8-bit"))
    best = min((k for k in ("course eager", "course compiled") if k in t), key=t.__getitem__)
    if cuda and "bnb" in t:  # the GPU target: no slower than bitsandbytes
        ratio = tm.ratio(best, "bnb")
        rows.append(_row(f"{tag}: step time best course_lib / bitsandbytes", round(ratio, 3), "<= 1.00",
                         ratio <= 1.0, f"{best}; {ms}"))
    if "torch AdamW fused" in t:  # the moonshot: faster than fused fp32 AdamW with a quarter of its state
        ratio = tm.ratio(best, "torch AdamW fused")
        rows.append(_row(f"{tag}: step time best course_lib / torch fused AdamW", round(ratio, 3),
                         "reported (moonshot < 1)", True, ms))
    if "bnb" in t:
        rows.append(_row(f"{tag}: step time bitsandbytes / torch AdamW", round(tm.ratio("bnb", "torch AdamW"), 3),
                         "reported", True, ""))
    return rows


def run(device: str = "cpu", sizes=(1, 4, 16), rounds: int = 9, compile: bool = True,
        threads: int | None = None) -> list[dict]:
    """Rows (bench, figure, value, target, ok, detail) for every size in millions of parameters."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but torch.cuda.is_available() is False: use --device cpu")
    for s in sizes:
        if not isinstance(s, int) or s <= 0:
            raise ValueError(f"sizes must be positive ints (millions of parameters), got {s!r}")
    if dev.type == "cpu":
        env = dict(setup_cpu(threads), sync=lambda: None)
    else:
        env = dict(sync=torch.cuda.synchronize, clock="wall", note=torch.cuda.get_device_name(dev))
    bnb = _bnb()
    kinds = ["torch AdamW"] + (["torch AdamW fused"] if dev.type == "cuda" else []) + ["course eager"]
    kinds += (["course compiled"] if compile else []) + (["bnb"] if bnb else [])
    compile_info: dict = {}
    rows = []
    for s in sizes:
        rows += _bench_size(s, dev, env, rounds, kinds, bnb, compile_info)
        if "error" in compile_info and "course compiled" in kinds:
            kinds.remove("course compiled")
    if not compile:
        rows.append(_row("compiled AdamW8bit", None, "skipped", True, "--no-compile"))
    elif "first_step_s" in compile_info:
        rows.append(_row("compile warm-up (first compiled step), s", round(compile_info["first_step_s"], 1),
                         "reported", True, f"at {compile_info['first_size']}M params, excluded from step times; "
                         "later sizes reuse the dynamic-shape graph; shorter when inductor's on-disk cache is warm"))
    else:
        rows.append(_row("compiled AdamW8bit", None, "skipped", True, compile_info.get("error", "not run")))
    if bnb is None:
        rows.append(_row("bitsandbytes comparison", None, "skipped", True, "bitsandbytes is not importable"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--sizes", type=int, nargs="*", default=[1, 4, 16], help="millions of parameters")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    p.add_argument("--threads", type=int, help="CPU threads (default: 2, or 1 on a busy machine; bench/timing.py)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = run(args.device, tuple(args.sizes), args.rounds, not args.no_compile, args.threads)
    status = print_rows(rows)
    print(f"{time.perf_counter() - start:.1f} s, torch {torch.__version__}, device {args.device}")
    return status


if __name__ == "__main__":
    sys.exit(main())
