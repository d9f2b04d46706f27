"""Kernel launcher that isolates one learner's code (standard library only: it runs before the kernel).

    python sandbox.py SPEC.json CONNECTION_FILE [KERNEL ARGUMENTS...]

SPEC.json (written by ``grading_cli.execute``) gives the isolation ``level``, the paths to ``hide`` and
``keep``, the ``rlimits``, a clean ``env``, the working directory ``cwd`` and the kernel ``argv``.
Levels, strongest first:

``full`` (root on Linux): new network, mount and PID namespaces. Every path in ``hide`` (the repository,
    the gradebook, the submissions, the temp folders, the home folder) is covered by an empty tmpfs;
    every path in ``keep`` (the Python installation, course_lib, this job's folder) is bound back, so the
    kernel sees the released notebook, the learner's files and the interpreter, nothing else. A fresh
    /proc shows only the kernel's own processes. The kernel then runs as ``nobody`` with no capabilities
    (it cannot unmount the covers) and ``no_new_privs``.
``net`` (unprivileged user namespaces): new user + network namespace. No network, but files are visible.
``none``: resource limits, a clean environment and the scratch folder only.

Resource limits (``setrlimit`` in the kernel process) apply at every level: address space, CPU seconds,
file size, open files, no core dumps (and processes where the kernel is not root).
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
NOBODY = 65534
LIMITS = {"as": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU, "fsize": resource.RLIMIT_FSIZE,
          "nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC, "core": resource.RLIMIT_CORE}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    def enc(s):
        return s.encode() if s is not None else None

    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def cover_and_keep(hide: list[str], keep: list[str]) -> None:
    """Cover each ``hide`` path with an empty tmpfs, then bind every ``keep`` path back where it was."""
    keep = [os.path.realpath(k) for k in keep if os.path.exists(k)]
    hide = sorted({os.path.realpath(h) for h in hide if os.path.isdir(h)}, key=len)
    hide = [h for i, h in enumerate(hide) if h != "/" and not any(_under(h, o) for o in hide[:i])]
    hide = [h for h in hide if h not in keep]
    fds = {k: os.open(k, os.O_PATH) for k in keep if any(_under(k, h) for h in hide)}
    for h in hide:
        _mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=755")
    for k, fd in sorted(fds.items(), key=lambda kv: len(kv[0])):
        os.makedirs(k, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", k, None, MS_BIND | MS_REC)
        os.close(fd)


def set_limits(limits: dict) -> None:
    for name, value in limits.items():
        if value is None or name not in LIMITS:
            continue
        value = int(value)
        try:
            resource.setrlimit(LIMITS[name], (value, value))
        except (ValueError, OSError):
            soft, hard = resource.getrlimit(LIMITS[name])
            resource.setrlimit(LIMITS[name], (min(value, hard) if hard != resource.RLIM_INFINITY else value, hard))


def _chown_tree(path: str, uid: int) -> None:
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, uid)
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, uid)


def _exec_kernel(spec: dict, drop_to: int | None) -> None:
    """Limits, identity, directory, clean environment; then become the kernel (never returns)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    set_limits(spec.get("rlimits", {}))
    if drop_to is not None:
        os.setgroups([])
        os.setgid(drop_to)
        os.setuid(drop_to)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.chdir(spec["cwd"])
    os.umask(0o022)
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


def _exit_like(status: int) -> None:
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


def run_full(spec: dict) -> None:
    for path in spec.get("owned", []):  # the job's folders become the kernel user's
        _chown_tree(path, NOBODY)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    cover_and_keep(spec["hide"], spec["keep"])
    init = os.fork()
    if init:  # outside the PID namespace: wait for its init and exit with its status
        _exit_like(os.waitpid(init, 0)[1])
    # PID 1 of the new namespace: a fresh /proc, then the kernel as PID 2; reap until it exits.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV)
    kernel = os.fork()
    if kernel == 0:
        _exec_kernel(spec, NOBODY)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == kernel:
            _exit_like(status)


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit("usage: sandbox.py SPEC.json CONNECTION_FILE [KERNEL ARGUMENTS...]")
    with open(argv[1]) as f:
        spec = json.load(f)
    spec["argv"] = [a.replace("{connection_file}", argv[2]) for a in spec["argv"]] + argv[3:]
    level = spec.get("level", "none")
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the grader died: so do we
    if spec.get("log"):  # the kernel's own stdout/stderr (not the notebook's outputs) go to a file
        fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    try:
        if level == "full":
            os.chown(argv[2], NOBODY, NOBODY)
            run_full(spec)
        elif level == "net":
            _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNET), "unshare")
    except OSError as err:
        print(f"sandbox: level {level!r} is not available here ({err})", file=sys.stderr)
        os._exit(97)
    _exec_kernel(spec, None)


if __name__ == "__main__":
    main(sys.argv)
