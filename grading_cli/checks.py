"""Hidden tests that learner code cannot reach or corrupt: checked outside the learner's kernel.

Three kinds of grader-side check replace a test cell's hidden part (its visible part still runs in the kernel,
and the cell scores when both pass):

``Exercise`` (a code exercise): the learner's answer cell is taken from the graded notebook by grade id and
    run in a *fresh* Python process in the sandbox, a process the learner's notebook never ran in: only the
    notebook's import statements and literal constants (read from the released notebook) and the learner's
    own helper definitions come before it, the course_lib references the exercise must not delegate to are
    replaced by functions that raise, and the answer's functions are called on the check's cases. Each case
    gives plain data (numbers, strings, tensors as dtype, shape and values) written to a file; the grader
    compares it, in its own process, with the values the instructor's solution gave for the same cases at
    release time (``python -m grading_cli release`` runs the solutions in a fresh process and stores them in
    ``<course root>/expected/<assignment>.json``, which no sandbox can see).
``Evidence`` (an answer that depends on the learner's run, e.g. the epoch a rule kept): an answers cell as
    for a ``Decision``; the expected value is computed after the run *in the grader's process*
    (``grading_cli.evidence``) from the parameters cell's literals and the files the notebook wrote, with
    course_lib's rules imported there, never in the kernel.
``Decision`` (an answer the notebook states, e.g. a bottleneck label): the hidden part is replaced by a
    cell that writes the answer variables as JSON to a file of the job folder (no test in it; used only when
    that cell ran without an error); the grader compares those values
    with the solution's values, computed at release time from the solution cell (and the read-only cells it
    names) in a fresh process. Only answers that do not depend on the learner's run are checked this way.

A test cell with no check here keeps its hidden part in the kernel (``store_history=False``), protected only
by the tamper scanner (see docs/grading.md): ``python -m grading_cli check`` lists those cells.

Cases (``grading_cli.cases``) are Python source defining ``cases(f)``: a generator of ``(label, thunk)``;
``f`` holds the answer's functions as attributes. A thunk's value is encoded by ``plain`` (below); an exception becomes
``{"raised": "ValueError"}``, so "must raise ValueError" is a case like any other. Per-course checks live in
``COURSE`` below; a course root may add or override them with a ``grader_checks.py`` defining ``CHECKS``
(the test fixtures do).
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import runpy
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .cases import (
    ADAM_STEP,
    BEST_EPOCH,
    CLIP,
    LOG_UNIFORM,
    LORA_FORWARD,
    NF4_BLOCK,
    NO_DECAY,
    QUANTIZE_BLOCK,
    RESTARTS,
    SELECT_BEST,
    SET_TRAINABLE,
    WARMUP_COSINE,
)

CHECK_SECONDS = 60  # per case, inside the check process
LOAD_SECONDS = 120  # per answer cell with the learner's own helpers and their imports
MAX_RESULT_BYTES = 20 * 2**20


@dataclass(frozen=True)
class Exercise:
    """A code exercise: ``answer`` (grade id of the answer cell) scored by test cell ``test``."""

    test: str
    answer: str
    cases: str
    forbid: tuple = ()  # "module:attr" references replaced by a raising stub before the answer runs
    rtol: float = 1e-5
    atol: float = 1e-7


@dataclass(frozen=True)
class Decision:
    """Answers ``names`` of cell ``answer``, scored by test cell ``test`` against the solution's values."""

    test: str
    answer: str
    names: tuple
    context: tuple = ()  # grade ids of read-only cells the solution's values are computed from


@dataclass(frozen=True)
class Evidence:
    """Run-dependent answers ``names`` of cell ``answer``, scored by test cell ``test`` against the values
    ``grading_cli.evidence`` rule ``rule`` computes in the grader's process from the run's evidence: the
    parameters cell's literals and ``files`` (templates like ``{out_dir}/x.csv``) the notebook wrote."""

    test: str
    answer: str
    names: tuple
    rule: str
    files: tuple = ()


