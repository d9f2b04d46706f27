"""Split test cells into visible and hidden parts, score grade cells, and build feedback without hidden tests.

Scoring rule (the same for every test cell): full points when every part of the cell ran without an error
output, else 0. Stderr (warnings, logging, progress bars) never counts, and a value the cell ends with is
never read as partial credit. Hidden tests run as their own cell right after the visible ones, so that
feedback can show the visible part's real output and only "hidden tests: passed/failed" for the rest.
"""
from __future__ import annotations

import copy
import re

import nbformat

from .checks import answers_cell, answers_file, compare, decision_plain, parse_answers
from .sanitize import clean_notebook, md_escape

BEGIN, END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
WORST = ["ok", "error", "timeout", "died", "not_run"]
def split_hidden(source: str) -> list[tuple[bool, str]]:
    """[(hidden, code), ...] in order; markers removed. Falls back to one hidden part if a split would not parse."""
    parts, hidden, buf = [], False, []
    for line in source.split("\n"):
        if line.strip() in (BEGIN, END):
            parts.append((hidden, "\n".join(buf)))
            hidden, buf = line.strip() == BEGIN, []
        else:
            buf.append(line)
    parts.append((hidden, "\n".join(buf)))
    parts = [(h, code) for h, code in parts if code.strip()]
    if not any(h for h, _ in parts):
        return parts or [(False, source)]
    try:
        for _, code in parts:
            compile(code, "<test>", "exec")
    except SyntaxError:
        return [(True, source)]
    return parts


def hidden_lines(source: str) -> set[str]:
    return {ln.strip() for h, code in split_hidden(source) if h for ln in code.split("\n") if len(ln.strip()) >= 6}


def parameters_cell(released_source: str, values: dict) -> str | None:
    """Assignments for the names the released parameters cell defines (papermill-style injection)."""
    lines = [f"{k} = {v!r}" for k, v in values.items() if re.search(rf"^{re.escape(k)}\s*=", released_source, re.M)]
    return "# Parameters injected by the grader\n" + "\n".join(lines) if lines else None


def build_exec(cells: list, rels_by_id: dict, params: dict, checks: dict | None = None):
    """The notebook that actually runs, and for each of its cells (repaired index, part): part is False
    (visible), True (a hidden part run in the kernel) or ``"answers"`` (the cell printing a decision's answers).

    A test cell with a grader-side check (``checks``, see ``grading_cli.checks``) sends only its visible
    part to the kernel: its hidden part is never in the kernel, in any form."""
    nb = nbformat.v4.new_notebook()
    where: list[tuple[int, bool | str]] = []
    checks = checks or {}
    for i, cell in enumerate(cells):
        meta = cell.metadata.get("nbgrader", {})
        rel = rels_by_id.get(meta.get("grade_id"))
        if cell.cell_type == "code" and rel and rel["kind"] == "test":
            check = checks.get(rel["grade_id"])
            parts = [(h, code) for h, code in split_hidden(cell.source) if not (check and h)]
            for hidden, code in parts or [(False, "pass  # every test of this cell is checked by the grader")]:
                nb.cells.append(nbformat.v4.new_code_cell(code))
                where.append((i, hidden))
            if check and check["kind"] in ("decision", "evidence"):
                nb.cells.append(nbformat.v4.new_code_cell(answers_cell(check["names"], rel["grade_id"])))
                where.append((i, "answers"))
        else:
            nb.cells.append(copy.deepcopy(cell))
            where.append((i, False))
        if "parameters" in cell.metadata.get("tags", []) and params:
            injected = parameters_cell(cell.source, params)
            if injected:
                nb.cells.append(nbformat.v4.new_code_cell(injected))
                where.append((-1, False))
    return nb, where


def merge(cells: list, exec_nb, where: list, statuses: list, answers: dict | None = None) -> list[dict]:
    """Copy outputs back onto ``cells``; return per repaired cell {status, visible, hidden} statuses/outputs.
    ``answers``: the files the decisions' answers cells wrote (``{file name: bytes}``, see ``checks``)."""
    info = [{"status": None, "hidden": None, "visible_outputs": [], "hidden_error": None, "answers": None}
            for _ in cells]
    for (i, hidden), ecell, status in zip(where, exec_nb.cells, statuses):
        if i < 0 or ecell.cell_type != "code":
            continue
        cell, rec = cells[i], info[i]
        if hidden == "answers":  # read by the grader, never shown, never scored by its own status
            gid = cell.metadata.get("nbgrader", {}).get("grade_id", "")  # only a file this run's cell wrote:
            ran = (status or "ok") == "ok"  # a cell that failed (e.g. a read-only file planted) left a stale one
            rec["answers"] = parse_answers((answers or {}).get(answers_file(gid))) if ran else None
            continue
        cell.outputs = list(cell.get("outputs", [])) + list(ecell.outputs)
        cell.execution_count = ecell.get("execution_count")
        status = status or "ok"
        rec["status"] = status if rec["status"] is None else max(rec["status"], status, key=WORST.index)
        errors = [o for o in ecell.outputs if o.output_type == "error"]
        if hidden:
            rec["hidden"] = status if rec["hidden"] is None else max(rec["hidden"], status, key=WORST.index)
            if errors and not rec["hidden_error"]:
                rec["hidden_error"] = errors[0].ename
        else:
            rec["visible_outputs"].extend(ecell.outputs)
    return info


