"""Match a learner's notebook back to the released one, cell by cell, so it grades as the learner meant.

Learners' editors drop nbgrader metadata (Colab), learners copy cells (repeated grade ids), move and delete
cells and rename files. ``repair`` rebuilds the notebook in the released order:

1. cells whose grade id is a released one are matched by id (of several copies of an answer cell, the
   last one that differs from the stub wins; other copies are dropped);
2. cells without metadata whose text is exactly that of a unique released test, locked, code or markdown
   cell are matched by content, wherever they are (this catches moved cells);
3. the rest is aligned between those anchors by position and similarity to the released cell, to the
   instructor's solution (a hint) and by the names the cell defines (``def f``, ``answer = ...``).

Tests and locked cells always get the gradebook's source (with the hidden tests); answers, free code and
markdown keep the learner's text; cells only the learner wrote stay right after the cell they followed.
Every change is listed as a repair (harmless) or a flag (a change to what is graded).
"""
from __future__ import annotations

import copy
import re
from difflib import SequenceMatcher

import nbformat

ANSWER_KINDS = ("solution", "manual", "task")
FIXED_KINDS = ("test", "locked")
NAME_RE = re.compile(r"^\s*(?:def|class)\s+([A-Za-z_]\w*)|^([A-Za-z_]\w*)\s*(?::[^=\n]*)?=(?!=)", re.M)


def norm(source) -> str:
    text = "".join(source) if isinstance(source, list) else (source or "")
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n")


def names(source: str) -> set[str]:
    return {a or b for a, b in NAME_RE.findall(source or "")}


def similarity(a: str, b: str) -> float:
    if not a and not b:
        return 1.0
    return SequenceMatcher(None, a[:3000], b[:3000], autojunk=False).ratio()


def _score(rel: dict, cell) -> float:
    """How well learner ``cell`` fits released cell ``rel`` (0 = not at all); only same-type cells fit."""
    if cell.cell_type != rel["cell_type"]:
        return 0.0
    src = norm(cell.source)
    sim = similarity(src, rel["norm"])
    if rel["kind"] in ANSWER_KINDS:
        if rel.get("hint"):
            sim = max(sim, similarity(src, norm(rel["hint"])))
        if src == rel["norm"]:
            return 0.31  # an untouched copy of the stub: taken only when nothing edited fits
        return 0.3 + 0.7 * sim + (0.5 if names(src) & rel["names"] else 0.0)
    return 0.3 + 0.7 * sim if sim >= 0.4 else 0.0


def _align(rels: list[dict], cells: list) -> list[tuple[int, int]]:
    """Order-preserving alignment (indices into rels, cells) maximising the summed fit."""
    n, m = len(rels), len(cells)
    if not n or not m:
        return []
    best = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            s = _score(rels[i], cells[j])
            best[i][j] = max(best[i + 1][j], best[i][j + 1], s + best[i + 1][j + 1] if s > 0 else 0.0)
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        s = _score(rels[i], cells[j])
        if s > 0 and abs(best[i][j] - (s + best[i + 1][j + 1])) < 1e-12:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif best[i][j] == best[i + 1][j]:
            i += 1
        else:
            j += 1
    return pairs


def _increasing(pairs: list[tuple[int, int]]) -> set[tuple[int, int]]:
    """The longest run of (released, learner) pairs in the same order in both notebooks."""
    pairs = sorted(pairs, key=lambda p: p[1])
    ends, prev, tails = [], [None] * len(pairs), []
    for k, (r, _) in enumerate(pairs):
        lo, hi = 0, len(ends)
        while lo < hi:
            mid = (lo + hi) // 2
            if ends[mid] < r:
                lo = mid + 1
            else:
                hi = mid
        prev[k] = tails[lo - 1] if lo else None
        if lo == len(ends):
            ends.append(r)
            tails.append(k)
        else:
            ends[lo], tails[lo] = r, k
    keep, k = set(), tails[-1] if tails else None
    while k is not None:
        keep.add(pairs[k])
        k = prev[k]
    return keep