def kind(check) -> str:
    return {Exercise: "exercise", Evidence: "evidence"}.get(type(check), "decision")


def fingerprint(check, solution: str) -> str:
    """Changes when the check or the solution changes: stale expected values are refused."""
    blob = json.dumps([kind(check), asdict(check), solution], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# The course's checks (solutions/NN_name: test cell grade id -> check)
# --------------------------------------------------------------------------------------------------------

COURSE: dict[str, dict[str, Exercise | Decision | Evidence]] = {
    "00_recipe_demo": {
        "n00_warmup_cosine_tests": Exercise(
            "n00_warmup_cosine_tests", "n00_warmup_cosine", WARMUP_COSINE, atol=1e-9, rtol=0.0,
            forbid=("course_lib.schedules:warmup_cosine_multiplier", "course_lib.schedules:warmup_multiplier",
                    "course_lib.schedules:make_scheduler", "course_lib.schedules:schedule_lrs")),
        "n00_decision_problem_tests": Decision("n00_decision_problem_tests", "n00_decision", ("first_problem",)),
    },
    "01_optimizers_regularization": {
        "n01_ex_adam_step_tests": Exercise(
            "n01_ex_adam_step_tests", "n01_ex_adam_step", ADAM_STEP, rtol=1e-5, atol=1e-7,
            forbid=("course_lib.scenarios.memorize:torch_adam_step",)),
        "n01_ex_no_decay_tests": Exercise(
            "n01_ex_no_decay_tests", "n01_ex_no_decay", NO_DECAY, forbid=("course_lib.freezing:param_groups",)),
        "n01_decision_bottleneck": Decision("n01_decision_bottleneck", "n01_decisions", ("memorizing_bottleneck",)),
        "n01_decision_collapsed": Decision("n01_decision_collapsed", "n01_decision_collapsed_answer",
                                           ("collapsed_optimizer",)),
    },
    "02_schedules_lr_finder": {
        "n02_ex_restarts_tests": Exercise(
            "n02_ex_restarts_tests", "n02_ex_restarts", RESTARTS, atol=1e-9, rtol=0.0,
            forbid=("course_lib.schedules:warmup_cosine_restarts_multiplier", "course_lib.schedules:make_scheduler",
                    "course_lib.schedules:schedule_lrs")),
    },
    "03_clipping_stability": {
        "n03_clip_global_norm_tests": Exercise(
            "n03_clip_global_norm_tests", "n03_clip_global_norm", CLIP, rtol=1e-5, atol=1e-7,
            forbid=("torch.nn.utils:clip_grad_norm_", "torch.nn.utils:clip_grads_with_norm_",
                    "torch.nn.utils:get_total_norm", "torch.nn.utils:clip_grad_norm",
                    "course_lib.scenarios.recipe:clip_global_norm_")),
        "n03_decision_fix_tests": Decision("n03_decision_fix_tests", "n03_decision", ("first_fix", "bottleneck")),
    },
    "05_transfer_frozen_partial": {
        "n05_set_trainable_tests": Exercise(
            "n05_set_trainable_tests", "n05_set_trainable", SET_TRAINABLE,
            forbid=("course_lib.freezing:unfreeze_top_k",)),  # freeze/unfreeze(patterns) are building blocks
    },
    "06_lora_by_hand": {
        "n06_lora_forward_tests": Exercise("n06_lora_forward_tests", "n06_lora_forward", LORA_FORWARD, rtol=1e-5,
                                           atol=1e-5),
    },
    "04_checkpoints_early_stopping": {
        "n04_ex_best_epoch_tests": Exercise(
            "n04_ex_best_epoch_tests", "n04_ex_best_epoch", BEST_EPOCH,
            forbid=("course_lib.scenarios.memorize:best_epoch_from_rows",
                    "course_lib.scenarios.memorize:stop_epoch_from_rows")),
        "n04_decision_keep": Decision("n04_decision_keep", "n04_decisions", ("keep",)),
        "n04_decision_best_epoch": Evidence("n04_decision_best_epoch", "n04_decisions", ("best_epoch",),
                                            "n04_best_epoch", ("{out_dir}/noisy_labels_history.csv",)),
        "n04_decision_stop_epoch": Evidence("n04_decision_stop_epoch", "n04_decisions", ("stop_epoch",),
                                            "n04_stop_epoch", ("{out_dir}/noisy_labels_history.csv",
                                                               "{out_dir}/patience_history.csv")),
        "n04_diagnosis_tests": Evidence("n04_diagnosis_tests", "n04_diagnosis", ("diagnosis",), "n04_diagnosis"),
    },
    "07_memory_precision": {
        "n07_quantize_block_tests": Exercise(
            "n07_quantize_block_tests", "n07_quantize_block", QUANTIZE_BLOCK, rtol=1e-6, atol=0.0,
            forbid=("course_lib.optim8bit:quantize_blockwise", "course_lib.optim8bit:dequantize_blockwise",
                    "course_lib.scenarios.memory_budget:quantize_block",
                    "course_lib.scenarios.memory_budget:dequantize_block")),
    },
    "08_hparam_search": {
        "n08_ex_log_uniform_tests": Exercise("n08_ex_log_uniform_tests", "n08_ex_log_uniform", LOG_UNIFORM),
        "n08_ex_select_best_tests": Exercise("n08_ex_select_best_tests", "n08_ex_select_best", SELECT_BEST,
                                             rtol=0.0, atol=0.0, forbid=("course_lib.search:select_best",)),
        "n08_decision_metric": Decision("n08_decision_metric", "n08_decision_metric_answer", ("selection_metric",)),
    },
    "10_qlora": {
        "n10_nf4_block_tests": Exercise(
            "n10_nf4_block_tests", "n10_nf4_block", NF4_BLOCK, rtol=0.0, atol=0.0,
            forbid=("course_lib.qlora:nf4_quantize_block", "course_lib.qlora:quantize_nf4")),
    },
}


def registry(course_root) -> dict[str, dict]:
    """COURSE, updated by ``<course root>/grader_checks.py`` (``CHECKS``) where the course has one."""
    out = {a: dict(c) for a, c in COURSE.items()}
    extra = Path(course_root) / "grader_checks.py"
    if extra.is_file():
        for a, checks in runpy.run_path(str(extra))["CHECKS"].items():
            out.setdefault(a, {}).update(checks)
    return out


# --------------------------------------------------------------------------------------------------------
# Sources: the solution, the learner's answer, the notebook's imports
# --------------------------------------------------------------------------------------------------------

def strip_markers(source: str) -> str:
    return "\n".join(ln for ln in source.split("\n") if ln.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION"))


def solution_region(source: str) -> str:
    """The lines between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` (all regions, dedented)."""
    import textwrap

    out, inside = [], False
    for line in source.split("\n"):
        if line.strip() in ("### BEGIN SOLUTION", "### END SOLUTION"):
            inside = line.strip() == "### BEGIN SOLUTION"
        elif inside:
            out.append(line)
    return textwrap.dedent("\n".join(out))


def preamble(cells: list[dict], before: int) -> str:
    """The import statements and literal constants of the released code cells before index ``before``: the
    names an answer may rely on the notebook to have defined (nothing that runs the notebook's work)."""
    from .tamper import to_python

    keep = []
    for r in cells[:before]:
        if r["cell_type"] != "code" or r["kind"] not in ("code", "locked"):
            continue
        try:
            body = ast.parse(to_python(r["source"]) or "").body
        except SyntaxError:
            continue
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                keep.append(ast.unparse(node))
            elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
                try:
                    ast.literal_eval(node.value)
                except ValueError:
                    continue
                keep.append(ast.unparse(node))
    return "\n".join(keep)


def own_definitions(sources: list[str]) -> str:
    """Top-level imports, functions and classes of the learner's own cells (helpers an answer may call)."""
    from .tamper import to_python

    keep = []
    for src in sources:
        try:
            body = ast.parse(to_python(src) or "").body
        except SyntaxError:
            continue
        keep += [ast.unparse(n) for n in body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef,
                                                                 ast.AsyncFunctionDef, ast.ClassDef))]
    return "\n\n".join(keep)


