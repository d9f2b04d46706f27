"""Execute one notebook in a scratch folder, in the sandbox, under a per-cell and a whole-notebook time limit.

The kernel is started through ``sandbox.py`` (see its docstring for what each isolation level shows) over
``ipc`` sockets in the job folder, so it needs no network. Each code cell gets
``min(cell_timeout, time left for the notebook)``; a cell that runs out is interrupted; if the kernel does
not answer within a few seconds after that (the code ignores SIGINT) it is killed and the cells after it are
``not_run``. Outputs are capped per cell so that a runaway print cannot flood the grader.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

from course_lib.runtime import KERNEL_ENV

from .checks import ANSWERS_DIR
from .evidence import read_evidence

REPO = Path(__file__).resolve().parents[1]
SANDBOX = Path(__file__).resolve().with_name("sandbox.py")
LEVELS = ("full", "net", "none")
TRUNCATED = "\n[output truncated by the grader]\n"


@dataclass
class Limits:
    """Per-submission limits (seconds, MiB, characters)."""

    cell_timeout: int = 300
    notebook_timeout: int = 1200
    memory_mb: int = 4096
    cpu_seconds: int | None = None  # default: notebook_timeout + 60 (kernels run with one thread)
    file_mb: int = 512
    total_memory_mb: int | None = None  # resident memory of all processes together (default: memory_mb)
    max_processes: int = 64  # processes of one submission at a time
    disk_mb: int = 1024  # bytes written to the job folder (its private /tmp and /dev/shm are 256 MiB tmpfs)
    max_files: int = 20_000
    max_cell_output: int = 20_000  # characters of text per cell; rich outputs get 100x
    max_notebook_output: int = 20_000_000  # characters of all outputs of a notebook, display updates included
    interrupt_grace: int = 5

    def rlimits(self) -> dict:
        cpu = self.cpu_seconds or self.notebook_timeout + 60
        return {"as": self.memory_mb * 2**20, "cpu": cpu, "fsize": self.file_mb * 2**20, "nofile": 1024,
                "nproc": 4096, "core": 0}

    def totals(self) -> dict:
        """Per-submission totals, enforced by the sandbox's PID 1 (and cgroup v2 where available)."""
        return {"memory": (self.total_memory_mb or self.memory_mb) * 2**20, "procs": self.max_processes,
                "disk": self.disk_mb * 2**20, "files": self.max_files}


def kernel_env(home: Path, tmp: Path, extra: dict | None = None) -> dict:
    """The kernel's whole environment: the course's regression kernel environment (fast mode, CPU, one thread,
    no progress bars, pinned CPU kernels: ``course_lib.runtime.KERNEL_ENV``), nothing from the grader."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
           "TMPDIR": str(tmp), "MPLCONFIGDIR": str(home / ".matplotlib"), "IPYTHONDIR": str(home / ".ipython"),
           "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "MPLBACKEND": "Agg", **KERNEL_ENV}
    env.update(extra or {})
    return env


SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")


def view_paths(job: Path) -> list[list[str]]:
    """The kernel's whole file system at ``full``/``net`` (an allow-list): system folders, the Python
    installation and course_lib read-only; the job folder writable. Nothing else exists for it."""
    spec = importlib.util.find_spec("course_lib")
    ro = {*SYSTEM, sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent.parent)}
    if spec is not None and spec.origin:
        ro.add(str(Path(spec.origin).resolve().parent))
    return [[p, "ro"] for p in sorted(ro) if os.path.lexists(p)] + [[str(job), "rw"]]


def write_spec(job: Path, level: str, limits: Limits, argv: list[str], env_extra=None, log=True) -> Path:
    """The sandbox's spec for the job folder ``job``; its root and report lie beside it, outside the view."""
    for sub in ("work", "home", "tmp"):
        (job / sub).mkdir(parents=True, exist_ok=True)
    root = job.with_name(job.name + ".root")
    root.mkdir(exist_ok=True)
    spec = {"level": level, "view": view_paths(job), "root": str(root), "report": str(job) + ".report",
            "owned": [str(job)], "rlimits": limits.rlimits(), "totals": limits.totals(), "cwd": str(job / "work"),
            "argv": argv,
            "log": str(job / "kernel.log") if log else None,
            "env": kernel_env(job / "home", job / "tmp", env_extra)}
    path = job / "sandbox.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


