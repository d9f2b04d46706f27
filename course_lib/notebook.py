"""Small helpers the notebooks share: the unsolved path, output folders and recorded decisions.

A learner notebook runs top to bottom before any exercise is solved (JupyterLab's Run All stops at the first
cell that raises), and says in one line what is still missing:

* an exercise is a function whose stub raises ``NotImplementedError``. Its visible tests run inside
  ``with exercise("name"):``, which turns that one error into a line (what is missing, where, and that the
  notebook goes on with course_lib's version); ``use_or_fallback`` then picks course_lib's version;
* a decision is a set of names that start as ``None``. Its visible tests run under
  ``if answered(name=name):``, which prints the same kind of line for the names still ``None``;
* the last cell, ``save_decisions``, lists what is still unanswered (or says everything was saved).

None of this changes a grade: the hidden tests, which the grader appends after the visible ones and runs
outside these guards, call the learner's own function and check the learner's own values, so an unsolved
exercise or an unanswered decision fails them and scores 0.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

__all__ = ["exercise", "answered", "use_or_fallback", "unsolved_exercises", "prepare_out_dir", "save_decisions"]

_ON_FALLBACK: dict[str, None] = {}  # exercises running on course_lib's version in this kernel, in order


@contextmanager
def exercise(name: str):
    """Run the visible tests of exercise ``name``; if its stub is still there, say so in one line and go on.

    Only ``NotImplementedError`` (the stub's) is caught; any other error, e.g. a failed ``assert``, is raised
    as usual: a wrong answer should be seen.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be the exercise's name as a non-empty str, got {name!r}")
    try:
        yield
    except NotImplementedError:
        verb = "are" if " and " in name else "is"
        print(f"[exercise] {name} {verb} not written yet (the cell above): visible tests skipped; "
              "the notebook goes on with course_lib's version.")


def answered(**values) -> bool:
    """True when no value is ``None``; else print one line naming the unanswered ones and return False.

    Use it as ``if answered(first_problem=first_problem):`` in front of a decision's visible tests.
    """
    if not values:
        raise TypeError("answered() needs the decision names and values, e.g. answered(bottleneck=bottleneck)")
    missing = [k for k, v in values.items() if v is None]
    if missing:
        print(f"[decision] {', '.join(missing)} not answered yet: tests skipped; "
              "the last cell lists what is still unanswered.")
    return not missing


def use_or_fallback(learner_fn, reference_fn, *probe_args, name: str | None = None, **probe_kwargs):
    """Return ``learner_fn`` if calling it on the probe arguments works, else ``reference_fn``.

    An exercise stub raises ``NotImplementedError``; then the notebook goes on with course_lib's version, says
    so, and remembers the exercise for :func:`save_decisions`. Any other error is re-raised: a bug in the
    learner's code should be seen, not hidden.
    """
    label = name or getattr(learner_fn, "__name__", "your function")
    try:
        learner_fn(*probe_args, **probe_kwargs)
    except NotImplementedError:
        _ON_FALLBACK[label] = None
        print(f"[exercise] {label} is not written yet: using course_lib's version so the notebook goes on.")
        return reference_fn
    _ON_FALLBACK.pop(label, None)
    print(f"[exercise] using your {label}.")
    return learner_fn


def unsolved_exercises() -> list[str]:
    """Exercises that ran on course_lib's version in this kernel (their ``use_or_fallback`` cell fell back)."""
    return list(_ON_FALLBACK)


def prepare_out_dir(out_dir) -> Path:
    """Create ``out_dir`` (and parents) and return it as a Path."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_decisions(out_dir, **decisions) -> Path:
    """Write the answered decisions to ``out_dir/decisions.json`` (read by ``make course``) and say what is left.

    A ``None`` value is an unanswered decision: it is left out of the file and listed, together with the
    exercises still on course_lib's version (:func:`unsolved_exercises`). Prints one line when everything
    is answered, else a short list of what is still missing.
    """
    path = prepare_out_dir(out_dir) / "decisions.json"
    clean = {k: (v.item() if hasattr(v, "item") else v) for k, v in decisions.items() if v is not None}
    missing = [k for k, v in decisions.items() if v is None]
    path.write_text(json.dumps(clean, indent=2, sort_keys=True, default=str) + "\n")
    unsolved = unsolved_exercises()
    if not missing and not unsolved:
        print(f"decisions saved to {path.name} in out_dir")
        return path
    print("Still unanswered in this notebook:")
    if unsolved:
        print(f"  exercises (running on course_lib's version): {', '.join(unsolved)}")
    if missing:
        print(f"  decisions (still None): {', '.join(missing)}")
    print(f"Until then {path.name} in out_dir holds only what is answered; answer the rest, then run all again.")
    return path