def defined_functions(solution: str) -> list[str]:
    return [n.name for n in ast.parse(solution).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


# --------------------------------------------------------------------------------------------------------
# The check process (runs learner code: inside the sandbox) and the comparison (in the grader)
# --------------------------------------------------------------------------------------------------------

RUNNER = r'''
import json, math, os, signal, sys, types
_type, _isinstance, _len, _float, _int, _str, _bool = type, isinstance, len, float, int, str, bool
_open, _sorted, _repr = open, sorted, repr
_EXC = BaseException
job = json.load(_open(sys.argv[1]))
out = _open(sys.argv[2], "w")


class _Time(BaseException):
    pass


def _alarm(*_):
    raise _Time()


signal.signal(signal.SIGALRM, _alarm)


def plain(x, depth=0):
    """Plain JSON data for a value, by exact type (a subclass is not its base)."""
    if depth > 20:
        return {"unencodable": "too deep"}
    t = _type(x)
    if x is None or t is _bool or t is _int or t is _str:
        return x
    if t is _float:
        return x if math.isfinite(x) else {"float": _repr(x)}
    if t is list or t is tuple:
        return {"tuple" if t is tuple else "list": [plain(v, depth + 1) for v in x]}
    if t is dict:
        return {"dict": [[plain(k, depth + 1), plain(v, depth + 1)] for k, v in x.items()]}
    mod = getattr(t, "__module__", "") or ""
    if mod == "numpy" and t.__name__ == "ndarray":
        return {"ndarray": _str(x.dtype), "shape": list(x.shape), "data": plain(x.ravel().tolist(), depth + 1)}
    if mod == "numpy":
        try:
            return {"numpy": t.__name__, "value": plain(x.item(), depth + 1)}
        except _EXC:
            pass
    if mod == "torch" and t.__name__ in ("Tensor", "Parameter"):
        import torch
        d = torch.Tensor.detach(x).cpu()
        return {"tensor": _str(d.dtype), "shape": list(d.shape),
                "data": plain(torch.Tensor.tolist(torch.Tensor.flatten(d)), depth + 1)}
    return {"unencodable": t.__name__}


def timed(fn, seconds):
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)


def stub(name):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"{name} is the reference this exercise asks you to write")
    return forbidden


def forbid(targets, ns):
    import importlib
    for target in targets:
        mod, attr = target.split(":")
        module = importlib.import_module(mod)
        if not hasattr(module, attr):
            continue
        ref, fake = getattr(module, attr), stub(attr)
        top = mod.split(".")[0]
        for name, m in list(sys.modules.items()):
            if m is not None and name.split(".")[0] in ("course_lib", top):
                try:
                    for k, v in list(vars(m).items()):
                        if v is ref:
                            setattr(m, k, fake)
                except _EXC:
                    pass
        for k, v in list(ns.items()):
            if v is ref:
                ns[k] = fake


for check in job["checks"]:
    res = {}
    try:
        ns = {"__name__": "__main__"}
        for line in check["preamble"].split("\n"):
            try:
                exec(compile(line, "<notebook imports>", "exec"), ns)
            except _EXC:
                pass
        forbid(check.get("forbid", []), ns)
        src = check["own"] + "\n\n" + check["answer"]
        timed(lambda: exec(compile(src, "<answer>", "exec"), ns), job.get("load_seconds", job["seconds"]))
        if check["kind"] == "exercise":
            f = types.SimpleNamespace(**{n: ns.get(n) for n in check["functions"]})
            cns = {"__name__": "grader_cases"}
            exec(compile(check["cases"], "<cases>", "exec"), cns)
            for label, thunk in cns["cases"](f):
                try:
                    res[label] = plain(timed(thunk, job["seconds"]))
                except _Time:
                    res[label] = {"raised": "TimeoutError"}
                except _EXC as err:
                    res[label] = {"raised": _type(err).__name__}
        else:
            for n in check["names"]:
                res[n] = plain(ns[n]) if n in ns else {"undefined": n}
    except _EXC as err:
        res = {"__load__": {"raised": _type(err).__name__, "detail": _str(err)[:300]}}
    out.write(json.dumps({"test": check["test"], "results": res}) + "\n")
    out.flush()
out.close()
'''


def same(got, want, rtol: float, atol: float) -> bool:
    """Plain data ``got`` equals ``want``: floats within tolerance (NaN only equals NaN), the rest exactly,
    with types kept apart (True is not 1; an int passes where a float is wanted, as the tests allowed)."""
    if isinstance(want, float) and not isinstance(want, bool):
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return False
        return abs(got - want) <= atol + rtol * abs(want)
    if isinstance(want, dict) and isinstance(got, dict):
        if set(want) != set(got):
            return False
        if "data" in want and ("tensor" in want or "ndarray" in want):
            return want.get("tensor", want.get("ndarray")) == got.get("tensor", got.get("ndarray")) and \
                want["shape"] == got["shape"] and same(got["data"], want["data"], rtol, atol)
        return all(same(got[k], want[k], rtol, atol) for k in want)
    if isinstance(want, list) and isinstance(got, list):
        return len(want) == len(got) and all(same(g, w, rtol, atol) for g, w in zip(got, want))
    return type(got) is type(want) and got == want


def compare(check: dict, results: dict | None) -> tuple[bool, str]:
    """(passed, reason) for one check: the grader's own comparison of the check process's plain output."""
    if results is None:
        return False, "the check did not finish (time limit, crash or limit)"
    if "__load__" in results:
        raised = results["__load__"].get("raised") if isinstance(results["__load__"], dict) else None
        name = raised if isinstance(raised, str) and raised.isidentifier() and len(raised) < 60 else "error"
        return False, f"the answer cell did not run on its own ({name})"
    want = check["expected"]
    for label, value in want.items():
        if label not in results:
            return False, f"no result for case {label!r}"
        if not same(results[label], value, check.get("rtol", 0.0), check.get("atol", 0.0)):
            return False, f"wrong result for case {label!r}"
    return True, ""


def read_results(data: bytes | None) -> dict[str, dict]:
    """The check process's output file (one JSON line per check; learner-controlled, so parsed defensively)."""
    out = {}
    if not data or len(data) > MAX_RESULT_BYTES:
        return out
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("test"), str) and isinstance(row.get("results"), dict):
                out.setdefault(row["test"], row["results"])
        except (ValueError, RecursionError):
            continue
    return out