PROBE = """
import importlib.util, os, socket, sys
import ipykernel  # noqa: F401
open(importlib.util.find_spec("course_lib").origin).close()
hidden = [p for p in sys.argv[1:] if os.path.exists(p) and os.listdir(p)]
try:
    socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET: never answers, but routable
    net = "open"
except OSError as err:
    net = "blocked" if err.errno in (101, 99) else "open"
print(os.getuid(), net, len(hidden))
"""


@cache
def probe_isolation(wanted: str = "auto") -> str:
    """The strongest level that works on this machine (cached per process): ``full``, ``net`` or ``none``."""
    if wanted not in ("auto", *LEVELS):
        raise ValueError(f"isolation must be 'auto', 'full', 'net' or 'none', got {wanted!r}")
    for level in (LEVELS if wanted == "auto" else (wanted,)):
        if level == "none" or sys.platform != "linux":
            return "none"
        job = Path(tempfile.mkdtemp(prefix="gprobe-"))
        try:
            secret = [str(REPO / "grading"), str(REPO / "solutions")]
            spec = write_spec(job, level, Limits(), [sys.executable, "-c", PROBE, *secret], log=False)
            (job / "conn.json").touch()
            proc = subprocess.run([sys.executable, str(SANDBOX), str(spec), str(job / "conn.json")],
                                  capture_output=True, text=True, timeout=120)
            fields = proc.stdout.split()
            if proc.returncode == 0 and len(fields) == 3 and fields[1] == "blocked" and fields[2] == "0":
                if fields[0] != "0":  # never root inside
                    return level
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            _clean(job)
        if wanted != "auto":
            raise RuntimeError(f"isolation level {wanted!r} does not work here; use --isolation auto")
    return "none"


class _Client(NotebookClient):
    """nbclient with output caps (per cell, per notebook, display updates included), the execution reply of
    each cell, and a record of timeouts."""

    def __init__(self, nb, km, max_chars: int, max_total: int, **kw):
        super().__init__(nb, km=km, **kw)
        self.max_chars, self.max_total, self.timed_out, self.truncated = max_chars, max_total, False, False
        self._used, self._total, self._marked, self.replies = {}, 0, set(), {}

    async def _async_handle_timeout(self, timeout, cell=None):
        self.timed_out = True
        return await super()._async_handle_timeout(timeout, cell)

    async def _check_raise_for_error(self, cell, cell_index, exec_reply):
        self.replies[cell_index] = (exec_reply or {}).get("content", {}).get("status")
        return await super()._check_raise_for_error(cell, cell_index, exec_reply)

    def _room(self, cell_index: int, key: str) -> int:
        cap = self.max_chars if key == "text" else 100 * self.max_chars
        return min(cap - self._used.get((cell_index, key), 0), self.max_total - self._total)

    def _charge(self, cell_index: int, key: str, size: int) -> None:
        self._used[(cell_index, key)] = self._used.get((cell_index, key), 0) + size
        self._total += size

    def _mark(self, outs, cell_index: int) -> None:
        self.truncated = True
        if cell_index not in self._marked:
            self._marked.add(cell_index)
            outs.append(nbformat.v4.new_output("stream", name="stdout", text=TRUNCATED))

    def output(self, outs, msg, display_id, cell_index):
        content = msg.get("content", {})
        kind = msg["msg_type"]
        if kind == "error":  # always kept (it decides the score), but bounded
            content["evalue"] = str(content.get("evalue", ""))[:2000]
            content["traceback"] = [str(t)[:2000] for t in content.get("traceback", [])[-20:]]
            return super().output(outs, msg, display_id, cell_index)
        key = "text" if kind == "stream" else "data"
        size = len(content.get("text", "")) if key == "text" else len(json.dumps(content.get("data", content)))
        room = self._room(cell_index, key)
        if size <= room:
            self._charge(cell_index, key, size)
            return super().output(outs, msg, display_id, cell_index)
        if key == "text" and room > 0:
            content["text"] = content["text"][:room] + TRUNCATED
            self._charge(cell_index, key, room)
            self._marked.add(cell_index)
            self.truncated = True
            return super().output(outs, msg, display_id, cell_index)
        self._mark(outs, cell_index)
        return None

    def _update_display_id(self, display_id, msg):
        """A display update rewrites every output shown under ``display_id``: each copy counts."""
        targets = self._display_id_map.get(display_id, {})
        if not targets:
            return None
        size = len(json.dumps(msg.get("content", {}).get("data", {})))
        if any(size * len(idx) > self._room(c, "data") for c, idx in targets.items()):
            for c in targets:
                self._mark(self.nb.cells[c].outputs, c)
            return None
        for c, idx in targets.items():
            self._charge(c, "data", size * len(idx))
        return super()._update_display_id(display_id, msg)


