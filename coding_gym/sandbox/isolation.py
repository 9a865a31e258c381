"""The isolation of a sandbox worker: one call, :func:`apply`, before any agent code runs.

The parent describes what it wants with :func:`worker_config` (a JSON-able dict); the worker,
just started or just forked, passes it to :func:`apply`, which applies every layer that is on
and that the machine allows, in this order:

1. ``network`` and ``filesystem``: new network, mount and IPC namespaces (``walls.py``),
   entered ahead of time by a zygote's spare child;
2. ``user``: the episode's own unprivileged uid (``uids.py``), after the imports and mounts
   that need root;
3. ``rlimits``: memory, file size, open files, processes, core dumps;
4. ``seccomp``: the system call filter (``seccomp.py``), last, as it forbids the calls above.

Each layer that cannot be applied is skipped and the returned report says why; with
``strict`` the worker refuses to start instead. The parent adds the one layer a process cannot
apply to itself, the cgroup (``cgroups.py``), and the wall-clock kill.

Runs inside the worker: standard library only.
"""

from __future__ import annotations

import base64
import os
import resource
import sys
from collections.abc import Mapping
from typing import Any

from coding_gym.sandbox import seccomp, uids, walls
from coding_gym.sandbox.libc import libc
from coding_gym.sandbox.walls import Report

_MB = 1024 * 1024
_NICE = 19
#: /proc/self/autogroup, opened by :func:`hold_session_priority` (-1: not there).
_autogroup: int | None = None

#: Layers applied inside the worker, in the order of :func:`apply`; the parent adds "cgroup".
WORKER_LAYERS = ("network", "filesystem", "user", "rlimits", "seccomp")

#: Variables the worker's environment keeps from the parent: nothing secret, and needed for
#: numerical libraries to run correctly on some CPUs.
_PASSED_THROUGH = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "TZ")

#: One thread for BLAS/OpenMP pools: a worker is one CPU's worth of work, and a pool per worker
#: would oversubscribe the machine when many envs run at once.
_ONE_THREAD = {
    name: "1"
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")
}

class IsolationError(RuntimeError):
    """A layer that was asked for could not be applied, and the config is strict."""


def worker_environment(workdir: str) -> dict[str, str]:
    """A scrubbed environment: no variables of the parent beyond a short allow-list."""
    bin_dir = os.path.dirname(sys.executable)
    env = {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MPLBACKEND": "Agg",
        **_ONE_THREAD,
    }
    for name in _PASSED_THROUGH:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def worker_config(layers: Mapping[str, bool], limits: Mapping[str, Any], workdir: str, *,
                  uid: int | None = None, strict: bool = False,
                  forked_by: int | None = None) -> dict[str, Any]:
    """What the parent sends to :func:`apply`: layers on/off, limits, directory, leased uid.

    The seccomp filter is compiled here, once per parent process, and travels in the config:
    compiling costs milliseconds, loading a compiled program a few microseconds. It refuses
    signals to this process and its ancestors, which are the worker's ancestors too, and to
    ``forked_by``, the zygote that will be the worker's parent: a worker that shares its uid
    could otherwise kill the zygote, and with it every episode's exit reports.

    Args:
        layers: Layer name -> on, as :meth:`coding_gym.models.Isolation.layers` gives it.
        limits: ``memory_mb``, ``max_file_mb``, ``max_open_files`` and ``max_processes``.
        workdir: The episode's directory (it must exist).
        uid: The uid leased for the episode (:class:`uids.UidLease`), or None without one.
        strict: Make :func:`apply` raise when a layer that is on cannot be applied.
        forked_by: The pid of the zygote that forks the worker, if one does.
    """
    on = {name: bool(layers.get(name, True)) for name in WORKER_LAYERS}
    config: dict[str, Any] = {
        "layers": on,
        "limits": {name: int(limits[name]) for name in
                   ("memory_mb", "max_file_mb", "max_open_files", "max_processes")},
        "workdir": os.path.abspath(workdir),
        "uid": uid,
        "strict": strict,
    }
    if on["user"] and isinstance(uid, int) and uid > 0 and os.geteuid() == 0:
        config["uid_error"] = _give_workdir(config["workdir"], uid)
    if on["seccomp"]:
        try:
            protected = (os.getpid(), *seccomp.protected_pids(),
                         *(() if forked_by is None else (forked_by,)))
            program = seccomp.compile_filter(on["network"], protected)
            config["seccomp"] = {"program": base64.b64encode(program).decode("ascii")}
        except OSError as e:
            config["seccomp"] = {"error": str(e)}
    return config