def job_for(checks: list[dict], seconds: int = CHECK_SECONDS, load_seconds: int = LOAD_SECONDS) -> dict:
    """The check process's input: sources only (never the expected values). ``seconds`` bounds each case,
    ``load_seconds`` each answer cell with the learner's helpers (their imports may load torch)."""
    keep = ("test", "kind", "preamble", "own", "answer", "functions", "cases", "forbid", "names")
    return {"seconds": seconds, "load_seconds": max(seconds, load_seconds),
            "checks": [{k: c.get(k) for k in keep} for c in checks]}


# --------------------------------------------------------------------------------------------------------
# Release time: the solutions' values, in a fresh (trusted) process
# --------------------------------------------------------------------------------------------------------

def _cells_of(nb) -> list[dict]:
    from .nbmeta import kind_of

    return [{"cell_type": c.cell_type, "source": c.source, "metadata": c.metadata,
             "grade_id": c.metadata.get("nbgrader", {}).get("grade_id"),
             "kind": kind_of(c.metadata.get("nbgrader", {})) or c.cell_type} for c in nb.cells]


def solution_job(source_nb: Path, checks: dict) -> tuple[list[dict], dict, dict]:
    """The check-process input for the solution notebook, each check's fingerprint, and the checks that
    cannot run (their cells are not in the notebook): {test id: reason}."""
    import nbformat

    cells = _cells_of(nbformat.read(source_nb, as_version=4))
    index = {c["grade_id"]: k for k, c in enumerate(cells) if c["grade_id"]}
    jobs, prints, skipped = [], {}, {}
    for test, check in checks.items():
        missing = [g for g in (check.test, check.answer, *getattr(check, "context", ())) if g not in index]
        if missing:
            skipped[test] = f"no cell {', '.join(map(repr, missing))} in {source_nb.name}"
            continue
        solution = strip_markers(cells[index[check.answer]]["source"])
        prints[test] = fingerprint(check, solution)
        if isinstance(check, Evidence):  # computed after each run, in the grader's process
            continue
        row = {"test": test, "kind": kind(check), "preamble": preamble(cells, index[check.answer]), "own": "",
               "answer": solution, "forbid": list(getattr(check, "forbid", ()))}
        if isinstance(check, Exercise):
            row.update(functions=defined_functions(solution), cases=check.cases)
        else:
            context = [strip_markers(cells[index[g]]["source"]) for g in check.context]
            region = solution_region(cells[index[check.answer]]["source"])  # not the stub's `name = None`
            row.update(names=list(check.names), answer=_statements("\n".join(context + [region])))
        jobs.append(row)
    return jobs, prints, skipped


