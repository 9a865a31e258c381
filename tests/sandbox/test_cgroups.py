"""The per-episode cgroup: what the parent sets, and that agent code cannot leave it."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.models import Limits
from coding_gym.sandbox import cgroups

support = cgroups.probe()
pytestmark = pytest.mark.skipif(not support.version,
                                reason=f"no cgroups here: {support.reason}")

_TREE = ("import os, subprocess, time\n"
         "child = subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
         "time.sleep(0.2)\n"
         "print(os.getpid(), child.pid)")


def _members(controller_dir: str, group: str) -> set[int]:
    with open(os.path.join(controller_dir, group, "cgroup.procs")) as f:
        return {int(line) for line in f if line.strip()}


def _group_of(pid: int, controller: str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if controller in names.split(",") or (not names and support.version == 2):
                return os.path.basename(path)
    raise AssertionError(f"process {pid} is in no {controller} cgroup")


def test_the_episode_and_what_it_starts_share_limited_cgroups(no_leaked_processes):
    with LocalBackend(Limits(memory_mb=300, max_processes=40)) as backend:
        backend.reset()
        worker, child = map(int, backend.run(_TREE).stdout.split())
        group = _group_of(worker, "pids")
        assert group.startswith(f"coding-gym-{os.getpid()}-")
        assert {worker, child} <= _members(support.pids_dir, group)
        assert {worker, child} <= _members(support.memory_dir, group)
        with open(os.path.join(support.pids_dir, group, "pids.max")) as f:
            assert f.read().strip() == "40"
        limit = "memory.limit_in_bytes" if support.version == 1 else "memory.max"
        with open(os.path.join(support.memory_dir, group, limit)) as f:
            assert int(f.read()) == 300 << 20
        if support.cpu_dir:
            # The child started a session of its own: the kernel's grouping by session
            # would have given it a weight of its own; the cgroup keeps it in the episode's.
            assert _group_of(child, "cpu") == group
            assert {worker, child} <= _members(support.cpu_dir, group)
            detail = backend.describe()["isolation"]["cgroup"]["detail"]
            assert "weighing one process among the episodes" in detail


@pytest.mark.skipif(not support.cpu_dir, reason="the cpu controller cannot be written here")
def test_the_episodes_weigh_alike_in_a_group_of_one_normal_process_per_cpu():
    setting, normal = cgroups.CPU_WEIGHT_SETTING[support.version], cgroups.NORMAL_WEIGHT[
        support.version]
    with LocalBackend() as first, LocalBackend() as second:
        first.reset()
        second.reset()
        groups = [_group_of(backend.worker_pid, "cpu") for backend in (first, second)]
        assert groups[0] != groups[1]
        for group in groups:
            with open(os.path.join(support.cpu_dir, group, setting)) as f:
                assert int(f.read()) == normal
            # Every episode is a child of the one group, in every controller.
            for directory in (support.cpu_dir, support.memory_dir, support.pids_dir):
                assert os.path.isdir(os.path.join(directory, group))
    assert os.path.basename(support.cpu_dir) == cgroups.GROUP
    with open(os.path.join(support.cpu_dir, setting)) as f:
        assert int(f.read()) == normal * cgroups.EPISODES_PER_CPU * len(os.sched_getaffinity(0))
    assert not os.path.exists(os.path.join(support.cpu_dir, groups[0]))  # removed


def test_cgroups_left_by_processes_now_gone_are_removed_and_no_other():
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no process has now
    sleeper = subprocess.Popen(["sleep", "30"])
    old = time.time() - 2 * cgroups.ABANDONED_AFTER_S
    group = support.pids_dir
    made = {
        "abandoned": (group, f"coding-gym-{gone.pid}-0", old),
        "beside the group": (os.path.dirname(group), f"coding-gym-{gone.pid}-1", old),
        "just made": (group, f"coding-gym-{gone.pid}-2", None),
        "of a live process": (group, f"coding-gym-{os.getpid()}-99999", old),
        "holding a process": (group, f"coding-gym-{gone.pid}-3", old),
        "not an episode's": (group, f"coding-gym-{gone.pid}", old),
    }
    try:
        for directory, name, _ in made.values():
            os.mkdir(os.path.join(directory, name))
        with open(os.path.join(group, made["holding a process"][1], "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        for directory, name, mtime in made.values():
            if mtime is not None:
                os.utime(os.path.join(directory, name), (mtime, mtime))
        assert cgroups._group_in(os.path.dirname(group)) == group  # as probe() calls it
        left = {what for what, (directory, name, _) in made.items()
                if os.path.isdir(os.path.join(directory, name))}
        assert left == {"just made", "of a live process", "holding a process",
                        "not an episode's"}
    finally:
        sleeper.kill()
        sleeper.wait()
        for directory, name, _ in made.values():
            path = os.path.join(directory, name)
            while os.path.isdir(path):
                try:
                    os.rmdir(path)
                except OSError:
                    time.sleep(0.01)  # the sleeper's exit is not over yet


def _in_all_its_cgroups(backend: LocalBackend) -> bool:
    worker = int(backend.run("import os; print(os.getpid())").stdout)
    group = _group_of(worker, "pids")
    dirs = [support.pids_dir, support.memory_dir, *([support.cpu_dir] if support.cpu_dir else [])]
    return all(worker in _members(directory, group) for directory in dirs)


@pytest.fixture
def moved(monkeypatch) -> list[int]:
    """The pids the parent moves into a cgroup (``Cgroup.add``), which still moves them."""
    pids: list[int] = []
    add = cgroups.Cgroup.add
    monkeypatch.setattr(cgroups.Cgroup, "add", lambda self, pid: (pids.append(pid),
                                                                    add(self, pid)))
    return pids


@pytest.mark.skipif(support.version != 1, reason="a worker joins by itself on cgroup v1 only")
def test_a_worker_from_the_zygote_joins_its_cgroups_by_itself(moved):
    # Moving a pid into cgroup.procs stalls every fork on the machine; writing "0" to the
    # tasks file from inside does not (Cgroup.joining_fds).
    with LocalBackend() as backend:
        backend.reset()
        assert _in_all_its_cgroups(backend)
        backend.run("import os; os._exit(1)")  # its successor joins the same way
        assert _in_all_its_cgroups(backend)
    assert moved == []


@pytest.mark.skipif(support.version != 1, reason="a worker joins by itself on cgroup v1 only")
def test_a_worker_that_cannot_join_by_itself_is_moved_by_the_parent(moved, monkeypatch):
    # Files it cannot write to: the worker says it did not join.
    monkeypatch.setattr(cgroups.Cgroup, "joining_fds",
                        lambda self: [os.open(os.devnull, os.O_RDONLY) for _ in range(3)])
    with LocalBackend() as backend:
        backend.reset()
        assert _in_all_its_cgroups(backend)
        assert len(moved) == 1