async def _execute(nb, job: Path, level: str, limits: Limits, statuses: list, events: list, quiet=()) -> None:
    kdir = job / "kernels" / "grading-sandbox"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, str(SANDBOX), str(job / "sandbox.json"), "{connection_file}"],
        "display_name": "grading sandbox", "language": "python", "interrupt_mode": "message"}))
    km = AsyncKernelManager(kernel_name="grading-sandbox", transport="ipc", ip=str(job / "ipc"),
                            connection_file=str(job / "conn.json"),
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(job / "kernels")]))
    client = _Client(nb, km, limits.max_cell_output, limits.max_notebook_output, allow_errors=True,
                     interrupt_on_timeout=True,
                     error_on_timeout={"ename": "CellTimeoutError", "evalue": "cell time limit", "traceback": []},
                     startup_timeout=120, iopub_timeout=2, shutdown_kernel="immediate", record_timing=False,
                     resources={"metadata": {"path": str(job / "work")}})
    alive = True
    async with client.async_setup_kernel(cleanup_kc=True):
        deadline = time.monotonic() + limits.notebook_timeout  # the kernel's start-up does not count
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            left = deadline - time.monotonic()
            if not alive or left < 1:
                if alive:
                    events.append(("notebook_timeout", i))
                    alive = False
                statuses[i] = "not_run"
                continue
            client.timeout, client.timed_out = math.ceil(min(limits.cell_timeout, left)), False
            try:
                await client.async_execute_cell(cell, i, store_history=i not in quiet)
            except DeadKernelError:
                statuses[i], alive = "died", False
                events.append(("kernel_died", i))
                cell.outputs.append(nbformat.v4.new_output(
                    "error", ename="DeadKernelError", evalue="the kernel died (a crash, os._exit or a limit)",
                    traceback=["The kernel died while running this cell."]))
                continue
            errors = [o for o in cell.outputs if o.output_type == "error"]
            reply = client.replies.pop(i, None)
            statuses[i] = "error" if errors or reply not in ("ok", None) else "ok"
            if reply not in ("ok", None) and not errors:  # the kernel said error but showed none
                events.append(("reply_error", i))
                cell.outputs.append(nbformat.v4.new_output(
                    "error", ename="ReplyError", evalue=f"the execution reply said {reply!r}", traceback=[]))
            if client.timed_out:
                statuses[i] = "timeout"
                kind = "notebook_timeout" if deadline - time.monotonic() < 1 else "cell_timeout"
                events.append((kind, i))
                cell.outputs.append(nbformat.v4.new_output(
                    "error", ename="CellTimeoutError", evalue=f"stopped after {client.timeout} s",
                    traceback=[f"CellTimeoutError: this cell ran longer than {client.timeout} s"]))
                try:
                    await client.kc.execute_interactive("pass", store_history=False, timeout=limits.interrupt_grace,
                                                        output_hook=lambda msg: None)
                except (TimeoutError, RuntimeError):
                    events.append(("kernel_killed", i))
                    await client.km.shutdown_kernel(now=True)
                    alive = False
                if kind == "notebook_timeout":
                    alive = False
        if client.truncated:
            events.append(("output_truncated", -1))