def _statements(source: str) -> str:
    """Each top-level statement on its own, errors skipped (``hist_bad`` does not exist at release time)."""
    from .tamper import to_python

    body = ast.parse(to_python(source) or "").body
    return "\n".join(f"try:\n    exec({ast.unparse(n)!r})\nexcept Exception:\n    pass" for n in body)


def run_trusted(job: dict, timeout: int = 900) -> dict[str, dict]:
    """Run the check process on instructor code (release time): no sandbox, the kernels' environment."""
    from course_lib.runtime import KERNEL_ENV

    with tempfile.TemporaryDirectory(prefix="grading-release-") as tmp:
        (Path(tmp) / "in.json").write_text(json.dumps(job))
        env = {**os.environ, **KERNEL_ENV, "COURSE_FAST": "1", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(Path(tmp) / "in.json"), str(Path(tmp) / "out.json")],
                              cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"the check process failed on the solutions:\n{proc.stderr[-3000:]}")
        return read_results((Path(tmp) / "out.json").read_bytes())


def compute_expected(course, assignment: str, warn=print) -> Path | None:
    """``<course root>/expected/<assignment>.json``: every check's expected values from the solutions.

    A check that cannot be computed (its cells are gone, the solution raises, or a decision's value needs
    the notebook's run) is stored as skipped with the reason and warned about: its test cell then keeps its
    hidden part in the kernel, and ``python -m grading_cli check`` lists it."""
    import nbformat

    checks = registry(course.root).get(assignment)
    path = course.root / "expected" / f"{assignment}.json"
    if not checks:
        path.unlink(missing_ok=True)
        return None
    stored = {}
    for nb_path in sorted((course.source / assignment).glob("*.ipynb")):
        ids = {c.metadata.get("nbgrader", {}).get("grade_id") for c in nbformat.read(nb_path, as_version=4).cells}
        mine = {t: c for t, c in checks.items() if t in ids}
        if not mine:
            continue
        jobs, prints, skipped = solution_job(nb_path, mine)
        stored.update({t: {"skipped": why} for t, why in skipped.items()})
        stored.update({t: {"fingerprint": prints[t], "expected": {}} for t, c in mine.items()
                       if isinstance(c, Evidence) and t in prints})
        try:
            results = run_trusted(job_for(jobs)) if jobs else {}
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:  # a release never stops on a check
            results = {row["test"]: {"__load__": {"raised": type(err).__name__, "detail": str(err)[-300:]}}
                       for row in jobs}
        for row in jobs:
            got = results.get(row["test"])
            why = None
            if got is None or "__load__" in got:
                why = f"the solution did not run: {got}"
            elif row["kind"] == "decision":
                missing = [n for n in row["names"] if got.get(n) is None or (isinstance(got[n], dict)
                                                                           and "undefined" in got[n])]
                if missing:
                    why = f"the solution gives {', '.join(missing)} only from the notebook's run (not a fixed answer)"
            stored[row["test"]] = {"skipped": why} if why else {"fingerprint": prints[row["test"]], "expected": got}
    for test in sorted(set(checks) - set(stored)):
        stored[test] = {"skipped": f"no test cell {test!r} in {assignment}"}
    for test, entry in sorted(stored.items()):
        if "skipped" in entry:
            warn(f"warning: {assignment}: check {test!r} skipped ({entry['skipped']}); its hidden tests run in the "
                 "kernel")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=1, sort_keys=True))
    return path


