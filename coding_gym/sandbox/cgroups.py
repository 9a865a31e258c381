"""A memory, pids and (where it can be had) cpu cgroup per worker, created and removed by
the parent.

The pids cgroup is the only process cap that binds root (RLIMIT_NPROC does not), so it is what
contains a fork bomb. It also gives a complete list of the worker's processes to kill, even
those that left its process group. Every episode's cgroup is made in one group of the
episodes, ``coding-gym``, made beside the parent in the parent's own cgroup (see
:func:`probe`). In the cpu controller that group weighs as much as :data:`EPISODES_PER_CPU`
normal processes per CPU, and within it the episodes weigh alike: all the sandboxed code
competes with the caller, and with the machine's other programs, as a few normal processes
per CPU would, and each episode, whatever it starts (sessions, forks), as one process among
the episodes. Both cgroup v1 and v2 are handled; where neither can be written (an
unprivileged user, a default Docker container), :func:`probe` says why and the worker runs
without one.

Why not the lowest weight for each episode (that of a nice-19 process), as before: it put the
episodes below every other process of the machine, and their wake-ups waited for the
scheduler's tick behind any busy one. 8 envs of a vector env stepping ``print(1)`` on two
CPUs made 1.3k steps/s beside two busy normal processes and 1.9k beside one busy idle-priority
process, against 10k and 15k with the group of the episodes, and ``AsyncVectorEnv`` over the
same envs made 3.1k beside the idle-priority one.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from functools import lru_cache

logger = logging.getLogger(__name__)

_ROOT = "/sys/fs/cgroup"
_counter = itertools.count()


@dataclass(frozen=True)
class CgroupSupport:
    """Where per-worker cgroups can be made: ``version`` 1 or 2, or 0 with the ``reason``."""

    version: int
    memory_dir: str = ""
    pids_dir: str = ""
    reason: str = ""
    #: Where the cpu controller can be used too ("" where it cannot).
    cpu_dir: str = ""


#: The name of the group of the episodes, in each controller's directory of the parent.
GROUP = "coding-gym"
#: The CPU weight setting and the weight of a normal process, by cgroup version.
CPU_WEIGHT_SETTING = {1: "cpu.shares", 2: "cpu.weight"}
NORMAL_WEIGHT = {1: 1024, 2: 100}
#: The weight of the group of the episodes, in normal processes per CPU. Against the
#: parent's one process, what the episodes get when both want a CPU: 8 envs of a vector env
#: stepping ``print(1)`` on two CPUs made 65%, 69-75%, 74-79%, 79-82%, 81-85% and 81-85% of
#: the raw ceiling with 1/8, 1/2, 1, 2, 4 and 16 (in turns, two runs): the parent's turn
#: comes after its workers'. With 4, the parent keeps a fifth of its CPU however busy the
#: episodes are.
EPISODES_PER_CPU = 4
_MAX_WEIGHT = {1: 262144, 2: 10000}


def _own_paths() -> dict[str, str]:
    """Controller name (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


def _writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK)


@lru_cache(maxsize=1)
def probe() -> CgroupSupport:
    """Find out once per process whether per-worker cgroups can be created here, and make
    the group of the episodes (:data:`GROUP`) if need be."""
    try:
        paths = _own_paths()
    except OSError as e:
        return CgroupSupport(0, reason=f"cannot read /proc/self/cgroup: {e}")
    memory_v1 = os.path.join(_ROOT, "memory") + paths.get("memory", "/")
    pids_v1 = os.path.join(_ROOT, "pids") + paths.get("pids", "/")
    if "memory" in paths and "pids" in paths:
        if not (_writable_dir(memory_v1) and _writable_dir(pids_v1)):
            return CgroupSupport(0, reason=f"cgroup v1 directories not writable ({pids_v1})")
        cpu_v1 = os.path.join(_ROOT, "cpu") + paths.get("cpu", "/")
        try:
            memory_dir, pids_dir = _group_in(memory_v1), _group_in(pids_v1)
        except OSError as e:
            return CgroupSupport(0, reason=f"cannot make the group of the episodes: {e}")
        cpu_dir = ""
        if "cpu" in paths and _writable_dir(cpu_v1):
            try:
                cpu_dir = _weighed(_group_in(cpu_v1), 1)
            except OSError:
                pass  # the cpu controller is optional
        return CgroupSupport(1, memory_dir=memory_dir, pids_dir=pids_dir, cpu_dir=cpu_dir)
    if os.path.exists(os.path.join(_ROOT, "cgroup.controllers")):
        base = os.path.join(_ROOT, paths.get("", "/").lstrip("/"))
        try:
            # The "no internal processes" rule refuses controllers below a cgroup that holds
            # processes, and a non-delegated cgroup is not ours to write. The group of the
            # episodes holds none: it passes the controllers on to theirs.
            write_file(os.path.join(base, "cgroup.subtree_control"), b"+memory +pids")
            group = _group_in(base)
            write_file(os.path.join(group, "cgroup.subtree_control"), b"+memory +pids")
        except OSError as e:
            return CgroupSupport(
                0, reason=f"cgroup v2 controllers cannot be enabled in {base}: {e}"
            )
        try:
            for directory in (base, group):
                write_file(os.path.join(directory, "cgroup.subtree_control"), b"+cpu")
            cpu_v2 = _weighed(group, 2)
        except OSError:
            cpu_v2 = ""  # a real-time process outside the root cgroup refuses it, say
        return CgroupSupport(2, memory_dir=group, pids_dir=group, cpu_dir=cpu_v2)
    return CgroupSupport(0, reason="no cgroup memory and pids controllers are mounted")


