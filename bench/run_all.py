"""Run every benchmark, print each figure beside its target, and write ``bench/results.md``.

    python -m bench.run_all [--skip course memory ...] [--only lora optim8bit] [--device cpu|cuda]
                            [--output bench/results.md]

Each bench is a module in this folder with ``run() -> list[dict]`` (keys bench, figure, value, target, ok,
detail; ``memory``'s rows are converted). A bench that raises becomes one missed row with the error, and
the others still run. The markdown file starts with the machine (CPU model and cores, load average),
the versions of python, torch, peft and bitsandbytes, and the date, then one table per bench. The exit
status is 1 if any figure missed its target (the file is written anyway).
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import traceback
from datetime import datetime
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCHES = ("fit_overhead", "memory", "lora", "optim8bit", "qlora", "course", "grading")
DEVICE_BENCHES = ("lora", "optim8bit")  # take --device


def load_bench(name: str):
    """Import ``bench.<name>`` (the folder is a package: run from the repository root)."""
    return importlib.import_module(f"bench.{name}")


def _memory_row(r: dict) -> dict:
    """memory.py reports predicted vs measured bytes per (config, part): one figure per row here."""
    from course_lib.memory import human_bytes

    pred = "no predictor" if r["predicted"] is None else f"predicted {human_bytes(r['predicted'])}"
    ratio = r["ratio"]
    return dict(bench="memory", figure=f"{r['config']}: {r['part']}" + (" measured / predicted" if r["predicted"]
                is not None else (" / full" if ratio is not None else " bytes")),
                value=round(ratio, 3) if ratio is not None else human_bytes(r["measured"]), target=r["target"],
                ok=r["ok"], detail=f"{pred}, measured {human_bytes(r['measured'])}")


def normalize(rows: list[dict]) -> list[dict]:
    return [r if "figure" in r else _memory_row(r) for r in rows]


def run_bench(name: str, device: str) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    try:
        module = load_bench(name)
        rows = module.run(device=device) if name in DEVICE_BENCHES else module.run()
        rows = normalize(rows)
    except Exception as err:  # noqa: BLE001 - one broken bench must not hide the others
        tb = traceback.format_exception_only(type(err), err)[-1].strip()
        rows = [dict(bench=name, figure="bench raised", value=None, target="runs", ok=False, detail=tb[:400])]
        traceback.print_exc()
    return rows, time.perf_counter() - t0


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    """CPU model and cores (from /proc/cpuinfo where it exists), load, versions, date."""
    model, cores = platform.processor() or platform.machine(), os.cpu_count()
    try:
        info = Path("/proc/cpuinfo").read_text()
        names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
        model = names[0] if names else model
        cores = len(names) or cores
    except OSError:
        pass
    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load = "?"
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"CPU": f"{model}, {cores} cores", "GPU": gpu, "load average (1 min) at start": load,
            "python": platform.python_version(), "torch": torch.__version__, "peft": _version("peft"),
            "bitsandbytes": _version("bitsandbytes"), "date": datetime.now().strftime("%Y-%m-%d %H:%M")}


def table(rows: list[dict], markdown: bool) -> str:
    head = ["figure", "value", "target", "status"] + (["detail"] if markdown else [])
    body = [[r["figure"], fmt(r["value"]), str(r["target"]), "ok" if r["ok"] else "MISSED"]
            + ([str(r.get("detail", ""))] if markdown else []) for r in rows]
    if markdown:
        cells = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in body]
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(c[i]) for c in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [head, *body])


def write_markdown(path: Path, info: dict, results: dict, argv: list[str]) -> None:
    missed = sum(not r["ok"] for rows, _ in results.values() for r in rows)
    total = sum(len(rows) for rows, _ in results.values())
    lines = ["# Benchmark results", "",
             f"Generated by `python -m bench.run_all{' ' + ' '.join(argv) if argv else ''}` (`make bench`). "
             "Timings interleave the variants; lora and optim8bit report ratios as medians of back-to-back pairs "
             "(bench/timing.py); see each bench's docstring for the method. "
             "GPU figures: `docs/gpu.md`.", "",
             "| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", f"**{total - missed}/{total} figures on target.**", ""]
    for name, (rows, seconds) in results.items():
        lines += [f"## {name} ({seconds:.0f} s)", "", table(rows, markdown=True), ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip", nargs="*", default=[], choices=BENCHES, help="benches to leave out")
    p.add_argument("--only", nargs="*", default=[], choices=BENCHES, help="run only these benches")
    p.add_argument("--device", default="cpu", help="device for the lora and optim8bit benches (cpu or cuda)")
    p.add_argument("--output", default=str(HERE / "results.md"), help="markdown file to write")
    args = p.parse_args(argv)
    names = [b for b in BENCHES if (not args.only or b in args.only) and b not in args.skip]
    if not names:
        p.error("--only/--skip leave no bench to run")
    info = machine()
    print("  ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    results = {}
    for name in names:
        print(f"\n== {name} ...", flush=True)
        rows, seconds = run_bench(name, args.device)
        results[name] = (rows, seconds)
        print(table(rows, markdown=False), flush=True)
        print(f"({seconds:.0f} s)", flush=True)
    write_markdown(Path(args.output), info, results, argv)
    missed = [f"{r['bench']}: {r['figure']}" for rows, _ in results.values() for r in rows if not r["ok"]]
    total = sum(len(rows) for rows, _ in results.values())
    print(f"\n{total - len(missed)}/{total} figures on target; wrote {args.output}")
    for m in missed:
        print(f"  MISSED {m}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
