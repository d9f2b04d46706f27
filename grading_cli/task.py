"""One grading task: a (student, assignment) submission in, plain results out. This is what Dask runs.

It reads nothing from the course folders: the assignment (released notebooks, cell table with the
gradebook's test sources) and the learner's files arrive as arguments, and everything comes back as the
return value (scores, flags, the executed notebook, the feedback HTML). Workers therefore need no shared
file system, and only the driver ever writes the gradebook.
"""
from __future__ import annotations

import copy
import json
import time
import traceback

import nbformat

from .checks import CHECK_SECONDS, job_for, own_definitions, preamble, read_results
from .evidence import Run, Unavailable, evidence_path, notebook_parameters
from .execute import Limits, execute_notebook, probe_isolation, run_checks
from .flags import flag
from .nbmeta import CONTENT_MATCH, plain_stem
from .repair import content_score, repair
from .sanitize import clean_notebook, md_escape, to_html
from .score import apply_checks, build_exec, feedback_notebook, merge, score_cells
from .tamper import protected_names, scan_submission, shadowing_files, summary


def select(files: dict[str, bytes], nb_name: str, cells: list[dict]) -> tuple[str | None, list[dict]]:
    """Which learner file is the submission of released notebook ``nb_name`` (exact name, renamed, content)."""
    nbs = sorted((f for f in files if f.endswith(".ipynb") and ".ipynb_checkpoints" not in f),
                 key=lambda f: (f.count("/"), f))
    notes = []
    exact = [f for f in nbs if f.rsplit("/", 1)[-1] == f"{nb_name}.ipynb"]
    pick = exact[0] if exact else None
    if pick is None:
        named = [f for f in nbs if plain_stem(f) == nb_name.lower()]
        scored = []
        for f in nbs:
            try:
                scored.append((content_score(cells, nbformat.reads(files[f].decode("utf-8"), as_version=4)), f))
            except Exception:  # noqa: BLE001 - an unreadable candidate is simply not chosen
                continue
        scored.sort(reverse=True)
        if named:
            pick = named[0]
        elif scored and scored[0][0] >= CONTENT_MATCH:
            pick = scored[0][1]
        if pick:
            notes.append({"code": "renamed", "notebook": nb_name, "detail": f"graded {pick} as {nb_name}.ipynb"})
    others = [f for f in nbs if f != pick and plain_stem(f) == nb_name.lower()]
    if pick and others:
        notes.append({"code": "extra_notebooks", "notebook": nb_name, "detail": f"ignored {', '.join(others)}"})
    return pick, notes


def _header(student, assignment, nb_name, scores, flags) -> str:
    auto = sum(s["score"] for s in scores if s["score"] is not None)
    auto_max = sum(s["points"] for s in scores if s["kind"] == "test")
    manual = sum(s["points"] for s in scores if s["score"] is None)
    lines = [f"# Feedback: {assignment} / {nb_name}", f"Student: `{student}`",
             f"Autograded score: **{auto:g} / {auto_max:g}**" + (f"; {manual:g} more points graded by hand" if manual
                                                                 else "")]
    if flags:
        lines.append("Notes from the grader: " + "; ".join(f"{f['code']} ({md_escape(f['detail'])})" for f in flags))
    return "\n\n".join(lines)