def _give_workdir(workdir: str, uid: int) -> str:
    """Make ``uid`` the owner of the episode directory; what went wrong, or "".

    Here, in the parent: a worker may start in namespaces built ahead, where the directory
    is already on a read-only mount.
    """
    try:
        # Through an O_NOFOLLOW handle: code of an earlier worker of the episode may have
        # swapped the directory for a symbolic link to something root owns.
        fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchown(fd, uid, uid)
        finally:
            os.close(fd)
    except OSError as e:
        return f"could not give the episode directory to uid {uid}: {e}"
    return ""


def prepare() -> None:
    """Do ahead of time what :func:`apply` would otherwise compute in every worker.

    A parent that forks workers calls this once before forking.
    """
    walls.python_paths()
    libc()


def apply(config: Mapping[str, Any], built: walls.Walls | None = None) -> Report:
    """Apply every layer of ``config`` that is on; return layer -> {active, detail}.

    Call once, in the worker, while it is single-threaded and before any agent code runs.
    ``built``: the namespaces this process entered already (:func:`walls.build`), which must
    be the kind ``config`` asks for.
    """
    layers: Mapping[str, bool] = config["layers"]
    report: Report = {}
    become_subreaper()
    hold_session_priority()
    if built is not None and built.kind != walls.kind_of(config):
        raise IsolationError(f"namespaces built for (network, filesystem) = {built.kind}, "
                             f"but the episode asks for {walls.kind_of(config)}")

    uid = _leased_uid(config, report)
    hidden = walls.unreachable_roots() if uid is not None else []
    if uid is not None and hidden and not layers["filesystem"]:
        _off(report, "user", f"Python lives under {', '.join(hidden)}, which other users "
             "cannot enter; turn the filesystem layer on (it shows the worker only the "
             "interpreter's directories there) or install Python where every user can read it")
        uid = None

    report.update(walls.finish(config, hidden, built or walls.build(*walls.kind_of(config))))
    # Before the uid changes: only a privileged caller may set it whenever it likes.
    session_nice = _lower_session_priority(layers["rlimits"])

    if uid is not None:
        try:
            uids.drop(uid)
        except OSError as e:
            _off(report, "user", f"could not switch to uid {uid}: {e}")
        else:
            os.environ["USER"] = os.environ["LOGNAME"] = "sandbox"
            _on(report, "user", f"uid and gid {uid} (the episode's own), no supplementary "
                "groups, no capabilities")

    if not layers["rlimits"]:
        _off(report, "rlimits", "turned off")
    else:
        try:
            detail = _apply_rlimits(config["limits"], own_uid=report["user"]["active"])
            detail += session_nice
            _on(report, "rlimits", detail)
        except (OSError, ValueError) as e:
            _off(report, "rlimits", f"setrlimit failed: {e}")

    _apply_seccomp(config, report)

    failed = [f"{name} ({report[name]['detail']})" for name in WORKER_LAYERS
              if layers[name] and not report[name]["active"]]
    if failed and config.get("strict"):
        raise IsolationError("isolation is strict, and these layers could not be applied: "
                             + "; ".join(failed))
    return {name: report[name] for name in WORKER_LAYERS}


def _on(report: Report, name: str, detail: str) -> None:
    report[name] = walls.layer(True, detail)


def _off(report: Report, name: str, detail: str) -> None:
    report[name] = walls.layer(False, detail)


def _leased_uid(config: Mapping[str, Any], report: Report) -> int | None:
    """The uid to switch to once the namespaces are built, or None (and why, in the report)."""
    uid = config.get("uid")
    if not config["layers"]["user"]:
        _off(report, "user", "turned off")
    elif os.geteuid() != 0:
        _off(report, "user", f"not running as root: the worker keeps uid {os.geteuid()}, so "
             "its code can signal and read other processes of that user")
    elif not isinstance(uid, int) or uid <= 0:
        _off(report, "user", "the parent leased no uid for the episode")
    elif config.get("uid_error"):
        _off(report, "user", config["uid_error"])
    else:
        return uid
    return None