def _read_tail(path: Path, size: int = 1500) -> str:
    """The end of a file the kernel could have replaced: never follow a link it planted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        f.seek(max(0, os.fstat(fd).st_size - size))
        return f.read(size).decode("utf-8", "replace")


def _clean(job: Path) -> None:
    shutil.rmtree(job, ignore_errors=True)
    shutil.rmtree(job.with_name(job.name + ".root"), ignore_errors=True)
    Path(str(job) + ".report").unlink(missing_ok=True)


def execute_notebook(nb, files: dict[str, bytes], *, level: str = "none", limits: Limits | None = None,
                     scratch: str | None = None, env: dict | None = None, quiet=(), evidence=()) -> dict:
    """Run ``nb`` (a NotebookNode, executed in place) in a fresh job folder holding ``files``.

    ``evidence``: paths relative to the job folder the notebook writes (history files); after the run they
    are read without following links (``evidence.read_evidence``) and returned as ``"evidence"``.

    Cells whose index is in ``quiet`` (the hidden tests) run with ``store_history=False``: they are not in the
    kernel's input history (``In``, ``_ih``). A cell is ``error`` when it showed an error output or when its
    execution reply said so (learner code can silence the output, not the reply).

    Returns ``{"statuses": [...], "events": [(kind, cell index)], "seconds": float, "level": level}``;
    ``statuses[i]`` is ``ok``, ``error``, ``timeout``, ``died``, ``not_run`` or ``None`` (not a code cell).
    """
    limits = limits or Limits()
    job = Path(tempfile.mkdtemp(prefix="g", dir=scratch))
    statuses: list = [None] * len(nb.cells)
    events: list = []
    tail = ""
    collected: dict[str, bytes] = {}
    found: dict[str, bytes] = {}
    t0 = time.monotonic()
    try:
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        write_spec(job, level, limits, argv, {"GRADING_ANSWERS": str(job / "work" / ANSWERS_DIR), **(env or {})})
        for name, data in files.items():
            if name.startswith("/") or ".." in name.split("/"):
                continue
            target = job / "work" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        try:
            asyncio.run(_execute(nb, job, level, limits, statuses, events, set(quiet)))
        except DeadKernelError:
            events.append(("kernel_died", -1))
        except RuntimeError as err:  # the kernel never started
            events.append(("kernel_failed", -1))
            nb.metadata["grading_error"] = str(err)[:500]
        if any(kind in ("kernel_died", "kernel_failed") for kind, _ in events):
            tail = _read_tail(job / "kernel.log")
        collected = _collect(job / "work" / ANSWERS_DIR)
        found = read_evidence(job / "work", list(evidence))
        over = _read_tail(Path(str(job) + ".report"), 300)  # written by the sandbox's PID 1, out of the view
        if over:
            events.append(("limit_exceeded", -1))
            tail = f"sandbox: {over}\n{tail}"
    finally:
        _clean(job)
    statuses = ["not_run" if s is None and c.cell_type == "code" and c.source.strip() else s
                for s, c in zip(statuses, nb.cells)]
    return {"statuses": statuses, "events": events, "seconds": round(time.monotonic() - t0, 2), "level": level,
            "limits": asdict(limits), "kernel_log": tail, "answers": collected,
            "evidence": found}


def _collect(folder: Path, cap: int = 65536, most: int = 200) -> dict[str, bytes]:
    """The regular files directly in ``folder`` (the decisions' answers), links never followed."""
    out = {}
    try:
        names = sorted(os.listdir(folder))[:most]
    except OSError:
        return out
    for name in names:
        data = _read_file(folder / name, cap)
        if data is not None:
            out[name] = data
    return out


def _read_file(path: Path, cap: int) -> bytes | None:
    """A regular file the kernel wrote, without following a link it planted; None if missing or over ``cap``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000) or st.st_size > cap:
            return None
        return f.read(cap + 1)[:cap]


def run_checks(job: dict, files: dict[str, bytes], *, level: str = "none", limits: Limits | None = None,
               scratch: str | None = None, timeout: int = 600) -> dict:
    """Run ``grading_cli.checks.RUNNER`` on ``job`` (learner answers and the check cases, never the expected
    values) in a fresh sandboxed process, in a job folder holding ``files``: the same walls and totals as a
    kernel. Returns ``{"output": bytes or None, "seconds": float, "rc": int}``."""
    from .checks import MAX_RESULT_BYTES, RUNNER

    limits = limits or Limits()
    job_dir = Path(tempfile.mkdtemp(prefix="c", dir=scratch))
    t0 = time.monotonic()
    rc, output = -1, None
    try:
        work = job_dir / "work"
        argv = [sys.executable, "-c", RUNNER, str(work / ".grading_check_in.json"),
                str(work / ".grading_check_out.json")]
        write_spec(job_dir, level, limits, argv)
        for name, data in files.items():
            if name.startswith("/") or ".." in name.split("/"):
                continue
            target = work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (work / ".grading_check_in.json").write_text(json.dumps(job))
        (job_dir / "conn.json").touch()
        try:
            proc = subprocess.run([sys.executable, str(SANDBOX), str(job_dir / "sandbox.json"),
                                   str(job_dir / "conn.json")], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -9
        output = _read_file(work / ".grading_check_out.json", MAX_RESULT_BYTES)
    finally:
        _clean(job_dir)
    return {"output": output, "seconds": round(time.monotonic() - t0, 2), "rc": rc}