def _group_in(directory: str) -> str:
    """The group of the episodes in ``directory`` (one controller's cgroup of the parent),
    made if it is not there yet. It stays: other processes' episodes may be in it. The
    cgroups that processes now gone left in it, or beside it (where episodes were made
    before the group), are removed on the way."""
    group = os.path.join(directory, GROUP)
    os.makedirs(group, exist_ok=True)
    for place in (directory, group):
        remove_abandoned(place)
    return group


#: An episode's cgroup: ``coding-gym-<pid of the process that made it>-<count>``.
_EPISODE_NAME = re.compile(r"coding-gym-(\d+)-\d+")
#: How old an abandoned cgroup must be before it is removed: one made a moment ago may be
#: another pid namespace's, whose process this one cannot see, about to move a worker in.
ABANDONED_AFTER_S = 60.0


def remove_abandoned(directory: str) -> list[str]:
    """Remove the episodes' cgroups in ``directory`` whose maker is gone (killed before it
    could remove them: ``SIGKILL``, the OOM killer): empty cgroups still cost the kernel
    memory. A cgroup that holds a process is never removed (the kernel refuses), nor one of
    a live pid, nor one younger than :data:`ABANDONED_AFTER_S`. Returns the names removed."""
    from coding_gym.sandbox.processes import pid_alive  # which imports this module

    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        match = _EPISODE_NAME.fullmatch(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.stat(path).st_mtime < ABANDONED_AFTER_S:
                continue
            os.rmdir(path)
        except OSError:
            continue
        removed.append(name)
    return removed


def _weighed(group: str, version: int) -> str:
    """``group``, the group of the episodes in the cpu controller, once it weighs
    :data:`EPISODES_PER_CPU` normal processes per CPU of this process; "" if its weight
    cannot be written."""
    weight = min(NORMAL_WEIGHT[version] * EPISODES_PER_CPU * len(os.sched_getaffinity(0)),
                 _MAX_WEIGHT[version])
    try:
        write_file(os.path.join(group, CPU_WEIGHT_SETTING[version]), b"%d" % weight)
    except OSError:
        return ""
    return group


def layer_report(requested: bool, group: Cgroup | None) -> dict[str, object]:
    """The cgroup layer's entry in a worker's isolation report."""
    if not requested:
        return {"active": False, "detail": "turned off"}
    if group is None:
        return {"active": False, "detail": probe().reason or "the cgroup could not be created"}
    support = probe()
    weight = (", all its processes together weighing one process among the episodes"
              if support.cpu_dir else "")
    return {"active": True, "detail": f"cgroup v{support.version}: memory and pids limits"
            f"{weight}, every process of the episode killed with it"}


class Cgroup:
    """The cgroup(s) of one worker. Use :meth:`create`; it returns None where unsupported."""

    def __init__(self, support: CgroupSupport, name: str) -> None:
        self._support = support
        self._memory = os.path.join(support.memory_dir, name)
        self._pids = os.path.join(support.pids_dir, name)
        self._cpu = os.path.join(support.cpu_dir, name) if support.cpu_dir else ""
        self._dirs = sorted({self._memory, self._pids, self._cpu} - {""})

    @classmethod
    def create(cls, memory_bytes: int, pids_max: int) -> Cgroup | None:
        support = probe()
        if not support.version:
            return None
        group = cls(support, f"coding-gym-{os.getpid()}-{next(_counter)}")
        try:
            for path in group._dirs:
                os.makedirs(path, exist_ok=True)
            if support.version == 1:
                group._write(group._memory, "memory.limit_in_bytes", memory_bytes)
                group._write(group._memory, "memory.memsw.limit_in_bytes", memory_bytes,
                             optional=True)
            else:
                group._write(group._memory, "memory.max", memory_bytes)
                group._write(group._memory, "memory.swap.max", 0, optional=True)
            group._write(group._pids, "pids.max", pids_max)
        except OSError as e:
            logger.warning("could not set up a cgroup for the worker: %s", e)
            group.remove()
            return None
        return group

    @staticmethod
    def _write(directory: str, name: str, value: int, optional: bool = False) -> None:
        try:
            write_file(os.path.join(directory, name), b"%d" % value)
        except OSError:
            if not optional:
                raise

    def add(self, pid: int) -> None:
        """Move ``pid`` into the cgroup (before it runs any untrusted code); a failure is
        logged, as the worker can run without it."""
        try:
            for path in self._dirs:
                write_file(os.path.join(path, "cgroup.procs"), b"%d" % pid)
        except OSError as e:
            logger.warning("could not move the worker into its cgroup: %s", e)

    def joining_fds(self) -> list[int]:
        """The ``tasks`` file of each of the cgroup's directories, open for writing, for a
        worker to join it itself (cgroup v1 only; [] elsewhere, or if one cannot be opened).

        A process that writes "0" there moves its own thread without the kernel's global
        lock against forks (``cgroup_threadgroup_rwsem``), which a parent moving a pid into
        ``cgroup.procs`` takes for writing: then every fork on the machine waits for the move,
        and the move for every fork in flight. Under a soak's load (fork bombs, interpreters
        replaced by the dozen each second) the zygote's forks waited seconds for it.
        """
        if self._support.version != 1:
            return []
        fds: list[int] = []
        try:
            for path in self._dirs:
                fds.append(os.open(os.path.join(path, "tasks"), os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            return []
        return fds

    def pids(self) -> list[int]:
        try:
            return [int(line) for line in read_file(os.path.join(self._pids, "cgroup.procs"))
                    .split()]
        except OSError:
            return []

    def cpu_weight(self) -> int | None:
        """The episode's CPU weight (``cpu.shares`` or ``cpu.weight``); None without a cpu
        cgroup."""
        if not self._cpu:
            return None
        try:
            return int(read_file(os.path.join(self._cpu,
                                              CPU_WEIGHT_SETTING[self._support.version])))
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        """How many processes of this cgroup the kernel's OOM killer has killed so far."""
        name = "memory.oom_control" if self._support.version == 1 else "memory.events"
        try:
            for line in read_file(os.path.join(self._memory, name)).splitlines():
                key, _, value = line.partition(b" ")
                if key == b"oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def kill(self) -> None:
        """SIGKILL every process of the cgroup, without waiting for them to exit.

        A process with SIGKILL pending can no longer fork, so once a scan finds no pid that
        was not signalled yet, the cgroup cannot grow again. Waiting for the exits is left to
        :meth:`remove`: a process asleep in the kernel (memory reclaim waiting for dirty pages
        to be written back, say) can take most of a second to die, and a step must not.
        """
        if self._support.version == 2:
            try:
                self._write(self._pids, "cgroup.kill", 1)
                return
            except OSError:
                pass  # before Linux 5.14: signal them one by one
        self._signal_all(signal.SIGKILL)

    def stop(self) -> None:
        """SIGSTOP every process of the cgroup: none runs again (a stopped process cannot
        fork either) until :meth:`kill` ends them."""
        self._signal_all(signal.SIGSTOP)

    def _signal_all(self, signum: int) -> None:
        """Send ``signum`` to every process, until a scan finds none not signalled yet."""
        signalled: set[int] = set()
        while True:
            fresh = [pid for pid in self.pids() if pid not in signalled]
            if not fresh:
                return
            for pid in fresh:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            signalled.update(fresh)

    def remove(self, timeout_s: float = 10.0) -> None:
        """Remove the cgroup once its last process has exited, killing stragglers again.

        A fork that was under way during :meth:`kill` may still add a process, and a dying
        one may linger in the kernel; both are waited for (up to ``timeout_s``), so no
        directory is left behind. Safe to call twice.
        """
        end = time.monotonic() + timeout_s
        pause = 0.0005
        for path in self._dirs:
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if time.monotonic() > end:
                        logger.warning("cgroup %s still busy after %g s: %s", path, timeout_s, e)
                        break
                for pid in self.pids():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(pause)
                pause = min(pause * 2, 0.02)


# Plain system calls: the files are read and written at every reset and step, and open()
# builds a buffered, decoding file object for each (~30 us apiece, most of a reset's work
# on cgroups).
def read_file(path: str) -> bytes:
    """The whole content of a (kernel) file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_file(path: str, data: bytes) -> None:
    """One write of ``data`` to a (kernel) file, which takes it whole or fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