def load_expected(course, assignment: str, source_nb: Path) -> dict[str, dict]:
    """The checks of one notebook, for the worker: {test id: check data with its ``expected`` values}."""
    import nbformat

    checks = registry(course.root).get(assignment, {})
    if not checks or not source_nb.is_file():
        return {}
    index = {c["grade_id"]: c for c in _cells_of(nbformat.read(source_nb, as_version=4)) if c["grade_id"]}
    mine = {t: c for t, c in checks.items() if t in index}
    if not mine:
        return {}
    path = course.root / "expected" / f"{assignment}.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    out = {}
    for test, check in mine.items():
        if "skipped" in stored.get(test, {}):
            continue  # its hidden part runs in the kernel (release warned; `check` lists it)
        solution = strip_markers(index[check.answer]["source"]) if check.answer in index else ""
        if stored.get(test, {}).get("fingerprint") != fingerprint(check, solution):
            raise ValueError(f"{assignment}: the expected values of {test!r} are missing or older than the check "
                             "or the solution: run `make release` (python -m grading_cli release)")
        row = {"test": test, "kind": kind(check), "answer_id": check.answer, "expected": stored[test]["expected"],
               "forbid": list(getattr(check, "forbid", ()))}
        if isinstance(check, Exercise):
            row.update(cases=check.cases, functions=defined_functions(solution), rtol=check.rtol, atol=check.atol)
        elif isinstance(check, Evidence):
            row.update(names=list(check.names), rule=check.rule, files=list(check.files), rtol=1e-9, atol=0.0)
        else:
            row.update(names=list(check.names), rtol=1e-9, atol=0.0)
        out[test] = row
    return out


