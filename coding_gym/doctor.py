"""``coding-gym doctor``: which isolation layers protect sandbox workers on this machine.

It starts one sandbox worker the way :class:`coding_gym.CodingEnv` does, prints the layers the
worker reports as active and why the others are not, and then checks from inside the sandbox,
with code run as an agent's would be, that each active layer really holds. It also times a
reset with and without isolation.

Exit status: 0 when every layer is active and holds, 1 when some layer is unavailable here,
2 when a layer reported active does not hold (a bug: please report it, see SECURITY.md).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from coding_gym.models import Isolation, Limits

LAYERS = ("network", "filesystem", "user", "seccomp", "cgroup", "rlimits")

#: Run inside the sandbox; prints what agent code can and cannot do there, as JSON.
_PROBE = r"""
import ctypes, json, os, resource, socket
def attempt(action):
    try:
        action()
        return "allowed"
    except OSError as e:
        return e.strerror or type(e).__name__
def inet():
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
def write(path):
    with open(path, "w"):
        pass
    os.unlink(path)
def environ():
    with open(f"/proc/{os.getppid()}/environ", "rb") as f:
        f.read()
libc = ctypes.CDLL(None, use_errno=True)
# PTRACE_PEEKDATA of a pid that cannot exist: ESRCH if allowed, EPERM if filtered.
ptrace = "allowed" if libc.ptrace(2, (1 << 22) + 1, 0, 0) != -1 else os.strerror(ctypes.get_errno())
with open("/proc/net/dev") as f:
    interfaces = [line.split(":")[0].strip() for line in f.readlines()[2:]]
with open("/proc/self/cgroup") as f:
    cgroups = f.read()
