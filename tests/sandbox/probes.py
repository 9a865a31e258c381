"""Probes run inside an isolated test process: each returns what it could and could not do.

Standard library only, and no import of coding_gym: the process that runs them imports this
file before it drops its privileges, and may not be able to read much afterwards.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import Any

_SYSCALLS_X86_64 = {"ptrace": 101, "mount": 165, "unshare": 272, "bpf": 321, "keyctl": 250,
                    "perf_event_open": 298, "io_uring_setup": 425, "setns": 308,
                    "reboot": 169, "init_module": 175, "kexec_load": 246, "userfaultfd": 323}


def errno_of(call: Callable[[], Any]) -> int | None:
    """The errno ``call`` failed with, or None when it succeeded."""
    try:
        call()
    except OSError as e:
        return e.errno
    return None


def _write(path: str) -> int | None:
    return errno_of(lambda: open(path, "w").close())


def noop() -> None:
    return None


def uid() -> int:
    return os.getuid()


def sockets() -> dict[str, int | None]:
    results = {name: errno_of(lambda f=family: socket.socket(f, socket.SOCK_DGRAM).close())
               for name, family in (("inet", socket.AF_INET), ("inet6", socket.AF_INET6),
                                    ("netlink", socket.AF_NETLINK))}
    results["unix"] = errno_of(lambda: [s.close() for s in socket.socketpair()])
    return results


def network(port: int) -> dict[str, Any]:
    with open("/proc/net/dev") as f:
        names = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    with socket.socket() as server:  # loopback inside works
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=2):
            pass
    host = errno_of(lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close())
    return {"interfaces": names, "host": host}


def syscalls(names: list[str]) -> dict[str, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    results = {}
    for name in names:
        failed = libc.syscall(_SYSCALLS_X86_64[name], 0, 0, 0, 0) == -1
        results[name] = ctypes.get_errno() if failed else 0
    return results


def signals() -> dict[str, int | None]:
    return {"parent": errno_of(lambda: os.kill(os.getppid(), 0)),
            "everyone": errno_of(lambda: os.kill(-1, 0)),
            "own group": errno_of(lambda: os.kill(0, 0))}


def threads_and_subprocesses() -> str:
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    return subprocess.run(["/bin/sh", "-c", "echo hi"], capture_output=True, text=True).stdout


def filesystem() -> dict[str, Any]:
    return {"etc": _write("/etc/coding-gym-probe"), "usr": _write("/usr/coding-gym-probe"),
            "workdir": _write(os.path.join(os.getcwd(), "ok")), "tmp": _write("/tmp/ok"),
            "shm": _write("/dev/shm/ok"), "null": _write("/dev/null"),
            "cwd": os.getcwd(), "tmp_entries": sorted(os.listdir("/tmp"))}


def dev_and_ipc() -> dict[str, Any]:
    from multiprocessing import shared_memory

    memory = shared_memory.SharedMemory(create=True, size=16)
    name = memory.name
    memory.close()
    return {"dev": sorted(os.listdir("/dev")), "shm": name}


def home() -> list[str]:
    return sorted(os.listdir("/root"))


def lazy_numpy() -> dict[str, Any]:
    import importlib

    numpy = importlib.import_module("numpy")  # first imported after the uid drop
    return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "sum": int(numpy.arange(4).sum()), "owner": os.stat(".").st_uid}


def parents_secrets(secret: str) -> dict[str, Any]:
    def read(path: str) -> Any:
        try:
            with open(path, "rb") as f:
                return secret in f.read().decode(errors="replace")
        except OSError as e:
            return e.errno

    pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    return {"environ": read(f"/proc/{os.getppid()}/environ"),
            "cmdline": read(f"/proc/{os.getppid()}/cmdline"),
            "own env": any(secret in value for value in os.environ.values()),
            "others": [pid for pid in pids if pid != os.getpid()]}


def priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def unprivileged() -> dict[str, Any]:
    return {"uid": os.getuid(), "etc": _write("/etc/coding-gym-probe"),
            "inet": errno_of(lambda: socket.socket().close())}


def capabilities() -> dict[str, Any]:
    libc = ctypes.CDLL(None, use_errno=True)
    # MS_REMOUNT | MS_BIND: would make the root writable again with CAP_SYS_ADMIN.
    result = libc.mount(None, b"/", None, 0x20 | 0x1000, None)
    with open("/proc/self/status") as f:
        effective = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    return {"remount": ctypes.get_errno() if result else 0, "caps": effective}


def become_nobody() -> None:
    """Run before the isolation: turn this root process into an unprivileged one."""
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
