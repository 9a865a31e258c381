"""The isolation layers, applied in a fresh process exactly as a worker applies them.

Each test starts an interpreter that loads the sandbox modules the way a worker does, calls
``isolation.apply``, runs one probe of ``probes.py`` and prints the probe's answer as JSON. (A
fresh process rather than a fork of pytest: pytest has threads by now, and a fork of a
threaded process may inherit a lock no thread will ever release.) Layers the machine does not
allow make their tests skip (the report says why); the tests of the report itself and of
degrading always run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

import coding_gym
from coding_gym.backends.local import LocalBackend
from coding_gym.models import Isolation
from coding_gym.sandbox import isolation, seccomp, uids, walls

LIMITS = {"memory_mb": 1024, "max_file_mb": 8, "max_open_files": 256, "max_processes": 64}
ROOT = os.geteuid() == 0
_PACKAGE_DIR = os.path.dirname(os.path.abspath(coding_gym.__file__))
_PROBES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probes.py")

# Loads the sandbox modules without coding_gym/__init__.py, like the worker's bootstrap, and
# everything the probe needs before the isolation (which may make it unreadable).
_RUNNER = """\
import importlib.util, json, sys, traceback, types
package = types.ModuleType("coding_gym")
package.__path__ = [sys.argv[1]]
sys.modules["coding_gym"] = package
from coding_gym.sandbox import isolation
spec = importlib.util.spec_from_file_location("probes", sys.argv[2])
probes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probes)
config, name, before = json.loads(sys.argv[3]), sys.argv[4], sys.argv[6]
kwargs = json.loads(sys.argv[5])
isolation.prepare()
try:
    if before:
        getattr(probes, before)()
    report = isolation.apply(config)
    try:
        answer = getattr(probes, name)(**kwargs)
    except BaseException as e:
        answer = {"error": type(e).__name__, "errno": getattr(e, "errno", None)}
    outcome = {"report": report, "answer": answer}
