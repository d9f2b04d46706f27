"""Timing helpers shared by the benches: thread policy, clock, interleaved variants and paired ratios.

On a CPU shared with other jobs, two intra-op threads make timings unusable: when the load average is
above the core count, one of the two threads is often descheduled and the other spins at every barrier,
so the same forward pass varied 1.4x between identical models here (2 threads, load 15 on 2 cores),
while one thread measured with process CPU time stayed within 2%. So: 2 threads on an idle machine
(wall-clock time), 1 thread with CPU time on a busy one (it counts only the time the thread really ran).
``BENCH_THREADS=1|2`` forces the thread count; the choice is reported with every figure. Ratios are
medians of back-to-back pairs (``Timings.ratio``), absolute times are minimums over rounds.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

DEFAULT_THREADS = 2


def machine_load() -> float:
    """1-minute load average (0.0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def setup_cpu(threads: int | None = None) -> dict:
    """Set torch's intra-op threads and pick the clock; returns ``{threads, clock, load, note}``.

    ``threads`` (or ``$BENCH_THREADS``) forces the count; otherwise 2 when the load average is below the
    core count, else 1. One thread is timed with ``time.process_time`` (CPU seconds), more with wall time.
    """
    load, cores = machine_load(), os.cpu_count() or 1
    env = os.environ.get("BENCH_THREADS", "")
    if threads is None and env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"BENCH_THREADS must be a positive integer, got {env!r}")
        threads = int(env)
    busy = load > cores
    if threads is None:
        threads = 1 if busy else min(DEFAULT_THREADS, cores)
    torch.set_num_threads(threads)
    clock = "cpu" if threads == 1 else "wall"
    note = f"{threads} thread{'s' * (threads > 1)}, {clock} clock, load {load:.1f} on {cores} cores"
    return {"threads": threads, "clock": clock, "load": load, "note": note}


class Timings:
    """Seconds per call of each variant, one sample per round: ``best[name]`` (the minimum) and
    ``ratio(a, b)``: the median over rounds of ``a / b`` measured back to back in the same round.

    The paired median is what the benches report as a ratio: a drift in machine load between rounds
    cancels out in each pair, and an interrupted sample is an outlier the median ignores (two identical
    models measured 0.985-1.000 by ratio of minimums and 0.999-1.010 by paired median here, under load).
    """

    def __init__(self, samples: dict[str, list[float]]):
        self.samples = samples
        self.best = {k: min(v) for k, v in samples.items()}

    def ratio(self, a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(self.samples[a], self.samples[b]))


def interleaved(fns: dict, rounds: int, iters: int = 1, sync=None, clock: str = "wall", warmup: int = 2) -> Timings:
    """Time each function in ``fns``: ``rounds`` rounds, each calling every variant ``iters`` times in a row.

    The order of the variants rotates from round to round, so a burst of load elsewhere hits all of them
    alike. ``warmup`` untimed calls each first. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before
    reading the clock. ``clock``: "wall" (``time.perf_counter``) or "cpu" (``time.process_time``).
    """
    if rounds < 1 or iters < 1:
        raise ValueError(f"rounds and iters must be >= 1, got rounds={rounds}, iters={iters}")
    now = time.process_time if clock == "cpu" else time.perf_counter
    sync = sync or (lambda: None)
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = now()
            for _ in range(iters):
                fns[name]()
            sync()
            samples[name].append((now() - t0) / iters)
    return Timings(samples)


def print_rows(rows: list[dict]) -> int:
    """Print each figure with its target; return the exit status (1 if any target is missed)."""
    for r in rows:
        print(f"{r['figure']}: {r['value']} (target {r['target']}) {'OK' if r['ok'] else 'MISSED'}  [{r['detail']}]")
    return 0 if all(r["ok"] for r in rows) else 1
