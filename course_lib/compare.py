"""Comparison tables that only put comparable runs side by side.

Two runs are comparable when they used the same split (``split_hash``) and the same checkpoint rule
(metric, mode, patience). ``compare_runs`` refuses anything else with an error that names the culprit.
"""
from __future__ import annotations

import pandas as pd

__all__ = ["compare_runs", "check_comparable"]


def _as_dict(runs) -> dict:
    if isinstance(runs, dict):
        return dict(runs)
    out = {}
    for i, h in enumerate(runs):
        name = getattr(h, "name", None) or f"run{i}"
        if name in out:
            raise ValueError(f"two runs are named {name!r}: pass a dict {{name: history}} or set distinct names")
        out[name] = h
    return out


def check_comparable(runs) -> tuple[str, tuple]:
    """Return the common ``(split_hash, rule)`` or raise ``ValueError`` naming the runs that differ."""
    runs = _as_dict(runs)
    if not runs:
        raise ValueError("runs is empty: pass at least one History")
    names = list(runs)
    ref = names[0]
    for attr, what in (("split_hash", "split"), ("rule", "checkpoint rule")):
        base = getattr(runs[ref], attr, None)
        if base is None:
            raise ValueError(f"run {ref!r} has no {attr}: pass fit(..., split_hash=split.split_hash) "
                             "so the comparison can check that runs share one validation rule")
        for n in names[1:]:
            other = getattr(runs[n], attr, None)
            if other != base:
                raise ValueError(f"runs {ref!r} and {n!r} used a different {what} ({base} vs {other}): "
                                 "they are not comparable; rerun them on the same split with the same "
                                 "BestCheckpoint(metric, mode, patience)")
    return runs[ref].split_hash, runs[ref].rule


def compare_runs(runs, *, sort: bool = True) -> pd.DataFrame:
    """One row per run: best epoch and value under the shared rule, final value, parameters, state bytes, seconds.

    ``runs`` is a dict ``{name: History}`` or a list of named histories. Sorted best first when ``sort``.
    """
    runs = _as_dict(runs)
    _, rule = check_comparable(runs)
    rows = []
    for name, h in runs.items():
        row = h.summary()
        row["run"] = name
        rows.append(row)
    df = pd.DataFrame(rows).set_index("run")
    if sort:
        df = df.sort_values("best_value", ascending=rule[1] == "min", kind="stable")
    return df
