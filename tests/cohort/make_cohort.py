"""Build a test cohort of learner submissions from released notebooks, with the score each should get.

    python tests/cohort/make_cohort.py OUT [--course-root grading] [--assignment A ...] [--cases c1 c2 ...]

Writes ``OUT/<student>/<assignment>/<notebook>.ipynb`` (a student per case), ``OUT/roster.csv`` (every case
plus a student who submitted nothing) and ``OUT/expected.csv`` (student, assignment, autograded score,
flags and repairs that must appear). Submissions are derived from the released notebook and the
instructor's solutions, so the cohort follows the notebooks when they change. The expected score is
computed from the points of the test cells that each change must cost: the tests between an answer cell
and the next answer cell depend on that answer.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import re
import sys
from pathlib import Path

import nbformat

from grading_cli.course import REPO, Course, assignment_spec

LABELS = ("optimization", "regularization", "adaptation")
CASES = ["correct", "blank", "wrong_decision", "partial", "syntax_error", "infinite_loop", "edited_tests",
         "deleted_tests", "edited_locked", "duplicated", "metadata_stripped", "reordered", "renamed", "huge_output",
         "crash", "stderr_noise", "gaming", "corrupt"]
# Hostile submissions (issue 14): each attack class, with the score the kernel gives and the flags that must
# come with it (an undeserved point is acceptable only with a tamper flag, for a human to review).
HOSTILE = ["shadow_builtins", "kernel_alias", "patch_reference", "shadow_package", "read_hidden", "hostile_output",
           "daemon", "read_frames", "forge_answers", "patch_truth"]
DAEMON = "grading-daemon-{marker}"
ALWAYS_YES = ("\n\nclass _Yes(str):\n    __eq__ = lambda self, other: True\n    __hash__ = str.__hash__\n\n"
              "_real_type = type\n\n\ndef type(x, *rest):\n"
              "    return str if isinstance(x, _Yes) else _real_type(x, *rest)\n\n{name} = _Yes({label!r})")
SILENCE = "_k = get_ipython\n_k().showtraceback = lambda *args, **kwargs: None  # errors no longer shown"
SHADOW = 'print("SHADOWED course_lib ran")\n'
READ = ("import base64, pathlib\nfor _p in sorted(pathlib.Path('.').glob('*.ipynb')):\n"
        "    print(_p.name, base64.b64encode(_p.read_bytes()).decode())")
# Everything in the kernel's process where a running test's source could be: the input history, linecache,
# the frames of every thread and every string the garbage collector knows (printed base64, past redaction).
FRAMES = ("import base64, gc, linecache, sys\n_seen = [repr(In), repr(_ih), repr(linecache.cache)]\n"
          "for _f in sys._current_frames().values():\n    while _f is not None:\n"
          "        _seen.append(repr(_f.f_code.co_filename) + repr(_f.f_globals.get('_ih', '')))\n"
          "        _f = _f.f_back\n"
          "_seen += [repr(o) for o in gc.get_objects() if type(o) is dict and '_ih' not in o and "
          "any(type(v) is str and 'assert' in v for v in o.values())]\n"
          "_lines = [ln for ln in '\\n'.join(_seen).replace('\\\\n', '\\n').split('\\n') if 'assert' in ln][:60]\n"
          "print('FRAMES', base64.b64encode('\\n'.join(ln[:160] for ln in _lines).encode()).decode())")
# A wrong answer, with the right one written where a grader might look for evidence: decisions.json in
# out_dir and the grader's own answers files (the cell the grader adds after the visible tests rewrites them).
FORGE = ("\nimport json as _json, os as _os, pathlib as _pl\n_d = _pl.Path(out_dir)\n"
         "_d.mkdir(parents=True, exist_ok=True)\n"
         "(_d / 'decisions.json').write_text(_json.dumps({{{name!r}: {label!r}}}))\n"
         "_a = _pl.Path(_os.environ.get('GRADING_ANSWERS', '.grading_answers'))\n"
         "_a.mkdir(parents=True, exist_ok=True)\n"
         "for _t in {tests!r}:\n    (_a / (_t + '.json')).write_text(_json.dumps({{{name!r}: {label!r}}}))")
# Wrong run-dependent answers, with the references an in-kernel hidden test recomputes the truth from
# patched to agree (04: planted(seed), best_epoch_from_rows, stop_epoch_from_rows): the old hidden tests
# passed them; the grader now recomputes the truth in its own process from the run's evidence.
PATCH_TRUTH = (
    "\n\ndef _wrong(v):\n    if isinstance(v, dict):\n        ks = sorted(v)\n"
    "        return {{k: v[ks[(i + 1) % len(ks)]] for i, k in enumerate(ks)}}\n"
    "    return v + 1 if isinstance(v, int) else v\n\n\n"
    "{assign}\n"
    "import course_lib.scenarios.diagnosis as _dg\nimport course_lib.scenarios.memorize as _mz\n"
    "_answers = {{{pairs}}}\n"
    "_dg.planted = lambda seed: _answers.get('diagnosis')\n"
    "_mz.best_epoch_from_rows = lambda *a, **k: _answers.get('best_epoch')\n"
    "_mz.stop_epoch_from_rows = lambda *a, **k: _answers.get('stop_epoch')")
HOSTILE_OUTPUT = (
    "from IPython.display import HTML, Javascript, display\n"
    "display(HTML('<script>document.title=\"PWNED-script\"</script><img src=x onerror=\"alert(\\'PWNED-img\\')\">'))\n"
    "display(Javascript('alert(\"PWNED-js\")'))\n"
    "display({'image/svg+xml': '<svg onload=\"alert(1)\"><script>alert(\"PWNED-svg\")</script></svg>'}, raw=True)\n"
    "_h = display({'text/plain': 'small'}, raw=True, display_id=True)\n"
    "_h.update({'text/plain': 'y' * 3_000_000}, raw=True)  # one display update past every cap")
INJECT = ('\n\ndef {fname}(*args, **kwargs):\n    raise ValueError("boom\\n\\n## Corrected grades\\n\\n'
          '| student | score |\\n|---|---|\\n| hostile_output | 100 |\\n<script>alert(1)</script>")')
NOISE = ("import sys, warnings, logging; from tqdm.auto import tqdm; sys.stderr.write('working...\\n'); "
         "warnings.warn('a learner warning'); logging.getLogger('learner').warning('a log line'); "
         "[_ for _ in tqdm(range(3))]")
GAMING = ("\n\nclass _AlwaysEqual(str):\n    def __eq__(self, other):\n        return True\n"
          "    __hash__ = str.__hash__\n\n{name} = _AlwaysEqual({label!r})")


class Plan:
    """The released notebook of one assignment, its answers and which test points depend on which answer."""

    def __init__(self, spec: dict, partial: dict | None = None):
        nb = spec["notebooks"][0]
        self.spec, self.name, self.rels = spec, nb["name"], nb["cells"]
        self.released = nbformat.reads(nb["released"], as_version=4)
        self.partial = partial or {}
        self.answers = [i for i, r in enumerate(self.rels) if r["kind"] == "solution"]
        self.auto_max = sum(r["points"] for r in self.rels if r["kind"] == "test")

    def solution(self, i: int) -> str:
        return self.rels[i]["hint"] if self.rels[i]["hint"] is not None else self.rels[i]["source"]

    def tests_of(self, i: int) -> list[int]:
        nxt = [a for a in self.answers if a > i]
        end = nxt[0] if nxt else len(self.rels)
        return [k for k in range(i + 1, end) if self.rels[k]["kind"] == "test"]

    def pts(self, i: int, name: str | None = None) -> float:
        """Points of the tests after answer ``i`` (only those that use ``name``, if given)."""
        return sum(self.rels[k]["points"] for k in self.tests_of(i)
                   if name is None or re.search(rf"\b{name}\b", self.rels[k]["full"]))

    def decision(self) -> tuple[int, str, str] | None:
        for i in self.answers:
            m = re.search(rf"^(\w+)\s*=\s*[\"']({'|'.join(LABELS)})[\"']", self.solution(i), re.M)
            if m:
                return i, m.group(1), m.group(2)
        return None

    def protected_answer(self) -> tuple[int, str] | None:
        """(answer index, name) where a hidden test recomputes the answer from data a read-only cell defines."""
        for k, r in enumerate(self.rels):
            if r["kind"] != "locked":
                continue
            for name in re.findall(r"^([A-Z_][A-Z0-9_]*)\s*=\s*\[", r["source"], re.M):
                for i in self.answers:
                    if i > k and re.search(rf"\b{name}\b", self.solution(i)) and self.pts(i, name):
                        return i, name
        return None

    @property
    def evidence_tests(self) -> set:
        """Test cells with a run-dependent (``evidence``) grader-side check."""
        return {t for t, c in (self.spec["notebooks"][0].get("checks") or {}).items() if c["kind"] == "evidence"}

    def evidence_answers(self) -> dict[int, list[str]]:
        """{answer index: names} of the answers an evidence check scores."""
        checks = self.spec["notebooks"][0].get("checks") or {}
        at = {r["grade_id"]: i for i, r in enumerate(self.rels) if r["grade_id"]}
        out: dict[int, list[str]] = {}
        for t in sorted(self.evidence_tests):
            c = checks[t]
            if c["answer_id"] in at:
                out.setdefault(at[c["answer_id"]], []).extend(n for n in c["names"]
                                                               if n not in out.get(at[c["answer_id"]], []))
        return out

    def code_exercise(self) -> int:
        return next((i for i in self.answers if "def " in self.solution(i)), self.answers[0])

    def correct(self):
        nb = copy.deepcopy(self.released)
        for i in self.answers:
            nb.cells[i].source = self.solution(i)
        for i, r in enumerate(self.rels):
            if r["kind"] == "manual":
                nb.cells[i].source = "My note: the smallest change that survives the validation rule."
        return nb


def _strip(nb) -> None:
    """As Colab saves a notebook: no custom cell metadata, no cell ids."""
    for cell in nb.cells:
        cell.metadata = nbformat.NotebookNode()
        cell.pop("id", None)
    nb.nbformat_minor = 4


def build_case(plan: Plan, case: str, second: bool):
    """(notebook or raw bytes, file name, expected autograded score, flags, repairs, extra files) for one case."""
    nb, fname, flags, repairs, extra = plan.correct(), f"{plan.name}.ipynb", [], [], {}
    score = plan.auto_max
    first, last = plan.answers[0], plan.answers[-1]
    if case == "blank":
        nb, score = copy.deepcopy(plan.released), 0
    elif case in ("wrong_decision", "gaming", "colab"):
        d = plan.decision()
        if d is None:
            return None
        i, name, label = d
        other = next(x for x in LABELS if x != label)
        if case == "gaming":  # an answer that equals everything, then a look at the input history
            nb.cells[i].source = plan.solution(i) + GAMING.format(name=name, label=other)
            nb.cells.append(nbformat.v4.new_code_cell("print(In[-5:])\nprint(_ih[-3:])"))
            flags = ["suspicious_code"]
        else:
            nb.cells[i].source = re.sub(rf"^({name}\s*=\s*[\"']){label}", rf"\g<1>{other}", plan.solution(i),
                                        count=1, flags=re.M)
        if case == "colab":  # saved from Colab: no cell metadata or ids, and a renamed file
            _strip(nb)
            fname, repairs = f"Copy of {plan.name}.ipynb", ["metadata_restored", "renamed"]
        score -= plan.pts(i, name)
    elif case == "partial":
        e = plan.code_exercise()
        nb.cells[e].source = plan.partial.get(plan.rels[e]["grade_id"], plan.rels[e]["source"])
        score -= plan.pts(e)
    elif case == "syntax_error":
        nb.cells[first].source += "\ndef broken(:\n    pass"
        score -= plan.pts(first)
    elif case == "infinite_loop":
        loop = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" if second else ""
        nb.cells[last].source = loop + "while True:\n    pass\n" + nb.cells[last].source
        score -= plan.pts(last)
        flags = ["cell_timeout"] + (["kernel_killed"] if second else [])
    elif case == "edited_tests":
        nb.cells[first].source = plan.rels[first]["source"]
        for k in plan.tests_of(first):
            nb.cells[k].source = "pass  # my tests"
        score -= plan.pts(first)
        flags = ["edited_tests"]
    elif case == "deleted_tests":
        if second:
            nb.cells[first].source = plan.rels[first]["source"]
            score -= plan.pts(first)
        for k in sorted(plan.tests_of(first), reverse=True):
            del nb.cells[k]
        flags = ["deleted_cells"]
    elif case == "duplicated":
        stub = copy.deepcopy(nb.cells[first])
        stub.source, stub["id"] = plan.rels[first]["source"], "copied-answer"
        test_copy = copy.deepcopy(nb.cells[plan.tests_of(first)[0]])
        test_copy["id"] = "copied-test"
        nb.cells.insert(first + 1, stub)
        nb.cells.append(test_copy)
        repairs = ["duplicate_cells"]
    elif case == "metadata_stripped":
        _strip(nb)
        repairs = ["metadata_restored"]
    elif case == "edited_locked":
        locked = [i for i, r in enumerate(plan.rels) if r["kind"] == "locked"]
        if not locked:
            return None
        nb.cells[locked[0]].source += "\n_my_change = True"
        flags = ["edited_locked"]
    elif case == "reordered":
        cell = nb.cells.pop(last)
        nb.cells.insert(plan.tests_of(last)[0], cell)
        repairs = ["reordered"]
    elif case == "renamed":
        fname = f"Copy of {plan.name}.ipynb" if second else f"{plan.name}-Copy1.ipynb"
        repairs = ["renamed"]
    elif case == "huge_output":
        nb.cells.insert(first, nbformat.v4.new_code_cell("for i in range(200_000):\n    print('line', i)"))
        flags = ["output_truncated"]
    elif case == "crash":
        nb.cells.insert(plan.answers[1], nbformat.v4.new_code_cell("import os\nos._exit(1)"))
        score = plan.pts(first)
        flags = ["kernel_died"]
    elif case == "stderr_noise":
        for i in plan.answers:
            nb.cells[i].source = re.sub(r"^(\s*)(def .*:\s*)$", lambda m: f"{m.group(1)}{m.group(2)}\n"
                                        f"{m.group(1)}    {NOISE}", nb.cells[i].source, flags=re.M)
        nb.cells.insert(first, nbformat.v4.new_code_cell(NOISE))
    elif case == "shadow_builtins":  # an always-equal str and a shadowed type() (no `def __eq__` to grep for)
        d = plan.decision()
        if d is None:
            return None
        i, name, label = d
        nb.cells[i].source = plan.solution(i) + ALWAYS_YES.format(name=name, label=next(x for x in LABELS
                                                                                       if x != label))
        score -= plan.pts(i, name)  # the grader compares the printed answer in its own process
        flags = ["suspicious_code"]
    elif case == "kernel_alias":  # nothing answered, error reporting silenced through an alias of get_ipython
        nb = copy.deepcopy(plan.released)
        nb.cells.insert(first, nbformat.v4.new_code_cell(SILENCE))
        score, flags = 0, ["suspicious_code", "reply_error"]
    elif case == "patch_reference":  # change the read-only data the hidden test recomputes the truth from
        hit = plan.protected_answer()
        if hit is None:
            return None
        i, data = hit
        nb.cells[i].source = f"{data}.clear()\n{data}.extend([0.1, 0.9])  # now epoch 0 is 'best'\n" + plan.solution(i)
        score -= plan.pts(i, data)  # the truth comes from the solution at release time, not from the kernel
        flags = ["suspicious_code"]
    elif case == "shadow_package":  # a course_lib/ next to the notebook, imported by an honest-looking cell
        nb.cells.insert(first, nbformat.v4.new_code_cell("import course_lib\nprint(course_lib.__file__)"))
        extra = {"course_lib/__init__.py": SHADOW.encode()}
        flags = ["suspicious_code"]
    elif case == "read_hidden":  # print the notebook files of the working folder, base64 (beats redaction)
        nb.cells.append(nbformat.v4.new_code_cell(READ))
    elif case == "hostile_output":  # scripts for the instructor's browser, markdown for report.md, a huge update
        nb.cells.insert(first, nbformat.v4.new_code_cell(HOSTILE_OUTPUT))
        nb.cells.insert(first, nbformat.v4.new_markdown_cell(
            "<script>alert('PWNED-md')</script> [x](javascript:alert(1))"))
        fname_ = re.search(r"^def (\w+)", plan.solution(plan.code_exercise()), re.M)
        if fname_ is None:
            return None
        e = plan.code_exercise()
        nb.cells[e + 2].source += INJECT.format(fname=fname_.group(1))  # +2: the two cells inserted above
        score -= plan.pts(e)
        flags = ["output_truncated"]
    elif case == "daemon":  # a detached process that would outlive the submission
        nb.cells.append(nbformat.v4.new_code_cell(
            "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', "
            f"{DAEMON.format(marker=plan.name)!r}], start_new_session=True)"))
    elif case == "read_frames":  # look for a running test's source in the history, linecache, frames, gc
        nb.cells.append(nbformat.v4.new_code_cell(FRAMES))
        flags = ["suspicious_code"]
    elif case == "forge_answers":  # a wrong answer, the right one forged as evidence
        d = plan.decision()
        if d is None:
            return None
        i, name, label = d
        wrong = next(x for x in LABELS if x != label)
        nb.cells[i].source = re.sub(rf"^({name}\s*=\s*[\"']){label}", rf"\g<1>{wrong}", plan.solution(i), count=1,
                                    flags=re.M) + FORGE.format(name=name, label=label, tests=[
            plan.rels[k]["grade_id"] for k in plan.tests_of(i)])
        score -= plan.pts(i, name)
    elif case == "patch_truth":  # wrong run-dependent answers, the references the truth came from patched
        hits = plan.evidence_answers()
        if not hits:
            return None
        for i, names in hits.items():
            nb.cells[i].source = plan.solution(i) + PATCH_TRUTH.format(
                assign="\n".join(f"{n} = _wrong({n})" for n in names),
                pairs=", ".join(f"{n!r}: {n}" for n in names))
            score -= sum(plan.rels[k]["points"] for k in plan.tests_of(i)
                         if plan.rels[k]["grade_id"] in plan.evidence_tests)
        flags = ["suspicious_code"]
    elif case == "corrupt":
        return nbformat.writes(nb).encode()[:400], fname, 0, ["unreadable"], [], {}
    return nb, fname, score, flags, repairs, extra


def make_cohort(out, course_root=REPO / "grading", assignments=None, cases=None, partial=None) -> list[dict]:
    """Write the cohort under ``out``; return the expected rows."""
    out = Path(out)
    course = Course.load(course_root)
    names = list(assignments or course.released_assignments())
    expected = []
    for k, name in enumerate(names):
        plan = Plan(assignment_spec(course, name), (partial or {}).get(name))
        for case in cases or CASES + HOSTILE:
            built = build_case(plan, case, second=bool(k % 2))
            if built is None:
                continue
            nb, fname, score, flags, repairs, extra = built
            path = out / case / name / fname
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(nb if isinstance(nb, bytes) else nbformat.writes(nb).encode())
            for rel, data in extra.items():
                (path.parent / rel).parent.mkdir(parents=True, exist_ok=True)
                (path.parent / rel).write_bytes(data)
            expected.append({"student": case, "assignment": name, "score": f"{score:g}",
                             "flags": ";".join(flags), "repairs": ";".join(repairs)})
    for name in names:
        expected.append({"student": "missing_student", "assignment": name, "score": "0", "flags": "missing",
                         "repairs": ""})
    students = sorted({e["student"] for e in expected})
    (out / "roster.csv").write_text("student_id\n" + "\n".join(students) + "\n")
    with open(out / "expected.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(expected[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(expected)
    return expected


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--course-root", default=str(REPO / "grading"))
    p.add_argument("--assignment", action="append")
    p.add_argument("--cases", nargs="*")
    p.add_argument("--partial", help="JSON {assignment: {grade_id: partially right answer}}")
    args = p.parse_args(argv)
    rows = make_cohort(args.out, args.course_root, args.assignment, args.cases,
                       json.loads(args.partial) if args.partial else None)
    print(f"{len(rows)} expected rows written to {Path(args.out) / 'expected.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
