"""Kernel launcher that isolates one learner's code (standard library only: it runs before the kernel).

    python sandbox.py SPEC.json CONNECTION_FILE [KERNEL ARGUMENTS...]

SPEC.json (written by ``grading_cli.execute``) gives the isolation ``level``, the ``view`` (the paths the
kernel may see, read-only or writable), the ``rlimits``, the per-submission ``totals``, a clean ``env``, the
working directory ``cwd`` and the kernel ``argv``. Levels, strongest first:

``full`` (root on Linux): new mount, network and PID namespaces; the kernel runs as ``nobody`` with no
    capabilities and ``no_new_privs``.
``net`` (unprivileged user namespaces, for an instructor without root): new user, mount, network and PID
    namespaces; the kernel runs as an unprivileged id inside them (its capabilities end at ``execve``).
``none``: resource limits, a clean environment and the scratch folder only (needs ``--unsafe``).

At ``full`` and ``net`` the kernel's file system is an allow-list view, not a deny-list: an empty tmpfs
becomes its root (``chroot``), and only the ``view`` paths are bound into it, at their own paths: the
system folders, the Python installation and course_lib read-only, the job folder writable, plus a small
private ``/tmp`` and ``/dev/shm`` and a few devices. The repository, ``solutions/``, the gradebook, the
submissions (folder or zip), other jobs, home folders and every writable host folder (``/tmp``,
``/run/lock``...) simply do not exist in it. A fresh ``/proc`` shows only the namespace's processes. PID 1 of
the namespace is this launcher: when it ends, the kernel and every process the kernel started die with it
(nothing outlives a submission), and while the kernel runs it enforces the per-submission ``totals``:
resident memory of all processes together, the number of processes and the bytes and files written in the
job folder; over a total it kills every process of the namespace and writes which total to ``report``.
On a machine with cgroup v2 the memory and process totals are also set as ``memory.max`` / ``pids.max`` of a
per-job cgroup (the watchdog stays as the fallback, and for the disk total).

Resource limits (``setrlimit`` in the kernel process) apply at every level: address space, CPU seconds,
file size, open files, processes, no core dumps.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
ST_TO_MS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME,
            4096: MS_RELATIME}
DEVICES = ("null", "zero", "full", "random", "urandom")
INNER_ID = 1000  # the kernel's user and group id inside the ``net`` level's user namespace
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


def _bind(source: str, target: str, writable: bool) -> None:
    """Bind ``source`` at ``target`` (a path inside the new root); read-only unless ``writable``."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "w").close()
    _mount(source, target, None, MS_BIND)  # not recursive: mounts below (cgroups under /sys) stay out
    if not writable:  # keep the flags the original mount has (a user namespace may not drop them)
        locked = sum(ms for st, ms in ST_TO_MS.items() if os.statvfs(source).f_flag & st)
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | locked)


def build_view(root: str, view: list[list]) -> None:
    """An empty tmpfs at ``root`` holding only ``view`` ([path, "ro"|"rw"], ...) at their own paths."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755")
    for tmp in ("/tmp", "/dev/shm"):  # private and small; first, so that a job folder under /tmp is bound on top
        os.makedirs(root + tmp, exist_ok=True)
        _mount("tmpfs", root + tmp, "tmpfs", MS_NOSUID | MS_NODEV, "size=256m,mode=1777")
    for path, mode in sorted(view, key=lambda pm: len(pm[0])):
        if not os.path.lexists(path):
            continue
        target = root + path
        if os.path.islink(path):  # /bin -> usr/bin: the link itself (its target is in the view too)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(os.readlink(path), target)
            continue
        _bind(os.path.realpath(path), target, mode == "rw")
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in DEVICES:
        if os.path.exists(f"/dev/{dev}"):
            _bind(f"/dev/{dev}", f"{root}/dev/{dev}", True)
    os.makedirs(root + "/proc", exist_ok=True)
    os.chroot(root)


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


def _pages(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _disk(path: str, cap_files: int) -> tuple[int, int]:
    """(bytes allocated, entries) under ``path``, not following links; stops counting past ``cap_files``."""
    size, count, stack = 0, 0, [path]
    while stack and count <= cap_files:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    count += 1
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    size += st.st_blocks * 512
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
        except OSError:
            continue
    return size, count


def over_total(totals: dict, job: str, page: int) -> str | None:
    """Which per-submission total the namespace's processes exceed now, if any (PID 1 excluded)."""
    pids = [p for p in os.listdir("/proc") if p.isdigit() and p != "1"]
    if totals.get("procs") and len(pids) > totals["procs"]:
        return f"more than {totals['procs']} processes"
    if totals.get("memory") and sum(map(_pages, pids)) * page > totals["memory"]:
        return f"more than {totals['memory'] >> 20} MiB of memory in all processes together"
    if totals.get("disk") or totals.get("files"):
        size, count = _disk(job, totals.get("files") or 10**9)
        if totals.get("disk") and size > totals["disk"]:
            return f"more than {totals['disk'] >> 20} MiB written to the job folder"
        if totals.get("files") and count > totals["files"]:
            return f"more than {totals['files']} files in the job folder"
    return None