print(json.dumps({
    "uid": os.getuid(), "inet_socket": attempt(inet), "interfaces": interfaces,
    "write_etc": attempt(lambda: write("/etc/coding-gym-doctor")),
    "write_workdir": attempt(lambda: write("coding-gym-doctor")),
    "parent_environ": attempt(environ), "ptrace": ptrace,
    "in_cgroup": "coding-gym" in cgroups,
    "address_space": resource.getrlimit(resource.RLIMIT_AS)[0],
    "processes_visible": sum(entry.isdigit() for entry in os.listdir("/proc")),
}))
"""


@dataclass
class Layer:
    """One layer: reported by the worker, then checked from inside the sandbox."""

    name: str
    requested: bool
    active: bool
    detail: str
    holds: bool | None = None  # None: not checked (the layer is off)
    check: str = ""


@dataclass
class Diagnosis:
    layers: list[Layer]
    machine: dict[str, Any]
    advice: list[str] = field(default_factory=list)
    reset_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def status(self) -> int:
        """The exit status: 0 all good, 1 layers unavailable, 2 a layer does not hold."""
        if self.error or any(layer.holds is False for layer in self.layers):
            return 2
        return 0 if all(layer.active for layer in self.layers if layer.requested) else 1


def diagnose(isolation: Isolation | None = None, timing_rounds: int = 10) -> Diagnosis:
    """Start a sandbox worker, collect its isolation report and check each active layer."""
    from coding_gym.backends.local import LocalBackend

    isolation = isolation or Isolation()
    limits = Limits(timeout_s=10.0)
    diagnosis = Diagnosis(layers=[], machine=_machine())
    # The backend warns about unavailable layers; here the report says it, with advice.
    backend_log = logging.getLogger("coding_gym.backends.local")
    level = backend_log.level
    backend_log.setLevel(logging.ERROR)
    try:
        with LocalBackend(limits, isolation) as backend:
            backend.reset()
            report = backend.describe()["isolation"]
            result = backend.run(_PROBE)
        facts = json.loads(result.stdout) if result.exit_code == 0 else None
    except Exception as e:  # noqa: BLE001 - the doctor reports any failure, it never crashes
        diagnosis.error = f"could not start a sandbox worker: {type(e).__name__}: {e}"
        return diagnosis
    finally:
        backend_log.setLevel(level)
    if facts is None:
        diagnosis.error = f"the probe failed inside the sandbox: {result.stderr.strip()}"
        return diagnosis
    for name in LAYERS:
        entry = report.get(name, {"active": False, "detail": "not reported"})
        layer = Layer(name, getattr(isolation, name), bool(entry["active"]),
                      str(entry["detail"]))
        if layer.active:
            layer.holds, layer.check = _CHECKS[name](facts, limits)
        diagnosis.layers.append(layer)
    diagnosis.advice = _advice(diagnosis)
    if timing_rounds:
        diagnosis.reset_ms = _time_resets(isolation, timing_rounds)
    return diagnosis


def _check_network(facts: dict[str, Any], limits: Limits) -> tuple[bool, str]:
    only_loopback = facts["interfaces"] == ["lo"]
    refused = facts["inet_socket"] != "allowed"
    return only_loopback or refused, (f"interfaces: {', '.join(facts['interfaces'])}; "
                                      f"internet socket: {facts['inet_socket']}")


def _check_filesystem(facts: dict[str, Any], limits: Limits) -> tuple[bool, str]:
    holds = facts["write_etc"] != "allowed" and facts["write_workdir"] == "allowed"
    return holds, (f"/etc: {facts['write_etc']}; episode directory: {facts['write_workdir']}; "
                   f"{facts['processes_visible']} process(es) visible")


def _check_user(facts: dict[str, Any], limits: Limits) -> tuple[bool, str]:
    holds = facts["uid"] not in (0, os.getuid()) and facts["parent_environ"] != "allowed"
    return holds, f"uid {facts['uid']}; parent's environment: {facts['parent_environ']}"


def _check_seccomp(facts: dict[str, Any], limits: Limits) -> tuple[bool, str]:
    return facts["ptrace"] == os.strerror(1), f"ptrace: {facts['ptrace']}"


def _check_cgroup(facts: dict[str, Any], limits: Limits) -> tuple[bool, str]:
    return facts["in_cgroup"], "in its own cgroup" if facts["in_cgroup"] else "not in one"


def _check_rlimits(facts: dict[str, Any], limits: Limits) -> tuple[bool, str]:
    expected = limits.memory_mb * 1024 * 1024
    return facts["address_space"] == expected, f"address space {facts['address_space']} bytes"


_CHECKS: dict[str, Callable[[dict[str, Any], Limits], tuple[bool, str]]] = {
    "network": _check_network, "filesystem": _check_filesystem, "user": _check_user,
    "seccomp": _check_seccomp, "cgroup": _check_cgroup, "rlimits": _check_rlimits,
}


def _machine() -> dict[str, Any]:
    in_container = os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")
    return {
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "uid": os.geteuid(),
        "python": f"{platform.python_version()} at {sys.executable}",
        "container": in_container,
    }


def _advice(diagnosis: Diagnosis) -> list[str]:
    """What to do about each unavailable layer."""
    off = {layer.name for layer in diagnosis.layers if layer.requested and not layer.active}
    advice = []
    if "user" in off and diagnosis.machine["uid"] != 0:
        advice.append("user: run as root (inside a container is the usual way) so that each "
                      "episode gets a uid of its own.")
    if off & {"network", "filesystem"}:
        advice.append("network, filesystem: namespaces need root or unprivileged user "
                      "namespaces; in Docker, --cap-add SYS_ADMIN with a seccomp profile that "
                      "allows unshare and mount, or rely on --network none and --read-only.")
    if "seccomp" in off:
        advice.append("seccomp: install libseccomp (Debian/Ubuntu: apt-get install libseccomp2).")
    if "cgroup" in off:
        advice.append("cgroup: needs write access to the memory and pids controllers (root on "
                      "cgroup v1; a delegated subtree on cgroup v2). Without it, a fork bomb is "
                      "capped only by RLIMIT_NPROC of the episode's uid.")
    if off:
        advice.append("For untrusted code, run `coding-gym serve --token ...` in a container "
                      "(docker run --network none --memory ... --pids-limit ...); see SECURITY.md.")
    return advice


def _time_resets(isolation: Isolation, rounds: int) -> dict[str, float]:
    """Median wall time of reset + a trivial step, with the given layers and with none."""
    from coding_gym.backends.local import LocalBackend

    medians = {}
    for label, layers in (("with isolation", isolation), ("without", Isolation.none())):
        with LocalBackend(Limits(), layers) as backend:
            backend.reset()
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                backend.reset()
                backend.run("pass")
                times.append(time.perf_counter() - started)
        medians[label] = round(statistics.median(times) * 1000, 2)
    return medians


def format_text(diagnosis: Diagnosis) -> str:
    """The report as ``coding-gym doctor`` prints it."""
    machine = diagnosis.machine
    lines = [
        "coding-gym doctor: isolation of sandbox workers on this machine",
        f"  {machine['kernel']}; running as uid {machine['uid']}"
        f"{' in a container' if machine['container'] else ''}; Python {machine['python']}",
        "",
    ]
    if diagnosis.error:
        lines.append(f"ERROR: {diagnosis.error}")
        return "\n".join(lines) + "\n"
    for layer in diagnosis.layers:
        state = "on " if layer.active else "off"
        lines.append(f"  {layer.name:<10} {state}  {layer.detail}")
        if layer.holds is not None:
            verdict = "checked" if layer.holds else "DOES NOT HOLD"
            lines.append(f"  {'':<10}      {verdict} from inside: {layer.check}")
    if diagnosis.reset_ms:
        timings = ", ".join(f"{label} {ms:g} ms" for label, ms in diagnosis.reset_ms.items())
        lines += ["", f"  reset + first step (median): {timings}"]
    if diagnosis.advice:
        lines += ["", "What to do:"] + [f"  - {line}" for line in diagnosis.advice]
    summary = {0: "every layer asked for is active and holds.",
               1: "some layers are unavailable here (see above).",
               2: "a layer reported active does not hold: please report it (SECURITY.md)."}
    lines += ["", f"Result: {summary[diagnosis.status]}"]
    return "\n".join(lines) + "\n"


def run(*, as_json: bool = False, out: TextIO = sys.stdout) -> int:
    """Diagnose this machine, print the report; the exit status of ``coding-gym doctor``."""
    diagnosis = diagnose()
    if as_json:
        out.write(json.dumps({**asdict(diagnosis), "status": diagnosis.status}, indent=2) + "\n")
    else:
        out.write(format_text(diagnosis))
    return diagnosis.status