def repair(released_cells: list[dict], learner, notebook: str) -> tuple[list, list[dict], list[dict]]:
    """Rebuild ``learner`` (a NotebookNode) on the released cells; return (cells, repairs, flags).

    ``released_cells[i]``: ``cell_type``, ``kind`` (see ``nbmeta.kind_of``; ``code``/``markdown`` for plain cells),
    ``grade_id``, ``source`` (released), ``full`` (gradebook source of tests and locked cells), ``points``,
    ``metadata``, ``hint`` (the instructor's solution, optional), ``restore`` (always use the released cell).
    """
    rels = [dict(r, norm=norm(r["source"]), names=names(r["source"]) | names(r.get("hint") or ""))
            for r in released_cells]
    cells = list(learner.cells)
    repairs, flags = [], []

    def note(bucket: list, code: str, detail: str) -> None:
        bucket.append({"code": code, "notebook": notebook, "detail": detail})

    match: dict[int, int] = {}  # released index -> learner index
    dropped: set[int] = set()
    by_id: dict[str, list[int]] = {}
    for j, cell in enumerate(cells):
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        by_id.setdefault(gid, []).append(j)
    for i, rel in enumerate(rels):  # 1. by grade id
        found = by_id.get(rel["grade_id"], []) if rel["grade_id"] else []
        if not found:
            continue
        if rel["kind"] in ANSWER_KINDS:
            edited = [j for j in found if norm(cells[j].source) != rel["norm"]]
            pick = edited[-1] if edited else found[0]
        else:
            same = [j for j in found if norm(cells[j].source) == rel["norm"]]
            pick = (same or found)[0]
        match[i] = pick
        if len(found) > 1:
            dropped.update(j for j in found if j != pick)
            note(repairs, "duplicate_cells", f"{len(found)} cells carry grade id {rel['grade_id']!r}: used "
                                             f"cell {pick + 1}, dropped the others")
    used = set(match.values()) | dropped
    unique: dict[tuple, list[int]] = {}
    for i, rel in enumerate(rels):
        if rel["kind"] not in ANSWER_KINDS and rel["norm"]:
            unique.setdefault((rel["cell_type"], rel["norm"]), []).append(i)
    for j, cell in enumerate(cells):  # 2. by exact content
        key = (cell.cell_type, norm(cell.source))
        if j in used or len(unique.get(key, [])) != 1:
            continue
        i = unique[key][0]
        if i not in match:
            match[i] = j
            used.add(j)
    anchors = _increasing([(i, j) for i, j in match.items()])
    moved = [i for i, j in match.items() if (i, j) not in anchors]
    if moved:
        note(repairs, "reordered", f"{len(moved)} cell(s) were moved; the released order is restored")
    bounds = sorted(anchors) + [(len(rels), len(cells))]
    lo = (-1, -1)
    for hi in bounds:  # 3. align what lies between consecutive anchors
        ri = [i for i in range(lo[0] + 1, hi[0]) if i not in match]
        lj = [j for j in range(lo[1] + 1, hi[1]) if j not in used]
        for a, b in _align([rels[i] for i in ri], [cells[j] for j in lj]):
            match[ri[a]] = lj[b]
            used.add(lj[b])
        lo = hi
    out: list = []
    extras: dict[int, list[int]] = {}
    last = -1
    stubs = {r["norm"] for r in rels if r["kind"] in (*ANSWER_KINDS, *FIXED_KINDS) and r["norm"]}
    where = {j: i for i, j in match.items()}
    for j, cell in enumerate(cells):
        if j in where:
            last = where[j]
        elif j not in dropped:
            if norm(cell.source) in stubs:
                dropped.add(j)
                note(repairs, "duplicate_cells", f"dropped cell {j + 1}: a copy of a released graded cell")
            else:
                extras.setdefault(last, []).append(j)
    stripped = [i for i, j in match.items() if rels[i]["grade_id"] and not
                cells[j].metadata.get("nbgrader", {}).get("grade_id")]
    if stripped:
        note(repairs, "metadata_restored", f"nbgrader metadata restored on {len(stripped)} cell(s)")
    for j in extras.get(-1, []):
        out.append(_plain(cells[j]))
    for i, rel in enumerate(rels):
        cell = nbformat.from_dict({"cell_type": rel["cell_type"], "metadata": copy.deepcopy(rel["metadata"]),
                                   "source": rel["source"]})
        if rel["cell_type"] == "code":
            cell.update(outputs=[], execution_count=None)
        j = match.get(i)
        learner_src = norm(cells[j].source) if j is not None else None
        if rel["kind"] in FIXED_KINDS:
            cell.source = rel["full"]
            what = "test" if rel["kind"] == "test" else "locked"
            if j is None:
                note(flags, "deleted_cells", f"{what} cell {rel['grade_id']!r} was deleted (restored)")
            elif learner_src != rel["norm"] or cells[j].cell_type != rel["cell_type"]:
                note(flags, f"edited_{'tests' if what == 'test' else 'locked'}",
                     f"{what} cell {rel['grade_id']!r} was edited (restored)")
        elif rel.get("restore"):
            pass
        elif j is not None:
            cell.source = cells[j].source if isinstance(cells[j].source, str) else "".join(cells[j].source)
        elif rel["kind"] in ANSWER_KINDS:
            note(flags, "answer_missing", f"answer cell {rel['grade_id']!r} not found: graded as blank")
        elif rel["cell_type"] == "code":
            note(repairs, "restored_cells", f"deleted code cell {i + 1} restored from the release")
        if j is not None and rel["grade_id"]:
            meta = cells[j].metadata.get("nbgrader", {})
            if "points" in meta and rel.get("points") is not None and float(meta["points"]) != float(rel["points"]):
                note(flags, "changed_points", f"{rel['grade_id']!r}: points {meta['points']} -> {rel['points']}")
            changed = [k for k in ("grade", "solution", "locked") if k in meta and
                       bool(meta[k]) != bool(rel["metadata"].get("nbgrader", {}).get(k))]
            if changed:
                note(flags, "changed_metadata", f"{rel['grade_id']!r}: {', '.join(changed)} changed (restored)")
        out.append(cell)
        for jj in extras.get(i, []):
            out.append(_plain(cells[jj]))
    for k, cell in enumerate(out):
        cell["id"] = f"graded-{k:03d}"
    return out, repairs, flags


def _plain(cell):
    """A learner's own cell, without any nbgrader metadata (it is not graded)."""
    new = copy.deepcopy(cell)
    new.metadata.pop("nbgrader", None)
    if new.cell_type == "code":
        new.outputs, new.execution_count = [], None
    new.pop("id", None)
    return new


def content_score(released_cells: list[dict], nb) -> float:
    """Share of released fixed cells and grade ids found in ``nb`` (to recognise a renamed notebook)."""
    have = {norm(c.source) for c in nb.cells}
    ids = {c.metadata.get("nbgrader", {}).get("grade_id") for c in nb.cells}
    probes = [r for r in released_cells if r["kind"] not in ANSWER_KINDS and norm(r["source"])]
    if not probes:
        return 0.0
    hits = sum(norm(r["source"]) in have or (r["grade_id"] and r["grade_id"] in ids) for r in probes)
    return hits / len(probes)