def _init(spec: dict, kernel: int, report_fd: int | None) -> None:
    """PID 1 of the namespace: reap, watch the totals, and take every process down with the kernel."""
    totals, job, page = spec.get("totals") or {}, spec["owned"][0], os.sysconf("SC_PAGE_SIZE")
    tick = 0
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid, status = 0, 0
        if pid == kernel:
            _exit_like(status)  # PID 1 exits: the kernel of Linux kills everything left in the namespace
        if pid:
            continue
        time.sleep(0.05)
        tick += 1
        if totals and tick % 5 == 0:
            reason = over_total(totals, job, page) if tick % 20 == 0 else over_total(
                {k: totals[k] for k in ("procs", "memory") if k in totals}, job, page)
            if reason:
                if report_fd is not None:
                    os.write(report_fd, reason.encode())
                os.kill(-1, signal.SIGKILL)
                os._exit(137)


def _cgroup(spec: dict) -> str | None:
    """A cgroup v2 for this job with memory.max / pids.max, this process moved in; None where unavailable."""
    base = "/sys/fs/cgroup"
    totals = spec.get("totals") or {}
    if not os.path.exists(f"{base}/cgroup.controllers") or not totals:
        return None
    try:
        with open("/proc/self/cgroup") as f:
            mine = [ln.split("::", 1)[1].strip() for ln in f if ln.startswith("0::")][0]
        path = os.path.join(base + mine.rstrip("/"), "grading-" + os.path.basename(spec["owned"][0]))
        os.mkdir(path)
        for name, key in (("memory.max", "memory"), ("pids.max", "procs")):
            if totals.get(key):
                with open(os.path.join(path, name), "w") as f:
                    f.write(str(totals[key]))
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        return path
    except (OSError, IndexError):
        return None


def run_isolated(spec: dict, level: str) -> None:
    """``full`` or ``net``: namespaces, the allow-list view, PID 1 with the totals, then the kernel."""
    uid, gid = os.getuid(), os.getgid()
    report_fd = os.open(spec["report"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if spec.get("report") \
        else None
    if level == "full":
        for path in spec.get("owned", []):  # the job's folders become the kernel user's
            _chown_tree(path, NOBODY)
        _cgroup(spec)
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare")
    else:
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare")
        for name, text in (("setgroups", "deny"), ("uid_map", f"{INNER_ID} {uid} 1"),
                           ("gid_map", f"{INNER_ID} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    build_view(spec["root"], spec["view"])
    init = os.fork()
    if init:  # outside the PID namespace: wait for its init and exit with its status
        _exit_like(os.waitpid(init, 0)[1])
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    kernel = os.fork()
    if kernel == 0:
        if report_fd is not None:
            os.close(report_fd)
        _exec_kernel(spec, NOBODY if level == "full" else None)
    _init(spec, kernel, report_fd)


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
        if level in ("full", "net"):
            run_isolated(spec, level)
    except OSError as err:
        print(f"sandbox: level {level!r} is not available here ({err})", file=sys.stderr)
        os._exit(97)
    _exec_kernel(spec, None)


if __name__ == "__main__":
    main(sys.argv)