def apply_checks(cells: list, info: list, checks: dict, results: dict, run=None) -> None:
    """Score each grader-side check in this process and record it as the cell's hidden verdict: exercises
    from the check process's plain ``results``, decisions from the answers their cell wrote, run-dependent
    answers against the values ``grading_cli.evidence`` computes here from ``run`` (an ``evidence.Run``)."""
    for cell, rec in zip(cells, info):
        check = checks.get(cell.metadata.get("nbgrader", {}).get("grade_id"))
        if not check or rec["status"] is None:
            continue
        if check["kind"] == "exercise":
            ok, why = compare(check, results.get(check["test"]))
        elif check["kind"] == "evidence":
            ok, why = _compare_evidence(check, rec["answers"], run)
        else:
            got = rec["answers"]
            plain = None if got is None else {n: decision_plain(got.get(n)) for n in check["names"]}
            ok, why = compare(check, plain)
            if got is None:
                why = "the answers could not be read"
        rec["hidden"] = "ok" if ok else "error"
        rec["hidden_error"] = None if ok else f"checked by the grader: {why}"
        if not ok and rec["status"] == "ok":
            rec["status"] = "error"


def _compare_evidence(check: dict, got: dict | None, run) -> tuple[bool, str]:
    """The answers against the expected values computed now, in this process, from the run's evidence."""
    from .evidence import Run, Unavailable, expected_for

    if got is None:
        return False, "the answers could not be read"
    try:
        want = expected_for(check["rule"], run if run is not None else Run())
    except Unavailable as err:
        return False, f"no evidence for the expected value: {err}"
    ordered = {n: dict(sorted(v.items())) if isinstance(v, dict) and all(isinstance(k, str) for k in v) else v
               for n, v in ((n, got.get(n)) for n in check["names"])}
    plain = {n: decision_plain(v) for n, v in ordered.items()}
    return compare(dict(check, expected={n: decision_plain(want.get(n)) for n in check["names"]}), plain)


def reason(rec: dict, cell) -> str:
    status = rec["status"] or "not_run"
    if status == "ok":
        return ""
    if status in ("not_run", "died", "timeout"):
        return {"not_run": "not run (the kernel stopped earlier)", "died": "the kernel died in this cell",
                "timeout": "time limit"}[status]
    visible = [o for o in rec["visible_outputs"] if o.output_type == "error"]
    if visible:
        return f"{visible[0].ename}: {visible[0].evalue}"[:200]
    return f"hidden tests failed ({rec['hidden_error'] or 'error'})"


def score_cells(cells: list, info: list, rels_by_id: dict) -> list[dict]:
    out = []
    for cell, rec in zip(cells, info):
        rel = rels_by_id.get(cell.metadata.get("nbgrader", {}).get("grade_id"))
        if not rel or rel.get("points") is None:
            continue
        row = {"grade_id": rel["grade_id"], "kind": rel["kind"], "points": float(rel["points"])}
        if rel["kind"] == "test":
            ok = rec["status"] == "ok"
            row.update(score=row["points"] if ok else 0.0, reason="" if ok else reason(rec, cell))
        else:
            row.update(score=None, reason="graded by hand")
        out.append(row)
    return out


def feedback_notebook(cells: list, info: list, rels_by_id: dict, scores: list[dict], header: str,
                      released_markdown=frozenset()):
    """The learner's view: visible test source and output only, a score under each graded cell, redacted and
    made inert (``sanitize``: learner markdown other than ``released_markdown`` is escaped)."""
    secret = set()
    for rel in rels_by_id.values():
        if rel["kind"] in ("test", "locked"):
            secret |= hidden_lines(rel["full"])
    by_id = {s["grade_id"]: s for s in scores}
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(header, metadata={"grading_cli": True}))
    for cell, rec in zip(cells, info):
        new = copy.deepcopy(cell)
        rel = rels_by_id.get(cell.metadata.get("nbgrader", {}).get("grade_id"))
        if rel and rel["kind"] in ("test", "locked"):
            new.source = rel["source"]
        if rel and rel["kind"] == "test":
            new.outputs = copy.deepcopy(rec["visible_outputs"])
            if rec["hidden"] is not None:
                verdict = "passed" if rec["hidden"] == "ok" else f"failed ({rec['hidden_error'] or rec['hidden']})"
                new.outputs.append(nbformat.v4.new_output("stream", name="stdout", text=f"Hidden tests: {verdict}\n"))
        if new.cell_type == "code":
            new.outputs = [_redact(o, secret) for o in new.outputs]
        nb.cells.append(new)
        s = by_id.get(rel["grade_id"]) if rel else None
        if s:
            got = "graded by your instructor" if s["score"] is None else f"{s['score']:g} / {s['points']:g}"
            text = f"**Score ({s['grade_id']}): {got}**" + (f" &nbsp; {md_escape(s['reason'])}" if s["score"] == 0
                                                             else "")
            nb.cells.append(nbformat.v4.new_markdown_cell(text, metadata={"grading_cli": True}))
    return clean_notebook(nb, lambda c: not c.metadata.get("grading_cli") and c.source not in released_markdown)


def _redact(output, secret: set):
    text = output.get("text", "") + "\n".join(output.get("traceback", []))
    text += "".join(v if isinstance(v, str) else "".join(v) for v in output.get("data", {}).values()
                    if isinstance(v, (str, list)))
    if any(line in text for line in secret):
        return nbformat.v4.new_output("stream", name="stdout", text="[output hidden: it showed hidden test code]\n")
    return output