def _visible(nb, by_id: dict):
    """The graded notebook as the learner may see it (released test and read-only cells): the copy in the
    kernel's working folder, which learner code can read."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        rel = by_id.get(cell.metadata.get("nbgrader", {}).get("grade_id"))
        if rel and rel["kind"] in ("test", "locked"):
            cell.source = rel["source"]
    return nb


def _run_exercise_checks(checks, cells, info, rels, by_id, files, level, options) -> tuple[dict, float]:
    """The code exercises whose visible tests passed, checked in one fresh sandboxed process: the learner's
    answer cell (by grade id), after the notebook's imports and the learner's own helper definitions."""
    released_code = {r["source"] for r in rels if r["cell_type"] == "code"}
    where = {c.metadata.get("nbgrader", {}).get("grade_id"): k for k, c in enumerate(cells)}
    rel_at = {r["grade_id"]: k for k, r in enumerate(rels) if r["grade_id"]}
    rows = []
    for test, check in checks.items():
        k_test, k_answer = where.get(test), where.get(check["answer_id"])
        if check["kind"] != "exercise" or k_test is None or info[k_test]["status"] != "ok":
            continue
        answer = cells[k_answer].source if k_answer is not None else ""
        own = [c.source for c in cells[:k_answer or 0] if c.cell_type == "code" and c.source not in released_code
               and not by_id.get(c.metadata.get("nbgrader", {}).get("grade_id"))]
        rows.append(dict(check, preamble=preamble(rels, rel_at.get(check["answer_id"], 0)), own=own_definitions(own),
                         answer=answer))
    if not rows:
        return {}, 0.0
    limits = Limits(**options.get("limits", {}))
    per = min(CHECK_SECONDS, limits.cell_timeout)
    run = run_checks(job_for(rows, per), files, level=level, limits=limits, scratch=options.get("scratch"),
                     timeout=limits.notebook_timeout + 60)
    return read_results(run["output"]), run["seconds"]


def grade_notebook(nbspec: dict, sub: dict, spec: dict, options: dict, level: str) -> dict:
    rels = nbspec["cells"]
    by_id = {r["grade_id"]: r for r in rels if r["grade_id"]}
    out = {"name": nbspec["name"], "file": None, "repairs": [], "flags": [], "events": [], "seconds": 0.0}
    blank = [{"grade_id": r["grade_id"], "kind": r["kind"], "points": float(r["points"]),
              "score": 0.0 if r["kind"] == "test" else None, "reason": "no notebook"}
             for r in rels if r["grade_id"] and r.get("points") is not None]
    pick, notes = select(sub["files"], nbspec["name"], rels)
    out["repairs"] += notes
    out["file"] = pick
    if pick is None:
        out["flags"].append({"code": "no_notebook", "notebook": nbspec["name"], "detail": "no such notebook"})
        return dict(out, cells=blank, status="unreadable")
    try:
        learner = nbformat.reads(sub["files"][pick].decode("utf-8"), as_version=4)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported, never fatal
        detail = f"{pick} is not a readable notebook ({type(err).__name__}: {str(err)[:120]})"
        out["flags"].append({"code": "unreadable", "notebook": nbspec["name"], "detail": detail})
        return dict(out, cells=blank, status="unreadable")
    cells, repairs, flags = repair(rels, learner, nbspec["name"])
    out["repairs"] += repairs
    out["flags"] += flags
    checks = (nbspec.get("checks") or {}) if options.get("checks", True) else {}  # off: hidden tests in the kernel
    exec_nb, where = build_exec(cells, by_id, options.get("params", {}), checks)
    files = {k: v for k, v in sub["files"].items() if ".ipynb_checkpoints" not in k and k != pick}
    released_code = {r["source"] for r in rels if r["cell_type"] == "code"}
    learner_code = [(None if c.source in released_code else k + 1, c.source) for k, c in enumerate(cells)
                    if c.cell_type == "code" and by_id.get(c.metadata.get("nbgrader", {}).get("grade_id"), {})
                    .get("kind") not in ("test", "locked")]
    hits = scan_submission(learner_code, files, sorted(released_code), protected_names(rels))
    if hits:
        out["flags"].append(flag("suspicious_code", nbspec["name"], summary(hits)))
    for name in shadowing_files(files):
        del files[name]
    files.update(spec["files"])
    released = nbformat.reads(nbspec["released"], as_version=4)
    graded_nb = nbformat.v4.new_notebook(metadata=released.metadata, cells=cells)
    files[f"{nbspec['name']}.ipynb"] = nbformat.writes(_visible(graded_nb, by_id)).encode()  # no hidden test
    params = notebook_parameters(cells, options.get("params", {}))  # literals, read here with ast
    wanted = {}
    for check in checks.values():
        for template in check.get("files", []) if check["kind"] == "evidence" else []:
            try:
                wanted[evidence_path(template, params)] = True
            except Unavailable:
                pass  # the check scores 0 and says why
    run = execute_notebook(exec_nb, files, level=level, limits=Limits(**options.get("limits", {})),
                           scratch=options.get("scratch"), evidence=list(wanted),
                           quiet=[k for k, (_, hidden) in enumerate(where) if hidden])
    info = merge(cells, exec_nb, where, run["statuses"], run.get("answers"))
    results, check_seconds = _run_exercise_checks(checks, cells, info, rels, by_id, files, level, options)
    apply_checks(cells, info, checks, results, Run(params, run.get("evidence", {})))
    scores = score_cells(cells, info, by_id)
    for kind, index in dict.fromkeys(run["events"]):
        detail = f"at cell {where[index][0] + 1}" if index >= 0 else ""
        if kind == "limit_exceeded":
            detail = run["kernel_log"].split("\n", 1)[0].removeprefix("sandbox: ")
        out["flags"].append(flag(kind, nbspec["name"], detail))
    graded_nb.cells = cells
    header = _header(sub["student"], sub["assignment"], nbspec["name"], scores, out["flags"])
    released_md = {r["source"] for r in rels if r["cell_type"] == "markdown"}
    feedback = feedback_notebook(cells, info, by_id, scores, header, released_md) if options.get("feedback", True) \
        else None
    graded_nb = clean_notebook(graded_nb, lambda c: c.source not in released_md)  # formgrader renders it
    return dict(out, cells=scores, status="graded", seconds=round(run["seconds"] + check_seconds, 2),
                check_seconds=check_seconds, events=run["events"],
                kernel_log=run["kernel_log"],
                autograded=nbformat.writes(graded_nb), feedback_html=to_html(feedback) if feedback else None)


def grade_one(spec: dict, sub: dict, options: dict) -> dict:
    """Grade one submission; never raises (a failure becomes status ``error`` with the reason)."""
    t0 = time.monotonic()
    result = {"student": sub["student"], "assignment": sub["assignment"], "origin": sub.get("origin", ""),
              "notebooks": [], "status": "graded", "isolation": None}
    try:
        level = probe_isolation(options.get("isolation", "auto"))
        result["isolation"] = level
        if level != "full" and not options.get("unsafe"):
            raise RuntimeError(f"this worker's sandbox is {level!r}, not 'full', and unsafe was not allowed")
        for nbspec in spec["notebooks"]:
            result["notebooks"].append(grade_notebook(nbspec, sub, spec, options, level))
        statuses = {nb["status"] for nb in result["notebooks"]}
        result["status"] = "graded" if "graded" in statuses else "unreadable"
        if level != "full":
            result["notebooks"][0]["flags"].append({"code": "isolation_degraded", "notebook": "",
                                                    "detail": f"sandbox level {level!r}"})
    except Exception:  # noqa: BLE001 - a grader bug must not stop the batch
        result.update(status="error", error=traceback.format_exc()[-2000:])
    result["seconds"] = round(time.monotonic() - t0, 2)
    return json.loads(json.dumps(result, default=str))
