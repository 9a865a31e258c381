"""The network and filesystem layers of a sandbox worker: its namespaces.

Building them costs ~2 ms, nearly all of it the same for every episode: a network namespace
with its loopback up, a mount namespace where every mount is read-only, a procfs and a /dev of
its own (``namespaces.py`` has the system calls). So a zygote's spare child enters them while
it waits for a request (:func:`build`), and the worker it becomes completes them for its
episode (:func:`finish`): /tmp, the home directories masked, the episode directory writable.

Runs inside the worker: standard library only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from coding_gym.sandbox import namespaces

_MB = 1024 * 1024
#: Directories hidden from the agent by the filesystem layer, except for what Python needs.
_HOME_DIRECTORIES = ("/root", "/home")
#: Directories the filesystem layer replaces with fresh private ones. An interpreter or a
#: virtual environment living below one of them (a checkout in /tmp, say) is bound back.
_PRIVATE_DIRECTORIES = ("/tmp", "/dev")

Report = dict[str, dict[str, Any]]


def layer(active: bool, detail: str) -> dict[str, Any]:
    """One layer's entry in an isolation report."""
    return {"active": active, "detail": detail}


def _on(report: Report, name: str, detail: str) -> None:
    report[name] = layer(True, detail)


def _off(report: Report, name: str, detail: str) -> None:
    report[name] = layer(False, detail)


@dataclass
class Walls:
    """The namespaces of a worker, built before its episode is known.

    Creating a network namespace, remounting the filesystem read-only and building /proc and
    /dev cost ~2 ms, the same for every episode. A zygote's spare child builds them while it
    waits for a request (:func:`build`); :func:`finish` completes them for the episode.
    """

    network: bool
    filesystem: bool
    unshare_error: str = ""
    in_user_namespace: bool = False
    loopback_error: str = ""
    sealed: namespaces.FilesystemResult | None = None
    seal_error: str = ""

    @property
    def kind(self) -> tuple[bool, bool]:
        return self.network, self.filesystem


def kind_of(config: Mapping[str, Any]) -> tuple[bool, bool]:
    """The (network, filesystem) namespaces ``config`` asks for: what :class:`Walls` to build."""
    layers = config["layers"]
    return bool(layers["network"]), bool(layers["filesystem"])


def build(network: bool, filesystem: bool) -> Walls:
    """Enter the namespaces asked for, and build what no episode changes in them."""
    walls = Walls(network, filesystem)
    if not (network or filesystem):
        return walls
    try:
        walls.in_user_namespace = namespaces.unshare(network, filesystem)
    except OSError as e:
        walls.unshare_error = str(e)
        return walls
    if network:
        try:
            namespaces.loopback_up()
        except OSError as e:
            walls.loopback_error = str(e)
    if filesystem:
        try:
            walls.sealed = namespaces.seal_filesystem()
        except OSError as e:
            walls.seal_error = str(e)
    return walls


def finish(config: Mapping[str, Any], hidden: list[str], walls: Walls) -> Report:
    """Complete ``walls`` for the episode of ``config``; the network and filesystem layers'
    report. ``hidden``: directories of the interpreter the episode's uid cannot enter."""
    report: Report = {}
    network, filesystem = walls.kind
    for name, on in (("network", network), ("filesystem", filesystem)):
        if not on:
            _off(report, name, "turned off")
    if not (network or filesystem):
        return report
    if walls.unshare_error:
        for name, on in (("network", network), ("filesystem", filesystem)):
            if on:
                _off(report, name, f"cannot create namespaces ({walls.unshare_error}); a "
                     "container needs CAP_SYS_ADMIN for them (and --network none keeps it off "
                     "the network)")
        return report
    if network:
        if walls.loopback_error:
            _on(report, "network",
                f"network namespace with no interface up (loopback: {walls.loopback_error})")
        else:
            _on(report, "network", "network namespace with loopback only")
    if filesystem:
        _finish_filesystem(config, hidden, report, walls)
    if walls.in_user_namespace:
        # Without this, agent code would keep CAP_SYS_ADMIN over its own namespaces.
        namespaces.drop_capabilities()
    return report


def _finish_filesystem(config: Mapping[str, Any], hidden: list[str], report: Report,
                       walls: Walls) -> None:
    if walls.seal_error:
        _off(report, "filesystem", f"could not set up the mount namespace: {walls.seal_error}")
        return
    masked = _masked(hidden)
    plan = namespaces.FilesystemPlan(
        workdir=config["workdir"],
        masked=masked,
        exposed=[path for path in python_paths()
                 if any(path.startswith(m + "/") for m in [*masked, *_PRIVATE_DIRECTORIES])],
        tmp_bytes=int(config["limits"]["memory_mb"]) * _MB,
    )
    try:
        result = namespaces.isolate_filesystem(plan, walls.sealed)
    except OSError as e:
        _off(report, "filesystem", f"could not set up the mount namespace: {e}")
        return
    if result.stuck:
        _off(report, "filesystem", "mounts that stayed writable: " + ", ".join(result.stuck))
        return
    hidden_text = f"; hidden: {', '.join(masked)}" if masked else ""
    proc_text = ("/proc showing only the uid's own processes" if result.processes_hidden
                 else "the machine's /proc")
    _on(report, "filesystem", "read-only, nosuid root; private /tmp, /dev, /dev/shm and IPC; "
        f"{proc_text}{hidden_text}; writable: {config['workdir']}")


@lru_cache(maxsize=1)
def python_paths() -> tuple[str, ...]:
    """Directories the interpreter reads from (standard library, site-packages, binary)."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.realpath(sys.executable))}
    candidates.update(path for path in sys.path if os.path.isabs(path))
    paths = set()
    for path in candidates:
        if not os.path.exists(path):
            continue
        real = os.path.realpath(path)
        paths.add(real if os.path.isdir(real) else os.path.dirname(real))
    # Keep the outermost only: binding a directory brings its subdirectories along.
    ordered = sorted(paths)
    kept: list[str] = []
    for path in ordered:
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return tuple(kept)


def unreachable_roots() -> list[str]:
    """The outermost ancestors of the interpreter's directories that ``uid`` cannot enter.

    Judged by the "other" permission bits, which are what apply to a uid of its own.
    """
    roots: list[str] = []
    for path in python_paths():
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            ancestor = "/" + "/".join(parts[:depth])
            try:
                if os.stat(ancestor).st_mode & 0o001:
                    continue
            except OSError:
                break
            if ancestor not in roots:
                roots.append(ancestor)
            break
    return roots


def _masked(hidden: list[str]) -> list[str]:
    """Directories to replace with an empty tmpfs: home directories and ``hidden``."""
    masked: list[str] = []
    for path in [*_HOME_DIRECTORIES, *hidden]:
        if os.path.isdir(path) and not os.path.islink(path) and not any(
            path == m or path.startswith(m + "/") for m in masked
        ):
            masked.append(path)
    return masked