ANSWERS_DIR = ".grading_answers"


def answers_file(test: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", test)[:100] + ".json"


def answers_cell(names: list[str], test: str) -> str:
    """The cell that replaces a decision's hidden test in the kernel: it writes the answers as JSON to a file
    of the job folder (read back by the grader after the run), tests nothing and prints nothing."""
    pairs = ", ".join(f"{n!r}: globals().get({n!r}, None)" for n in names)
    return ("import json as _grading_json, os as _grading_os\n"
            f"_grading_d = _grading_os.environ.get('GRADING_ANSWERS', {ANSWERS_DIR!r})\n"
            "_grading_os.makedirs(_grading_d, exist_ok=True)\n"
            f"with open(_grading_os.path.join(_grading_d, {answers_file(test)!r}), 'w') as _grading_f:\n"
            f"    _grading_f.write(_grading_json.dumps({{{pairs}}}, default=repr))\n"
            "del _grading_json, _grading_os, _grading_f, _grading_d")


def parse_answers(data: bytes | None) -> dict | None:
    """The answers file one decision's cell wrote (learner-controlled: parsed defensively)."""
    if not data:
        return None
    try:
        got = json.loads(data.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    return got if isinstance(got, dict) else None


def decision_plain(value):
    """The answers cell's JSON value in the encoding of ``plain`` (the solution's values at release)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, list):
        return {"list": [decision_plain(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[k, decision_plain(v)] for k, v in value.items()]}
    return value
