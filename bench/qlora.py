"""QLoRA benchmark: course_lib's 4-bit base layer against bitsandbytes' CPU Linear4bit and the fp32 Linear.

One ``width x width`` Linear (``--width``, default 2048) on a batch of ``--tokens`` (default 256) rows, fp32
activations. Variants: ``fp32`` (``nn.Linear``), ``course`` (``qlora.Linear4bit``: NF4, blocks of 64, double
quantization, dequantized in torch ops every forward), ``bnb`` (``bitsandbytes.nn.Linear4bit`` with the same
format, ``compute_dtype=float32``). Figures: forward time course / fp32 and course / bnb (reported; the
4-bit forward pays a dequantization per call), one QLoRA training step (LoRA r=8 on the layer, forward +
backward) on the 4-bit vs the fp32 base (not on bitsandbytes' layer: its ``weight`` is the packed uint8
storage, so ``LoRALinear`` cannot take its dtype from it), the largest output difference course vs bnb
(target 0: the same bits), and the bytes of the 4-bit weight measured against the format's prediction
(target within 5%) and against fp32, bf16 and blockwise 8-bit. The variants are interleaved; ratios are
medians of back-to-back pairs (bench/timing.py).

    python -m bench.qlora [--width 2048] [--tokens 256] [--rounds 10] [--threads N]

bitsandbytes is optional: without it the bnb rows say "skipped". ``run()`` returns the rows for bench/run_all.py.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from bench.timing import interleaved, print_rows, setup_cpu
from course_lib.lora import LoRALinear
from course_lib.qlora import Linear4bit, nf4_nbytes, predicted_bits_per_param

SEED, R, ALPHA, BYTES_TOL = 0, 8, 16, 0.05


def _row(figure, value, target, ok, detail=""):
    return {"bench": "qlora", "figure": figure, "value": value, "target": target, "ok": bool(ok), "detail": detail}


def _bnb_layer(lin: nn.Linear):
    """bitsandbytes' Linear4bit holding ``lin``'s weight in NF4 (double quantization, blocks of 64), or None."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(data=lin.weight.detach().clone(), requires_grad=False, blocksize=64,
                                     compress_statistics=True, quant_type="nf4")
    layer.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")  # quantizes


def _forward(layer, x):
    def fn():
        with torch.no_grad():
            layer(x)
    return fn


def _train_step(base, x, g):
    torch.manual_seed(SEED)
    model = LoRALinear(base, r=R, alpha=ALPHA)
    params = [model.lora_A, model.lora_B]

    def fn():
        for p in params:
            p.grad = None
        model(x).backward(g)
    return fn


def run(width: int = 2048, tokens: int = 256, rounds: int = 10, threads: int | None = None) -> list[dict]:
    """Rows (bench, figure, value, target, ok, detail)."""
    if width < 64 or width % 64:
        raise ValueError(f"width must be a multiple of 64 (>= 64), got {width}")
    env = setup_cpu(threads)
    torch.manual_seed(SEED)
    lin = nn.Linear(width, width)
    x = torch.randn(tokens, width)
    g = torch.randn(tokens, width) / tokens
    course = Linear4bit(lin)
    bnb_layer = _bnb_layer(lin)
    n = width * width
    rows = []

    # bytes: measured vs the format's prediction, and vs the other precisions
    measured = course.nbytes
    predicted = predicted_bits_per_param() * n / 8
    rows.append(_row("4-bit weight bytes measured / predicted (4.127 bits)", round(measured / predicted, 4),
                     f"1.00 +- {BYTES_TOL:.2f}", abs(measured / predicted - 1) <= BYTES_TOL,
                     f"{measured:,} B measured = nf4_nbytes {nf4_nbytes(n):,} B; {predicted:,.0f} B predicted; "
                     f"{8 * measured / n:.4f} bits/param"))
    for name, other in (("fp32", 4 * n), ("bf16", 2 * n), ("blockwise 8-bit", n + 4 * -(-n // 256))):
        rows.append(_row(f"4-bit weight bytes / {name}", round(measured / other, 4), "reported", True, f"{other:,} B"))

    fwd = {"fp32": _forward(lin, x), "course": _forward(course, x)}
    step = {"fp32": _train_step(nn.Linear(width, width), x, g), "course": _train_step(Linear4bit(lin), x, g)}
    if bnb_layer is not None:
        with torch.no_grad():
            diff = float((course(x) - bnb_layer(x)).abs().max())
        rows.append(_row("max |course - bitsandbytes| forward output", diff, "0 (same bits)", diff == 0.0,
                         f"{width}x{width} weight, {tokens} tokens, fp32"))
        fwd["bnb"] = _forward(bnb_layer, x)
    tf = interleaved(fwd, rounds, 3, None, env["clock"])
    ms = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in tf.best.items())
    rows.append(_row("forward 4-bit course_lib / fp32 Linear", round(tf.ratio("course", "fp32"), 3), "reported", True,
                     f"median of {rounds} paired rounds of 3; best: {ms} ({env['note']})"))
    if "bnb" in fwd:
        rows.append(_row("forward 4-bit course_lib / bitsandbytes Linear4bit", round(tf.ratio("course", "bnb"), 3),
                         "reported", True, "bitsandbytes' CPU path: dequantize, then a dense matmul"))
        rows.append(_row("forward bitsandbytes Linear4bit / fp32 Linear", round(tf.ratio("bnb", "fp32"), 3),
                         "reported", True, ""))
    else:
        rows.append(_row("bitsandbytes comparison", None, "skipped", True, "bitsandbytes is not installed"))
    ts = interleaved(step, rounds, 2, None, env["clock"])
    ms = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in ts.best.items())
    rows.append(_row("LoRA step (fwd + bwd) on 4-bit base / on fp32 base", round(ts.ratio("course", "fp32"), 3),
                     "reported", True, f"r={R}; best: {ms}"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, help="CPU threads (default: 2, or 1 on a busy machine; bench/timing.py)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = run(args.width, args.tokens, args.rounds, args.threads)
    status = print_rows(rows)
    print(f"{time.perf_counter() - start:.1f} s, torch {torch.__version__}")
    return status


if __name__ == "__main__":
    sys.exit(main())