except BaseException as e:
    outcome = {"crash": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
sys.stdout.write(json.dumps(outcome, default=str))
"""


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


def isolated(probe: str, workdir: str, uid: int | None = None, strict: bool = False,
             before: str = "", kwargs: dict[str, Any] | None = None,
             **layers: bool) -> dict[str, Any]:
    """Apply the isolation in a fresh process, run ``probes.<probe>(**kwargs)`` there."""
    config = isolation.worker_config(
        Isolation(**layers).layers(), LIMITS, workdir, uid=uid, strict=strict
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", _RUNNER, _PACKAGE_DIR, _PROBES, json.dumps(config), probe,
         json.dumps(kwargs or {}), before],
        cwd=workdir, capture_output=True, timeout=120,
        env=isolation.worker_environment(workdir),
    )
    assert done.stdout, done.stderr.decode(errors="replace")
    outcome: dict[str, Any] = json.loads(done.stdout)
    return outcome


def active(outcome: dict[str, Any], *names: str) -> None:
    """Skip the test unless every layer in ``names`` could be applied here."""
    assert "crash" not in outcome, outcome
    for name in names:
        layer = outcome["report"][name]
        if not layer["active"]:
            pytest.skip(f"{name} layer unavailable here: {layer['detail']}")


# The report.


def test_report_has_every_worker_layer_with_a_reason(workdir, lease):
    outcome = isolated("noop", workdir, uid=lease)
    assert "crash" not in outcome, outcome
    report = outcome["report"]
    assert list(report) == list(isolation.WORKER_LAYERS)
    for name, layer in report.items():
        assert isinstance(layer["active"], bool), name
        assert layer["detail"], name


def test_layers_turned_off_say_so(workdir):
    outcome = isolated("uid", workdir, **Isolation.none().layers())
    assert all(layer == {"active": False, "detail": "turned off"}
               for layer in outcome["report"].values())
    assert outcome["answer"] == os.getuid()


def test_strict_refuses_a_layer_it_cannot_apply(workdir):
    # No uid was leased, so the user layer cannot be applied.
    outcome = isolated("noop", workdir, uid=None, strict=True)
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
    outcome = isolated("priority", workdir, **{**Isolation.none().layers(), "rlimits": True})
    active(outcome, "rlimits")
    assert outcome["answer"] == 19
    assert "nice 19" in outcome["report"]["rlimits"]["detail"]


def _sessions_are_grouped() -> bool:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _own_group() -> str:
    """This process's scheduling group and its nice; empty in the kernel's default group
    (a session that never got a group of its own, such as init's)."""
    try:
        with open("/proc/self/autogroup") as f:
            return f.read()
    except OSError:
        return ""


_SESSION = ("import os; print(os.getsid(0), "
            "(open('/proc/self/autogroup').read().split() or ['none'])[-1])")


@pytest.mark.parametrize("start_method", ["zygote", "spawn"])
def test_the_workers_session_gets_the_lowest_cpu_weight(start_method):
    ours = _own_group()
    with LocalBackend(start_method=start_method, transactional=True) as backend:
        backend.reset()
        session, nice = backend.run(_SESSION).stdout.split()
        detail = backend.describe()["isolation"]["rlimits"]["detail"]
        # A copy (here the one a transactional step keeps) stays in the worker's session.
        backend.run("import os; os._exit(3)")
        assert backend.run(_SESSION).stdout.split() == [session, nice]
    assert _own_group() == ours, "the caller's own group must keep its weight"
    if _sessions_are_grouped():
        # The worker leads a session, so it has a group of its own whatever the caller's.
        assert nice == "19"
        assert "nice 19 for its session's scheduling group" in detail
    else:
        assert "scheduling group" not in detail


# Network.


def test_network_namespace_has_only_loopback_and_cannot_reach_the_host(workdir):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        outcome = isolated("network", workdir, kwargs={"port": listener.getsockname()[1]},
                           seccomp=False, filesystem=False, user=False)
    active(outcome, "network")
    assert outcome["answer"]["interfaces"] == ["lo"]
    assert outcome["answer"]["host"] is not None  # the host's 127.0.0.1:port is elsewhere


# Seccomp.


def test_seccomp_refuses_internet_sockets_and_allows_unix(workdir):
    # The network layer on: its namespace alone would let these sockets be created.
    outcome = isolated("sockets", workdir, filesystem=False, user=False)
    active(outcome, "seccomp")
    assert outcome["answer"] == {"inet": 1, "inet6": 1, "netlink": 1, "unix": None}


def test_seccomp_keeps_sockets_when_the_network_layer_is_off(workdir):
    outcome = isolated("sockets", workdir, network=False, filesystem=False, user=False)
    active(outcome, "seccomp")
    assert outcome["answer"]["inet"] is None


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="system call numbers of x86-64")
def test_seccomp_refuses_dangerous_system_calls(workdir):
    names = ["ptrace", "mount", "unshare", "bpf", "keyctl", "perf_event_open",
             "io_uring_setup", "setns", "reboot", "init_module", "kexec_load", "userfaultfd"]
    outcome = isolated("syscalls", workdir, kwargs={"names": names}, network=False,
                       filesystem=False, user=False)
    active(outcome, "seccomp")
    assert outcome["answer"] == dict.fromkeys(names, 1)  # EPERM, from the filter


def test_seccomp_refuses_signals_to_the_parent_and_to_everyone(workdir):
    # Even as the same uid (user layer off), code cannot kill the process running the env.
    outcome = isolated("signals", workdir, network=False, filesystem=False, user=False)
    active(outcome, "seccomp")
    assert outcome["answer"] == {"parent": 1, "everyone": 1, "own group": None}


def test_seccomp_still_allows_threads_processes_and_subprocesses(workdir):
    outcome = isolated("threads_and_subprocesses", workdir, network=False, filesystem=False,
                       user=False)
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
    outcome = isolated("filesystem", workdir, network=False, user=False, seccomp=False)
    active(outcome, "filesystem")
    answer = outcome["answer"]
    assert (answer["etc"], answer["usr"]) == (30, 30)  # EROFS
    assert (answer["workdir"], answer["tmp"], answer["shm"], answer["null"]) == (None,) * 4
    assert answer["cwd"] == os.path.realpath(workdir)
    assert os.path.exists(os.path.join(workdir, "ok"))  # the same directory as outside
    assert not os.path.exists("/tmp/ok")  # /tmp was private
    if workdir.startswith("/tmp/"):
        # Besides the episode: an interpreter or virtualenv living in /tmp, bound back.
        bound_back = {path.split("/")[2] for path in walls.python_paths()
                      if path.startswith("/tmp/")}
        expected = sorted({workdir.split("/")[2], "ok"} | bound_back)
        assert answer["tmp_entries"] == expected


def test_filesystem_has_a_minimal_dev_and_private_ipc(workdir):
    outcome = isolated("dev_and_ipc", workdir, network=False, user=False, seccomp=False)
    active(outcome, "filesystem")
    assert {"null", "zero", "urandom", "shm"} <= set(outcome["answer"]["dev"])
    assert "vda" not in outcome["answer"]["dev"] and "sda" not in outcome["answer"]["dev"]
    # The segment lived in the child's private /dev/shm, gone with its namespace.
    assert not os.path.exists("/dev/shm/" + outcome["answer"]["shm"])


def test_filesystem_hides_home_directories(workdir):
    if not os.path.isdir("/root"):
        pytest.skip("no /root here")
    outcome = isolated("home", workdir, network=False, user=False, seccomp=False)
    active(outcome, "filesystem")
    visible = set(outcome["answer"])
    assert visible <= {".pyenv", ".local", ".cache", ".venv"}, visible
    assert ".ssh" not in visible


# User.


@pytest.mark.skipif(not ROOT, reason="the user layer needs root")
def test_user_layer_runs_as_the_leased_uid_and_still_imports_lazily(workdir, lease):
    outcome = isolated("lazy_numpy", workdir, uid=lease)
    active(outcome, "user", "filesystem")
    assert outcome["answer"] == {"uid": lease, "gid": lease, "groups": [], "sum": 6,
                                 "owner": lease}


@pytest.mark.skipif(not ROOT, reason="the user layer needs root")
def test_user_layer_hides_the_parents_environment_and_processes(workdir, lease):
    outcome = isolated("parents_secrets", workdir, uid=lease, kwargs={"secret": "PATH="})
    active(outcome, "user")
    answer = outcome["answer"]
    # ENOENT (hidden) or EACCES, never the contents.
    assert answer["environ"] in (2, 13) and answer["cmdline"] in (2, 13), answer
    assert answer["others"] == [] or not outcome["report"]["filesystem"]["active"]


@pytest.mark.skipif(not ROOT, reason="the user layer needs root")
def test_user_layer_does_not_follow_a_symlinked_workdir(workdir, lease):
    target = os.path.join(workdir, "root-owned")
    os.mkdir(target)
    link = os.path.join(workdir, "episode")
    os.symlink(target, link)
    outcome = isolated("noop", link, uid=lease)
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
    for path in ("/proc/sys/kernel/unprivileged_userns_clone",
                 "/proc/sys/user/max_user_namespaces"):
        try:
            with open(path) as f:
                if int(f.read()) < 1:
                    return False
        except OSError:
            pass
    return True


@pytest.mark.skipif(not ROOT, reason="needs root to become another user for the test")
def test_degrades_cleanly_as_an_unprivileged_user(workdir):
    os.chmod(workdir, 0o777)
    outcome = isolated("unprivileged", workdir, before="become_nobody")
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
    outcome = isolated("capabilities", workdir, before="become_nobody", seccomp=False)
    active(outcome, "filesystem")
    assert outcome["answer"] == {"remount": 1, "caps": "0000000000000000"}


# Through the env.


def test_the_env_passes_isolation_to_its_backend_and_reports_it():
    from coding_gym.env import CodingEnv

    with CodingEnv(isolation={"network": False, "seccomp": False}) as env:
        env.reset()
        report = env.unwrapped.backend.describe()["isolation"]
        observation = env.step("import socket\nsocket.socket().close()\nprint('ok')")[0]
    assert report["network"] == report["seccomp"] == {"active": False, "detail": "turned off"}
    assert set(report) == {"network", "filesystem", "user", "rlimits", "seccomp", "cgroup"}
    assert observation["stdout"] == "ok\n"
    with pytest.raises(ValueError, match="Unknown isolation option"):
        CodingEnv(isolation={"nework": False})
