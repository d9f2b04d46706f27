"""Execute one notebook in a scratch folder, in the sandbox, under a per-cell and a whole-notebook time limit.

The kernel is started through ``sandbox.py`` (see its docstring for what each isolation level hides) over
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
    max_cell_output: int = 20_000  # characters of text per cell; rich outputs get 100x
    interrupt_grace: int = 5

    def rlimits(self) -> dict:
        cpu = self.cpu_seconds or self.notebook_timeout + 60
        return {"as": self.memory_mb * 2**20, "cpu": cpu, "fsize": self.file_mb * 2**20, "nofile": 1024,
                "nproc": 4096, "core": 0}


def kernel_env(home: Path, tmp: Path, extra: dict | None = None) -> dict:
    """The kernel's whole environment: the course's regression kernel environment (fast mode, CPU, one thread,
    no progress bars, pinned CPU kernels: ``course_lib.runtime.KERNEL_ENV``), nothing from the grader."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
           "TMPDIR": str(tmp), "MPLCONFIGDIR": str(home / ".matplotlib"), "IPYTHONDIR": str(home / ".ipython"),
           "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "MPLBACKEND": "Agg", **KERNEL_ENV}
    env.update(extra or {})
    return env


def _keep_paths(job: Path) -> list[str]:
    spec = importlib.util.find_spec("course_lib")
    keep = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(job)}
    if spec is not None and spec.origin:
        keep.add(str(Path(spec.origin).resolve().parent))
    return sorted(keep)


def _hide_paths(job: Path, extra=()) -> list[str]:
    hide = {str(REPO), tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm", os.path.expanduser("~"),
            str(job.parent), *map(str, extra)}
    return sorted(h for h in hide if h and os.path.isdir(h))


def write_spec(job: Path, level: str, limits: Limits, argv: list[str], env_extra=None, hide=(), log=True) -> Path:
    for sub in ("work", "home", "tmp"):
        (job / sub).mkdir(parents=True, exist_ok=True)
    spec = {"level": level, "hide": _hide_paths(job, hide), "keep": _keep_paths(job), "owned": [str(job)],
            "rlimits": limits.rlimits(), "cwd": str(job / "work"), "argv": argv,
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
            if proc.returncode == 0 and len(fields) == 3 and fields[1] == "blocked":
                if level == "net" or (fields[0] != "0" and fields[2] == "0"):
                    return level
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            shutil.rmtree(job, ignore_errors=True)
        if wanted != "auto":
            raise RuntimeError(f"isolation level {wanted!r} does not work here; use --isolation auto")
    return "none"


class _Client(NotebookClient):
    """nbclient with a per-cell output cap and a record of timeouts."""

    def __init__(self, nb, km, max_chars: int, **kw):
        super().__init__(nb, km=km, **kw)
        self.max_chars, self.timed_out, self.truncated, self._used = max_chars, False, False, {}

    async def _async_handle_timeout(self, timeout, cell=None):
        self.timed_out = True
        return await super()._async_handle_timeout(timeout, cell)

    def output(self, outs, msg, display_id, cell_index):
        content = msg.get("content", {})
        if msg["msg_type"] == "stream":
            key, size, cap = "text", len(content.get("text", "")), self.max_chars
        else:
            key, size, cap = "data", len(json.dumps(content.get("data", content))), 100 * self.max_chars
        used = self._used.get((cell_index, key), 0)
        self._used[(cell_index, key)] = used + size
        if used + size <= cap:
            return super().output(outs, msg, display_id, cell_index)
        if not self.truncated or used <= cap:
            if key == "text" and used < cap:
                content["text"] = content["text"][: cap - used] + TRUNCATED
                super().output(outs, msg, display_id, cell_index)
            elif used <= cap:
                outs.append(nbformat.v4.new_output("stream", name="stdout", text=TRUNCATED))
        self.truncated = True
        return None


async def _execute(nb, job: Path, level: str, limits: Limits, statuses: list, events: list) -> None:
    kdir = job / "kernels" / "grading-sandbox"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, str(SANDBOX), str(job / "sandbox.json"), "{connection_file}"],
        "display_name": "grading sandbox", "language": "python", "interrupt_mode": "message"}))
    km = AsyncKernelManager(kernel_name="grading-sandbox", transport="ipc", ip=str(job / "ipc"),
                            connection_file=str(job / "conn.json"),
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(job / "kernels")]))
    client = _Client(nb, km, limits.max_cell_output, allow_errors=True, interrupt_on_timeout=True,
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
                await client.async_execute_cell(cell, i)
            except DeadKernelError:
                statuses[i], alive = "died", False
                events.append(("kernel_died", i))
                cell.outputs.append(nbformat.v4.new_output(
                    "error", ename="DeadKernelError", evalue="the kernel died (a crash, os._exit or a limit)",
                    traceback=["The kernel died while running this cell."]))
                continue
            errors = [o for o in cell.outputs if o.output_type == "error"]
            statuses[i] = "error" if errors else "ok"
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


def execute_notebook(nb, files: dict[str, bytes], *, level: str = "none", limits: Limits | None = None,
                     scratch: str | None = None, env: dict | None = None, hide=()) -> dict:
    """Run ``nb`` (a NotebookNode, executed in place) in a fresh job folder holding ``files``.

    Returns ``{"statuses": [...], "events": [(kind, cell index)], "seconds": float, "level": level}``;
    ``statuses[i]`` is ``ok``, ``error``, ``timeout``, ``died``, ``not_run`` or ``None`` (not a code cell).
    """
    limits = limits or Limits()
    job = Path(tempfile.mkdtemp(prefix="g", dir=scratch))
    statuses: list = [None] * len(nb.cells)
    events: list = []
    tail = ""
    t0 = time.monotonic()
    try:
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        write_spec(job, level, limits, argv, env, hide)
        for name, data in files.items():
            target = job / "work" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        try:
            asyncio.run(_execute(nb, job, level, limits, statuses, events))
        except DeadKernelError:
            events.append(("kernel_died", -1))
        except RuntimeError as err:  # the kernel never started
            events.append(("kernel_failed", -1))
            nb.metadata["grading_error"] = str(err)[:500]
        if any(kind in ("kernel_died", "kernel_failed") for kind, _ in events):
            tail = _read_tail(job / "kernel.log")
    finally:
        shutil.rmtree(job, ignore_errors=True)
    statuses = ["not_run" if s is None and c.cell_type == "code" and c.source.strip() else s
                for s, c in zip(statuses, nb.cells)]
    return {"statuses": statuses, "events": events, "seconds": round(time.monotonic() - t0, 2), "level": level,
            "limits": asdict(limits), "kernel_log": tail}