def _apply_seccomp(config: Mapping[str, Any], report: Report) -> None:
    layers = config["layers"]
    if not layers["seccomp"]:
        _off(report, "seccomp", "turned off")
        return
    compiled = config.get("seccomp") or {"error": "the parent sent no seccomp program"}
    try:
        if "program" not in compiled:
            raise seccomp.SeccompUnavailable(compiled.get("error", "no program"))
        seccomp.load(base64.b64decode(compiled["program"]))
    except (OSError, ValueError) as e:
        _off(report, "seccomp", str(e))
        return
    denied = "ptrace, mount, namespaces, bpf, io_uring, keyrings, modules, reboot and more"
    if layers["network"]:
        denied = "sockets other than AF_UNIX, " + denied
        if not report["network"]["active"]:
            # The second wall holds where the first could not be built.
            _on(report, "network", "no network namespace, but the seccomp filter refuses "
                f"every socket other than AF_UNIX ({report['network']['detail']})")
    _on(report, "seccomp", "denied: " + denied + "; signals to the parent refused")


def _set_limit(kind: int, value: int) -> None:
    """Lower a resource limit; never try to raise a hard limit above what we were given."""
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def hold_session_priority() -> None:
    """Open, while /proc is still writable, what :func:`apply` lowers the CPU weight of the
    worker's session through once the session exists (the filesystem layer mounts /proc
    read-only). For a process that will become a worker; a second call keeps the first."""
    global _autogroup
    if _autogroup is None:
        _autogroup = -1  # no automatic grouping here: nice alone applies
        try:
            with open("/proc/sys/kernel/sched_autogroup_enabled", "rb") as f:
                if f.read().strip() == b"1":
                    _autogroup = os.open("/proc/self/autogroup", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            pass


def _lower_session_priority(lower: bool) -> str:
    """Give the worker's session the lowest CPU weight (if ``lower``); a note for the
    report, or "".

    With automatic process grouping (``kernel.sched_autogroup_enabled``, on by default in
    most distributions) the scheduler shares the CPUs among sessions first and looks at nice
    values only within one, so every worker, in a session of its own, would weigh as much as
    the parent and the zygote together, whatever its nice: the fork bombs and endless loops
    of a few episodes would starve the process that replaces their interpreters. Copies of
    the worker stay in its session (and group). A process still in the kernel's default
    group (that of init's session, which has no group of its own) reads the file empty:
    nothing is written there.
    """
    global _autogroup
    fd, _autogroup = _autogroup, None
    if fd is None or fd < 0:
        return ""
    try:
        if not lower:
            return ""
        # Never lower the group of a session that is not the worker's own.
        if os.getsid(0) != os.getpid() or not os.read(fd, 128).strip():
            return ""
        os.write(fd, str(_NICE).encode())
    except OSError:
        return ""
    finally:
        os.close(fd)
    return f", nice {_NICE} for its session's scheduling group"


def _apply_rlimits(limits: Mapping[str, Any], own_uid: bool) -> str:
    """Address space, file size, open files, core dumps and processes; says what was set."""
    _set_limit(resource.RLIMIT_AS, int(limits["memory_mb"]) * _MB)
    _set_limit(resource.RLIMIT_FSIZE, int(limits["max_file_mb"]) * _MB)
    _set_limit(resource.RLIMIT_NOFILE, int(limits["max_open_files"]))
    _set_limit(resource.RLIMIT_CORE, 0)
    # The lowest CPU priority: the parent that enforces deadlines (and the learner beside
    # it) must never wait for the CPU behind a fork bomb's spinning children. An
    # unprivileged process cannot raise it again.
    os.setpriority(os.PRIO_PROCESS, 0, _NICE)
    detail = f"address space, file size, open files, no core dumps, nice {_NICE}"
    # RLIMIT_NPROC counts every task of the real uid and does not bind root. With the
    # episode's own uid it is an exact cap; with the caller's uid it can only be set above
    # what that user already runs. The pids cgroup is the cap that binds root.
    if own_uid:
        _set_limit(resource.RLIMIT_NPROC, int(limits["max_processes"]))
        detail += ", processes of the episode's uid"
    elif os.geteuid() != 0:
        _set_limit(resource.RLIMIT_NPROC, _tasks_of(os.getuid()) + int(limits["max_processes"]))
        detail += ", processes (counted with the user's other processes)"
    return detail


def _tasks_of(uid: int) -> int:
    """Threads of every process of ``uid``: what RLIMIT_NPROC counts."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                pass
    return count


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to the worker, so the parent can still find them."""
    try:
        pr_set_child_subreaper = 36
        return bool(libc().prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False
