"""Read submissions in the layouts instructors actually get, into (student, assignment, files) records.

* ``<student>/<assignment>/<notebook>.ipynb`` (nbgrader's ``submitted/`` layout; extra files are kept),
  possibly under one more top folder, and ``<student>/<notebook>.ipynb`` without the assignment folder;
* a ``.zip`` of either (extracted safely: no absolute paths, no ``..``, bounded size);
* a flat folder of ``<student>_<notebook>.ipynb`` files, as LMS downloads give.

A notebook whose name matches no released notebook (``Copy of x.ipynb``, ``x-Copy1.ipynb``) is assigned by
content; the repair step then decides which file of a submission is graded.

Only regular files inside the submissions folder are read, as the grading user (often root): a symbolic
link (to ``solutions/``, the gradebook, another student's folder), a hard-linked file, a device or a FIFO
is never followed or read, only reported; a zip entry that is a link is skipped.
"""
from __future__ import annotations

import os
import re
import stat
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from .nbmeta import CONTENT_MATCH, plain_stem
from .repair import content_score

MAX_SUBMISSION = 200 * 2**20
MAX_ZIP = 4 * 2**30
SKIP = (".ipynb_checkpoints", "__MACOSX", "__pycache__")


@dataclass
class Submission:
    student: str
    assignment: str
    files: dict[str, bytes] = field(default_factory=dict)
    origin: str = ""

    def as_task(self) -> dict:
        return asdict(self)


def safe_id(name: str) -> str:
    """A student id usable as a folder name (nbgrader keeps one folder per student)."""
    clean = re.sub(r"[^\w.@+-]", "_", name.strip()).lstrip(".") or "unnamed"
    return clean[:100]


def regular_files(root: Path, problems: list[str]):
    """Paths of the regular files under ``root`` (sorted), never through a link; what is skipped goes to
    ``problems``."""
    out = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        for d in sorted(dirs):
            if os.path.islink(os.path.join(folder, d)):
                problems.append(f"{Path(folder, d).relative_to(root)}: a symbolic link, not followed")
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(folder, d)))
        for name in sorted(names):
            f = Path(folder, name)
            st = os.lstat(f)
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{f.relative_to(root)}: not a regular file (a link?), not read")
            elif st.st_nlink > 1:
                problems.append(f"{f.relative_to(root)}: a hard-linked file, not read")
            else:
                out.append(f)
    return sorted(out)


def read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is still a regular file (O_NOFOLLOW: a link swapped in meanwhile fails)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read()


def extract_zip(path: Path, into: Path) -> Path:
    total = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            parts = Path(info.filename).parts
            if info.is_dir() or info.filename.startswith("/") or ".." in parts or \
                    stat.S_ISLNK(info.external_attr >> 16):
                continue
            total += info.file_size
            if total > MAX_ZIP:
                raise ValueError(f"{path} unpacks to more than {MAX_ZIP >> 30} GiB: refusing it")
            target = into.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                dst.write(src.read())
    return into


def _guess(path: Path, notebooks: dict[str, str], specs: dict) -> str | None:
    """The assignment of a notebook file: by its (cleaned) name, else by its content."""
    stem = plain_stem(path.name)
    for nb, assignment in notebooks.items():
        if stem == nb.lower() or stem.endswith("_" + nb.lower()):
            return assignment
    try:
        nb = nbformat.reads(read_regular(path).decode("utf-8"), as_version=4)
    except Exception:  # noqa: BLE001 - unreadable: cannot tell from content
        return None
    scores = [(max(content_score(n["cells"], nb) for n in spec["notebooks"]), a) for a, spec in specs.items()]
    best = max(scores, default=(0.0, None))
    return best[1] if best[0] >= CONTENT_MATCH else None


def collect(path, specs: dict[str, dict]) -> tuple[list[Submission], list[str]]:
    """Submissions found under ``path`` (folder or .zip) for the assignments in ``specs``; plus problems."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"submissions must be a folder or a .zip, got {path} (it does not exist)")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ValueError(f"submissions must be a folder or a .zip, got {path}")
        tmp = tempfile.TemporaryDirectory(prefix="grading-zip-")
        subs, problems = collect(extract_zip(path, Path(tmp.name)), specs)
        tmp.cleanup()
        for s in subs:
            s.origin = f"{path.name}:{s.origin}"
        return subs, problems
    notebooks = {nb["name"]: a for a, spec in specs.items() for nb in spec["notebooks"]}
    found: dict[tuple[str, str], Submission] = {}
    folders: set[tuple[Path, str]] = set()
    problems: list[str] = []
    every = regular_files(path, problems)
    for nbpath in (f for f in every if f.suffix == ".ipynb"):
        rel = nbpath.relative_to(path)
        if any(p in SKIP or p.startswith(".") for p in rel.parts):
            continue
        parts = rel.parts
        hit = [k for k, p in enumerate(parts[:-1]) if p in specs and k >= 1]
        if hit:  # <...>/<student>/<assignment>/<files>
            k = hit[-1]
            student, assignment, folder = parts[k - 1], parts[k], path.joinpath(*parts[: k + 1])
        elif len(parts) >= 2:  # <...>/<student>/<notebook>.ipynb
            student, folder = parts[-2], nbpath.parent
            assignment = _guess(nbpath, notebooks, specs)
        else:  # <student>_<notebook>.ipynb
            folder, assignment, student = None, None, None
            for nb in sorted(notebooks, key=len, reverse=True):
                m = re.match(rf"(.+?)[_-]+(?:copy of )?{re.escape(nb)}", nbpath.stem, re.I)
                if m:
                    student, assignment = m.group(1), notebooks[nb]
                    break
            if student is None:
                student = nbpath.stem.split("_", 1)[0]
                assignment = _guess(nbpath, notebooks, specs)
        if assignment is None:
            problems.append(f"{rel}: matches no released assignment; not graded")
            continue
        sub = found.setdefault((safe_id(student), assignment), Submission(safe_id(student), assignment,
                                                                          origin=str(rel.parent)))
        if folder is None:
            name = nbpath.name[len(student):].lstrip("_-") if nbpath.name.startswith(student) else nbpath.name
            sub.files[name] = read_regular(nbpath)
        elif (folder, assignment) not in folders:
            folders.add((folder, assignment))
            size = 0
            for f in (f for f in every if folder in f.parents):
                frel = f.relative_to(folder)
                if not any(p in SKIP for p in frel.parts):
                    size += f.stat().st_size
                    if size > MAX_SUBMISSION:
                        problems.append(f"{folder}: more than {MAX_SUBMISSION >> 20} MiB; the rest is left out")
                        break
                    sub.files[frel.as_posix()] = read_regular(f)
    return sorted(found.values(), key=lambda s: (s.student, s.assignment)), problems
