"""Finding and killing a worker's whole process tree, in the parent."""

from __future__ import annotations

import os
import signal
from collections.abc import Collection

from coding_gym.sandbox.cgroups import write_file


def _parent_pids() -> dict[int, int]:
    """Map every live pid to its parent pid, read from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: parse after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        parents[int(entry)] = int(fields[1])
    return parents


def _children(pid: int) -> list[int] | None:
    """Children of ``pid`` from /proc/PID/task/*/children; None where the kernel lacks them."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    except OSError:
        return None
    found: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                found.extend(int(child) for child in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{task}"):
                continue  # the thread just ended
            return None  # CONFIG_PROC_CHILDREN is off
        except OSError:
            continue
    return found


def descendants(root: int, spare: Collection[int] = ()) -> list[int]:
    """Pids below ``root`` in the process tree (not ``root`` itself), parents first, leaving
    out the pids in ``spare`` and everything below them."""
    # Walking down from the root costs O(its subtree); scanning /proc costs O(every process).
    found: list[int] = []
    frontier = [root]
    while frontier:
        children_of = _children(frontier.pop())
        if children_of is None:
            return _descendants_by_scan(root, spare)
        children_of = [child for child in children_of if child not in spare]
        found.extend(children_of)
        frontier.extend(children_of)
    return found


def _descendants_by_scan(root: int, spare: Collection[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _parent_pids().items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child in children.get(pid, ()):
            if child not in spare:
                found.append(child)
                frontier.append(child)
    return found


def kill_tree(root: int, pgid: int | None = None, rounds: int = 20,
              spare: Collection[int] = ()) -> None:
    """SIGKILL every descendant of ``root`` but those in ``spare`` (with what is below them),
    then ``root`` and its process group.

    The root is stopped first and killed last: it is a child subreaper, so while it lives the
    orphans of killed descendants re-parent to it and stay visible. A fork bomb may add
    processes while we kill, hence the rounds.
    """
    if root <= 1:
        # Everything descends from init: a bogus pid must not take the machine down.
        raise ValueError(f"refusing to kill the process tree of pid {root}")
    _signal(root, signal.SIGSTOP)
    for _ in range(rounds):
        # Killed children stay zombies under the stopped root: they are done with.
        pids = [pid for pid in descendants(root, spare) if not _is_zombie(pid)]
        if not pids:
            break
        for pid in pids:
            _signal(pid, signal.SIGKILL)
    _signal(root, signal.SIGKILL)
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True  # gone
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] in (b"Z", b"X")


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` in kB, or 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def restore_session_weight(pid: int) -> None:
    """Give the scheduling group of ``pid``'s session its normal CPU weight back.

    A worker lowers its session's weight (see ``isolation.py``); called just before the
    worker is killed, so that its processes die and free their memory at once instead of
    waiting for the CPU behind every other episode's code, while the episode's next
    interpreter starts in the same cgroup. Best effort: where the kernel does not group
    sessions, or refuses, nothing changes.
    """
    try:
        write_file(f"/proc/{pid}/autogroup", b"0")
    except OSError:
        pass
