"""Memory benchmark: measured bytes of one real training step against course_lib's predicted bytes.

Run ``python -m bench.memory`` (add ``--markdown`` for a markdown table). For each configuration of a
TinyTransformer (d_model=256, 4 layers, batch 64 of 8x8 images) it runs one step and compares weights,
grads and optimizer state with ``predict_memory`` (target: measured / predicted within 1.00 +- 0.05).
Activations (tensors saved for backward) have no predictor: they are reported, with a target relative to
full fine-tuning for the levers that should shrink them. Exits 1 if any figure misses its target.
``run()`` returns the rows for a driver (``bench/run_all.py``).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from course_lib.freezing import unfreeze_top_k
from course_lib.lora import add_lora
from course_lib.memory import human_bytes, measure_training_step, predict_memory
from course_lib.models import PROJECTIONS, TinyTransformer
from course_lib.optim8bit import AdamW8bit

D_MODEL, N_HEADS, N_LAYERS, BATCH, SEED = 256, 4, 4, 64, 0
TOLERANCE = 0.05


def _model() -> TinyTransformer:
    torch.manual_seed(SEED)
    return TinyTransformer(d_model=D_MODEL, n_heads=N_HEADS, n_layers=N_LAYERS)


def _configs():
    """(name, model, optimizer name, step kwargs, batch size, activation target vs full: (lo, hi) or None)."""
    def full():
        return _model()

    def frozen():
        m = _model()
        unfreeze_top_k(m, 0)
        return m

    def partial():
        m = _model()
        unfreeze_top_k(m, 1)
        return m

    def lora():
        m = _model()
        add_lora(m, PROJECTIONS, r=8, alpha=16, train_modules="head")
        return m

    def checkpointed():
        return _model().set_activation_checkpointing(True)

    bf16 = {"autocast_dtype": torch.bfloat16}
    return [
        ("full AdamW", full, "adamw", {}, BATCH, None),
        ("frozen (head only)", frozen, "adamw", {}, BATCH, (0.0, 1.0)),
        ("partial (top block + head)", partial, "adamw", {}, BATCH, (0.0, 1.0)),
        ("LoRA r=8 + head", lora, "adamw", {}, BATCH, None),
        ("LoRA r=8 + head, AdamW8bit", lora, "adamw8bit", {}, BATCH, None),
        ("full AdamW8bit", full, "adamw8bit", {}, BATCH, (1.0, 1.0)),
        ("full Adafactor", full, "adafactor", {}, BATCH, (1.0, 1.0)),
        ("full + activation checkpointing", checkpointed, "adamw", {}, BATCH, (0.0, 0.5)),
        ("full, micro-batch 16 (accumulate 4)", full, "adamw", {}, BATCH // 4, (0.22, 0.28)),
        ("full, bf16 autocast", full, "adamw", bf16, BATCH, (0.0, 0.8)),
    ]


def _optimizer(name, params):
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2)
    return AdamW8bit(params, lr=1e-3)


def run() -> list[dict]:
    """One row per (configuration, part): predicted and measured bytes, ratio, target, ok."""
    g = torch.Generator().manual_seed(SEED)
    x, y = torch.rand(BATCH, 64, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    rows, full_activations = [], None
    for name, build, opt_name, step_kw, batch, act_target in _configs():
        model = build()
        start = time.perf_counter()
        measured = measure_training_step(model, _optimizer(opt_name, model.parameters()), x[:batch], y[:batch],
                                         F.cross_entropy, **step_kw)
        seconds = time.perf_counter() - start
        predicted = predict_memory(model, opt_name)
        for part in ("weights", "grads", "optimizer"):
            ratio = measured[part] / predicted[part] if predicted[part] else float(measured[part] == 0)
            rows.append(dict(bench="memory", config=name, part=part, predicted=predicted[part],
                             measured=measured[part], ratio=ratio, target=f"1.00 +- {TOLERANCE:.2f}",
                             ok=abs(ratio - 1.0) <= TOLERANCE, seconds=seconds))
        acts = measured["activations"]
        if act_target is None:
            full_activations = acts if name == "full AdamW" else full_activations
            ratio, target, ok = None, "reported", True
        else:
            lo, hi = act_target
            ratio = acts / full_activations
            target = "= full" if lo == hi else (f"< {hi:.2f} x full" if lo == 0 else f"{lo:.2f}-{hi:.2f} x full")
            ok = lo <= ratio <= hi if lo == hi else (lo <= ratio < hi)
        rows.append(dict(bench="memory", config=name, part="activations", predicted=None, measured=acts,
                         ratio=ratio, target=target, ok=bool(ok), seconds=seconds))
    return rows


def _cells(row) -> list[str]:
    ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
    pred = "" if row["predicted"] is None else human_bytes(row["predicted"])
    return [row["config"], row["part"], pred, human_bytes(row["measured"]), ratio, row["target"],
            "ok" if row["ok"] else "MISS"]


def format_table(rows, markdown: bool = False) -> str:
    head = ["config", "part", "predicted", "measured", "ratio", "target", "status"]
    body = [_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(c[i]) for c in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in [head, *body])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = run()
    print(f"TinyTransformer d_model={D_MODEL} n_layers={N_LAYERS} batch={BATCH}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print(format_table(rows, markdown=args.markdown))
    missed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(missed)}/{len(rows)} figures on target in {time.perf_counter() - start:.1f} s")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
