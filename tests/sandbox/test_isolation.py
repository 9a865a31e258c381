"""The isolation layers, applied in a forked child exactly as a worker applies them.

Each test forks, calls ``isolation.apply`` in the child, runs a small probe there and sends
the probe's answer back as JSON. Layers the machine does not allow make their tests skip
(the report says why); the tests of the report itself and of degrading always run.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from coding_gym.models import Isolation
from coding_gym.sandbox import isolation, seccomp, uids

LIMITS = {"memory_mb": 1024, "max_file_mb": 8, "max_open_files": 256, "max_processes": 64}
ROOT = os.geteuid() == 0


@pytest.fixture
def workdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="coding-gym-test-") as path:
        yield path


@pytest.fixture
def lease() -> Iterator[int | None]:
    if not ROOT:
        yield None
        return
    held = uids.UidLease.acquire()
    yield held.uid
    held.release()


def isolated(probe: Callable[[], Any], workdir: str, uid: int | None = None,
             strict: bool = False, before: Callable[[], None] | None = None,
             **layers: bool) -> dict[str, Any]:
    """Fork; in the child apply the isolation, run ``probe``; return report and answer."""
    config = isolation.worker_config(
        Isolation(**layers).layers(), LIMITS, workdir, uid=uid, strict=strict
    )
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        outcome: dict[str, Any]
        try:
            if before is not None:
                before()
            report = isolation.apply(config)
            try:
                answer = probe()
            except BaseException as e:  # noqa: BLE001 - the probe's error is the answer
                answer = {"error": type(e).__name__, "errno": getattr(e, "errno", None)}
            outcome = {"report": report, "answer": answer}
        except BaseException as e:  # noqa: BLE001 - report anything to the test
            outcome = {"crash": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        os.write(write_fd, json.dumps(outcome, default=str).encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 1 << 16):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def active(outcome: dict[str, Any], *names: str) -> None:
    """Skip the test unless every layer in ``names`` could be applied here."""
    assert "crash" not in outcome, outcome
    for name in names:
        layer = outcome["report"][name]
        if not layer["active"]:
            pytest.skip(f"{name} layer unavailable here: {layer['detail']}")


def error_of(call: Callable[[], Any]) -> Callable[[], Any]:
    """A probe that runs ``call`` and answers with the errno it failed with (None if not)."""
    def probe() -> Any:
        try:
            call()
        except OSError as e:
            return e.errno
        return None
    return probe


# The report.


def test_report_has_every_worker_layer_with_a_reason(workdir, lease):
    outcome = isolated(lambda: None, workdir, uid=lease)
    assert "crash" not in outcome, outcome
    report = outcome["report"]
    assert list(report) == list(isolation.WORKER_LAYERS)
    for name, layer in report.items():
        assert isinstance(layer["active"], bool), name
        assert layer["detail"], name


def test_layers_turned_off_say_so(workdir):
    outcome = isolated(lambda: os.getuid(), workdir, **Isolation.none().layers())
    assert all(layer == {"active": False, "detail": "turned off"}
               for layer in outcome["report"].values())
    assert outcome["answer"] == os.getuid()


def test_strict_refuses_a_layer_it_cannot_apply(workdir):
    # No uid was leased, so the user layer cannot be applied.
    outcome = isolated(lambda: None, workdir, uid=None, strict=True)
    assert "IsolationError" in outcome["crash"]
    assert "user (" in outcome["crash"]


def test_isolation_coerce_pins_its_errors():
    assert Isolation.coerce({"network": False}).network is False
    assert Isolation.coerce(None) == Isolation()
    with pytest.raises(ValueError, match=r"Unknown isolation option\(s\) \['netwrk'\]"):
        Isolation.coerce({"netwrk": False})
    with pytest.raises(ValueError, match="must be True or False, got 'no'"):
        Isolation.coerce({"network": "no"})
    with pytest.raises(TypeError, match="Expected isolation to be an Isolation"):
        Isolation.coerce(0)  # type: ignore[arg-type]


def test_rlimits_layer_lowers_the_cpu_priority(workdir):
    outcome = isolated(lambda: os.getpriority(os.PRIO_PROCESS, 0), workdir,
                       **{**Isolation.none().layers(), "rlimits": True})
    active(outcome, "rlimits")
    assert outcome["answer"] == 19
    assert "nice 19" in outcome["report"]["rlimits"]["detail"]


# Network.


def test_network_namespace_has_only_loopback_and_cannot_reach_the_host(workdir):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def probe() -> Any:
            names = [name for _, name in socket.if_nameindex()]
            with socket.socket() as server:  # loopback inside works
                server.bind(("127.0.0.1", 0))
                server.listen()
                with socket.create_connection(server.getsockname(), timeout=2):
                    pass
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                host = "reached"
            except OSError as e:
                host = e.errno
            return {"interfaces": names, "host": host}

        outcome = isolated(probe, workdir, seccomp=False, filesystem=False, user=False)
    active(outcome, "network")
    assert outcome["answer"]["interfaces"] == ["lo"]
    assert outcome["answer"]["host"] != "reached"  # the host's port 127.0.0.1:port is elsewhere


# Seccomp.


def test_seccomp_refuses_internet_sockets_and_allows_unix(workdir):
    def probe() -> Any:
        results = {}
        for name, family in (("inet", socket.AF_INET), ("inet6", socket.AF_INET6),
                             ("netlink", socket.AF_NETLINK)):
            results[name] = error_of(lambda f=family: socket.socket(f, socket.SOCK_DGRAM))()
        results["unix"] = error_of(lambda: socket.socketpair())()
        return results

    # The network layer on: its namespace alone would let these sockets be created.
    outcome = isolated(probe, workdir, filesystem=False, user=False)
    active(outcome, "seccomp")
    assert outcome["answer"] == {"inet": 1, "inet6": 1, "netlink": 1, "unix": None}


def test_seccomp_keeps_sockets_when_the_network_layer_is_off(workdir):
    probe = error_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
    outcome = isolated(probe, workdir, network=False, filesystem=False, user=False)
    active(outcome, "seccomp")
    assert outcome["answer"] is None


def _syscall(name: str, *args: int) -> Callable[[], Any]:
    numbers = {"ptrace": 101, "mount": 165, "unshare": 272, "bpf": 321, "keyctl": 250,
               "perf_event_open": 298, "io_uring_setup": 425, "setns": 308, "reboot": 169,
               "init_module": 175, "kexec_load": 246, "userfaultfd": 323}

    def call() -> int:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(numbers[name], *args) == -1:
            return ctypes.get_errno()
        return 0
    return call


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="system call numbers of x86-64")
def test_seccomp_refuses_dangerous_system_calls(workdir):
    names = ["ptrace", "mount", "unshare", "bpf", "keyctl", "perf_event_open",
             "io_uring_setup", "setns", "reboot", "init_module", "kexec_load", "userfaultfd"]

    def probe() -> Any:
        return {name: _syscall(name, 0, 0, 0, 0)() for name in names}

    outcome = isolated(probe, workdir, network=False, filesystem=False, user=False)
    active(outcome, "seccomp")
    assert outcome["answer"] == dict.fromkeys(names, 1)  # EPERM, from the filter


def test_seccomp_refuses_signals_to_the_parent_and_to_everyone(workdir):
    # Even as the same uid (user layer off), code cannot kill the process running the env.
    def probe() -> Any:
        return {"parent": error_of(lambda: os.kill(os.getppid(), 0))(),
                "everyone": error_of(lambda: os.kill(-1, 0))(),
                "own group": error_of(lambda: os.kill(0, 0))()}

    outcome = isolated(probe, workdir, network=False, filesystem=False, user=False)
    active(outcome, "seccomp")
    assert outcome["answer"] == {"parent": 1, "everyone": 1, "own group": None}


def test_seccomp_still_allows_threads_processes_and_subprocesses(workdir):
    def probe() -> Any:
        import subprocess
        import threading

        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
        done = subprocess.run(["/bin/sh", "-c", "echo hi"], capture_output=True, text=True)
        return done.stdout

    outcome = isolated(probe, workdir, network=False, filesystem=False, user=False)
    active(outcome, "seccomp")
    assert outcome["answer"] == "hi\n"


def test_seccomp_program_is_compiled_once_per_process():
    protected = seccomp.protected_pids()
    try:
        first = seccomp.compile_filter(True, protected)
    except seccomp.SeccompUnavailable as e:
        pytest.skip(str(e))
    assert seccomp.compile_filter(True, protected) is first
    assert len(first) % 8 == 0 and first  # whole struct sock_filter entries


# Filesystem.


def test_filesystem_is_read_only_but_the_workdir_and_tmp(workdir):
    def probe() -> Any:
        def write(path: str) -> Any:
            return error_of(lambda: open(path, "w").close())()

        return {"etc": write("/etc/coding-gym-probe"), "usr": write("/usr/coding-gym-probe"),
                "workdir": write(os.path.join(os.getcwd(), "ok")), "tmp": write("/tmp/ok"),
                "shm": write("/dev/shm/ok"), "null": write("/dev/null"),
                "cwd": os.getcwd(), "tmp_entries": sorted(os.listdir("/tmp"))}

    outcome = isolated(probe, workdir, network=False, user=False, seccomp=False)
    active(outcome, "filesystem")
    answer = outcome["answer"]
    assert (answer["etc"], answer["usr"]) == (30, 30)  # EROFS
    assert (answer["workdir"], answer["tmp"], answer["shm"], answer["null"]) == (None,) * 4
    assert answer["cwd"] == os.path.realpath(workdir)
    assert os.path.exists(os.path.join(workdir, "ok"))  # the same directory as outside
    assert not os.path.exists("/tmp/ok")  # /tmp was private
    if workdir.startswith("/tmp/"):
        assert answer["tmp_entries"] == sorted([workdir.split("/")[2], "ok"])


def test_filesystem_has_a_minimal_dev_and_private_ipc(workdir):
    def probe() -> Any:
        from multiprocessing import shared_memory

        memory = shared_memory.SharedMemory(create=True, size=16)
        name = memory.name
        memory.close()
        return {"dev": sorted(os.listdir("/dev")), "shm": name}

    outcome = isolated(probe, workdir, network=False, user=False, seccomp=False)
    active(outcome, "filesystem")
    assert {"null", "zero", "urandom", "shm"} <= set(outcome["answer"]["dev"])
    assert "vda" not in outcome["answer"]["dev"] and "sda" not in outcome["answer"]["dev"]
    # The segment lived in the child's private /dev/shm, gone with its namespace.
    assert not os.path.exists("/dev/shm/" + outcome["answer"]["shm"])


def test_filesystem_hides_home_directories(workdir):
    if not os.path.isdir("/root"):
        pytest.skip("no /root here")
    outcome = isolated(lambda: sorted(os.listdir("/root")), workdir, network=False,
                       user=False, seccomp=False)
    active(outcome, "filesystem")
    visible = set(outcome["answer"])
    assert visible <= {".pyenv", ".local", ".cache", ".venv"}, visible
    assert ".ssh" not in visible


# User.


@pytest.mark.skipif(not ROOT, reason="the user layer needs root")
def test_user_layer_runs_as_the_leased_uid_and_still_imports_lazily(workdir, lease):
    def probe() -> Any:
        import importlib

        numpy = importlib.import_module("numpy")  # first imported after the uid drop
        return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                "sum": int(numpy.arange(4).sum()), "owner": os.stat(".").st_uid}

    outcome = isolated(probe, workdir, uid=lease)
    active(outcome, "user", "filesystem")
    assert outcome["answer"] == {"uid": lease, "gid": lease, "groups": [], "sum": 6,
                                 "owner": lease}


@pytest.mark.skipif(not ROOT, reason="the user layer needs root")
def test_user_layer_hides_the_parents_environment_and_processes(workdir, lease, monkeypatch):
    monkeypatch.setenv("CODING_GYM_FAKE_SECRET", "hunter2")

    def probe() -> Any:
        def read(path: str) -> Any:
            try:
                with open(path, "rb") as f:
                    return "hunter2" in f.read().decode(errors="replace")
            except OSError as e:
                return e.errno

        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
        return {"environ": read(f"/proc/{os.getppid()}/environ"),
                "own env": "CODING_GYM_FAKE_SECRET" in os.environ,
                "others": [pid for pid in pids if pid != os.getpid()]}

    outcome = isolated(probe, workdir, uid=lease)
    active(outcome, "user")
    answer = outcome["answer"]
    assert answer["environ"] in (2, 13)  # ENOENT (hidden) or EACCES, never the secret
    assert answer["others"] == [] or not outcome["report"]["filesystem"]["active"]


@pytest.mark.skipif(not ROOT, reason="the user layer needs root")
def test_user_layer_does_not_follow_a_symlinked_workdir(workdir, lease):
    target = os.path.join(workdir, "root-owned")
    os.mkdir(target)
    link = os.path.join(workdir, "episode")
    os.symlink(target, link)
    outcome = isolated(lambda: None, link, uid=lease)
    assert outcome["report"]["user"]["active"] is False
    assert "episode directory" in outcome["report"]["user"]["detail"]
    assert os.stat(target).st_uid == 0


def test_uid_leases_are_exclusive():
    held = [uids.UidLease.acquire() for _ in range(20)]
    try:
        assert len({lease.uid for lease in held}) == 20
        assert all(lease.uid in uids.UID_RANGE for lease in held)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as rival, \
                pytest.raises(OSError):
            rival.bind(f"\0coding-gym/uid/{held[0].uid}")
    finally:
        for lease in held:
            lease.release()
            lease.release()  # twice is safe


# Without root: every layer degrades and says why; nothing raises.


def _user_namespaces_allowed() -> bool:
    for path, minimum in (("/proc/sys/kernel/unprivileged_userns_clone", 1),
                          ("/proc/sys/user/max_user_namespaces", 1)):
        try:
            with open(path) as f:
                if int(f.read()) < minimum:
                    return False
        except OSError:
            pass
    return True


def _become_nobody() -> None:
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)


@pytest.mark.skipif(not ROOT, reason="needs root to become another user for the test")
def test_degrades_cleanly_as_an_unprivileged_user(workdir):
    os.chmod(workdir, 0o777)
    isolation.prepare()  # the child cannot read the interpreter's directories after the switch

    def probe() -> Any:
        return {"uid": os.getuid(), "etc": error_of(lambda: open("/etc/x", "w").close())(),
                "inet": error_of(lambda: socket.socket().close())()}

    outcome = isolated(probe, workdir, before=_become_nobody)
    assert "crash" not in outcome, outcome
    report = outcome["report"]
    assert report["user"]["active"] is False
    assert "not running as root" in report["user"]["detail"]
    assert outcome["answer"]["uid"] == 65534 and outcome["answer"]["inet"] == 1
    if _user_namespaces_allowed():  # then a user namespace builds the other walls
        assert report["network"]["active"] and report["filesystem"]["active"], report
        assert outcome["answer"]["etc"] == 30  # EROFS
    else:
        assert "namespace" in report["filesystem"]["detail"]


@pytest.mark.skipif(not ROOT or not _user_namespaces_allowed(),
                    reason="needs root to become another user, and user namespaces")
def test_a_user_namespace_leaves_the_code_no_capabilities(workdir):
    os.chmod(workdir, 0o777)
    isolation.prepare()

    def probe() -> Any:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        # MS_REMOUNT | MS_BIND: would make the root writable again with CAP_SYS_ADMIN.
        result = libc.mount(None, b"/", None, 0x20 | 0x1000, None)
        with open("/proc/self/status") as f:
            effective = next(line.split()[1] for line in f if line.startswith("CapEff:"))
        return {"remount": ctypes.get_errno() if result else 0, "caps": effective}

    outcome = isolated(probe, workdir, before=_become_nobody, seccomp=False)
    active(outcome, "filesystem")
    assert outcome["answer"] == {"remount": 1, "caps": "0000000000000000"}
