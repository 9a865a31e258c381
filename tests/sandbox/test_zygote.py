"""The zygote: workers forked from it are fresh, isolated from each other, limited and reaped."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.models import Limits
from coding_gym.sandbox import isolation, spare, zygote, zygote_loop
from tests.helpers import descendant_pids, process_name


def _backend(**kwargs) -> LocalBackend:
    backend = LocalBackend(Limits(timeout_s=5.0), **kwargs)
    backend.reset()
    return backend


def test_workers_come_from_the_zygote():
    with _backend() as backend:
        found = zygote.get()
        assert found is not None
        assert backend.describe()["start_method"] == "zygote"
        ppid = backend.run("import os\nprint(os.getppid())").stdout.strip()
        assert int(ppid) == found.pid


def test_spawn_start_method_does_not_use_the_zygote():
    with _backend(start_method="spawn") as backend:
        assert backend.describe()["start_method"] == "spawn"
        assert int(backend.run("import os; print(os.getppid())").stdout) == os.getpid()


def test_unknown_start_method_is_refused():
    with pytest.raises(ValueError, match="start_method must be 'zygote' or 'spawn', got 'fork'"):
        LocalBackend(start_method="fork")  # type: ignore[arg-type]


def test_preloaded_numpy_is_in_memory_but_not_in_the_namespace():
    pytest.importorskip("numpy")
    with _backend() as backend:
        result = backend.run("import sys\nprint('numpy' in sys.modules)\nprint('np' in dir())")
        assert result.stdout == "True\nFalse\n"


def test_the_zygote_imports_no_module_that_runs_at_every_fork():
    # threading and random (subprocess brings both) hook every fork: each new worker and
    # each copy of one would run their handlers (~0.8 ms, most of it page faults).
    with _backend(preload=[]) as backend:
        result = backend.run("import sys\nprint(sorted({'threading', 'random', 'subprocess',"
                             " 'ctypes.util'} & set(sys.modules)))")
        assert result.stdout == "[]\n"


def test_the_step_a_spare_rehearses_leaves_no_trace_in_its_worker():
    code = ("import linecache, signal, sys\n"
            "print(sorted(name for name in linecache.cache if name.startswith('<cell')))\n"
            "print(sys.modules['__main__'].__dict__ is globals(), signal.getitimer("
            "signal.ITIMER_PROF)[0] > 0, sys.stdout.fileno(), sys.stdin is sys.__stdin__)")
    with _backend(preload=[]) as backend:
        for _ in range(2):  # the first worker's spare may not have waited
            backend.reset()
            assert backend.run(code).stdout == "['<cell-1>']\nTrue True 1 True\n"


def test_workers_are_isolated_from_each_other():
    with _backend() as first, _backend() as second:
        first.run("import os\nshared = 'first'\nos.environ['MINE'] = '1'\n"
                  "open('file.txt', 'w').write('x')")
        result = second.run("import os\nprint('shared' in dir(), os.environ.get('MINE'), "
                            "os.path.exists('file.txt'), os.getcwd() == "
                            f"{second.workdir!r})")
        assert result.stdout == "False None False True\n"
        assert first.worker_pid != second.worker_pid


def test_each_worker_has_exactly_the_environment_of_its_episode():
    # A spare sets the last worker's environment ahead; the next differs in its directory.
    code = "import json, os\nprint(json.dumps(dict(os.environ)))"
    with _backend() as backend:
        for _ in range(3):
            environment = json.loads(backend.run(code).stdout)
            for name in ("USER", "LOGNAME"):  # "sandbox", set by the user layer
                assert environment.pop(name, "sandbox") == "sandbox"
            assert environment == isolation.worker_environment(backend.workdir)
            backend.reset()


def test_each_worker_has_its_own_session_and_process_group():
    with _backend() as backend:
        pid = backend.worker_pid
        assert pid is not None
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid


def test_each_worker_gets_fresh_random_state():
    pytest.importorskip("numpy")
    code = "import random, numpy\nprint(random.random(), numpy.random.rand())"
    outputs = set()
    for _ in range(3):
        with _backend() as backend:
            outputs.add(backend.run(code).stdout)
    assert len(outputs) == 3


@pytest.mark.parametrize("start_method", ["zygote", "spawn"])
def test_a_ready_worker_runs_under_the_normal_policy(start_method):
    # A batch worker woken by a request waits for the scheduler's tick behind any busy
    # process (sandbox/cgroups.py); nor may it inherit a batch policy from the thread that
    # started the zygote (one thread's own steps: test_affinity.py).
    with _backend(start_method=start_method) as backend:
        step = backend.begin("import os\nprint(os.sched_getscheduler(0) == os.SCHED_OTHER)")
        assert step.wait().stdout == "True\n"


def test_each_worker_gets_its_own_limits():
    code = "import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0] // 2**20)"
    with _backend() as small, \
            LocalBackend(Limits(memory_mb=900)) as large:
        large.reset()
        small_limit = int(small.run(code).stdout)
        assert small_limit == Limits().memory_mb
        assert int(large.run(code).stdout) == 900


def test_memory_limit_too_small_for_the_zygote_falls_back_to_spawning():
    found = zygote.get()
    assert found is not None
    too_small = max(16, found.vm_bytes // 2**20 // 2)
    with LocalBackend(Limits(memory_mb=too_small)) as backend:
        backend.reset()
        assert backend.describe()["start_method"] == "spawn"


@pytest.mark.parametrize(("code", "exit_code", "kill_reason"), [
    ("import os; os._exit(7)", 7, "crash"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", 128 + signal.SIGSEGV, "signal"),
])
def test_exit_status_of_a_forked_worker_is_reported(code, exit_code, kill_reason):
    with _backend() as backend:
        result = backend.run(code)
        assert (result.exit_code, result.kill_reason, result.state_lost) == (
            exit_code, kill_reason, True)


def test_killing_a_forked_worker_kills_its_whole_tree(no_leaked_processes):
    backend = _backend()
    backend.run("import subprocess, os\n"
                "subprocess.Popen(['sleep', '300'])\n"
                "if os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(300)\n")
    pid = backend.worker_pid
    assert pid is not None and len(descendant_pids(pid)) >= 1
    backend.close()
    # The zygote reaps it: a moment on a busy machine, during which it is a zombie.
    deadline = time.monotonic() + 5
    while process_name(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_zygote_is_restarted_after_it_dies():
    with _backend() as backend:
        first = zygote.get()
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait()
        backend.reset()
        second = zygote.get()
        assert second is not None and second.pid != first.pid
        assert backend.run("print('ok')").stdout == "ok\n"


def test_failed_preload_is_reported_and_the_zygote_still_serves(caplog):
    preload = ["coding_gym_no_such_module"]
    with _backend(preload=preload) as backend:
        found = zygote.get(preload)
        assert found is not None
        assert "coding_gym_no_such_module" in found.failed
        assert backend.describe()["start_method"] == "zygote"
        assert backend.run("print(1)").stdout == "1\n"


def test_resets_from_many_threads_at_once(no_leaked_processes):
    backends = [LocalBackend(Limits(timeout_s=5.0)) for _ in range(6)]
    errors: list[BaseException] = []

    def work(backend: LocalBackend) -> None:
        try:
            for i in range(3):
                backend.reset()
                assert backend.run(f"print({i})").stdout == f"{i}\n"
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(b,)) for b in backends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for backend in backends:
        backend.close()
    assert not errors


def test_the_zygote_and_its_spare_are_named():
    with _backend():
        found = zygote.get()
        assert found is not None
        with open(f"/proc/{found.pid}/comm") as f:
            assert f.read().strip() == zygote_loop.ZYGOTE_NAME
        assert _spare_of(found.pid) in descendant_pids_of(found.pid)


def test_a_reset_whose_spare_on_offer_died_asks_the_zygote_and_finds_the_next_offered():
    with _backend() as backend:
        found = zygote.get()
        assert found is not None
        _spare_of(found.pid)
        spares = [pid for pid in descendant_pids_of(found.pid)
                  if process_name(pid) == spare.NAME]  # one per kind asked for
        for pid in spares:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(process_name(pid) for pid in spares) and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(3):  # the zygote's own fork, then spares on offer again
            backend.reset()
            assert backend.worker_pid not in spares
            assert backend.run("import os\nprint(os.getppid())").stdout == f"{found.pid}\n"


def descendant_pids_of(pid: int) -> list[int]:
    from coding_gym.sandbox.processes import descendants

    return descendants(pid)


def test_shutdown_stops_the_zygote_its_workers_and_its_spare():
    backend = _backend()
    found = zygote.get()
    assert found is not None
    spare = _spare_of(found.pid)
    worker = backend.worker_pid
    zygote.shutdown()
    assert found.proc.poll() is not None
    for pid, what in ((worker, "the worker"), (spare, "the spare child")):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)  # type: ignore[arg-type]
            except ProcessLookupError:
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"{what} outlived the zygote")
    backend.close()


def _spare_of(zygote_pid: int) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        spares = [pid for pid in descendant_pids_of(zygote_pid)
                  if process_name(pid) == spare.NAME]
        if spares:
            return spares[0]
        time.sleep(0.01)
    pytest.fail("the zygote has no spare child")


_NAMESPACES = "import os\nprint(os.readlink('/proc/self/ns/net'), os.readlink('/proc/self/ns/mnt'))"


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces are made as root here")
def test_each_worker_gets_the_namespaces_its_isolation_asks_for():
    """Spares build namespaces ahead of the request: a request for other layers must still
    get exactly what it asks for, in any order."""
    host = (os.readlink("/proc/self/ns/net"), os.readlink("/proc/self/ns/mnt"))
    asked = ({}, {"network": False, "filesystem": False}, {"network": False}, {},
             {"filesystem": False}, {"network": False, "filesystem": False}, {})
    backends = []
    try:
        # All alive at once: the kernel reuses a namespace's number once it is gone.
        for isolation in asked:
            backends.append(_backend(isolation=isolation))
        own_networks = []
        for isolation, backend in zip(asked, backends, strict=True):
            net, mnt = backend.run(_NAMESPACES).stdout.split()
            layers = backend.describe()["isolation"]
            wants_net = isolation.get("network", True)
            wants_fs = isolation.get("filesystem", True)
            assert (net != host[0]) == wants_net, (isolation, net)
            assert (mnt != host[1]) == wants_fs, (isolation, mnt)
            assert layers["network"]["active"] is wants_net
            assert layers["filesystem"]["active"] is wants_fs
            if wants_net:
                own_networks.append(net)
        # A namespace of its own, never one of another worker.
        assert len(set(own_networks)) == len(own_networks) == 4
    finally:
        for backend in backends:
            backend.close()


def test_a_worker_of_the_same_uid_cannot_kill_its_zygote():
    """Without the user layer the worker could signal its parent, the zygote every episode
    of the process depends on; the seccomp filter refuses it."""
    with _backend(isolation={"user": False}) as backend:
        found = zygote.get()
        assert found is not None
        result = backend.run("import os, signal\n"
                             "try:\n"
                             "    os.kill(os.getppid(), signal.SIGKILL)\n"
                             "except OSError as e:\n"
                             "    print(type(e).__name__)")
        assert result.stdout == "PermissionError\n"
        assert found.alive and zygote.get() is found
        assert backend.run("print('still here')").stdout == "still here\n"
