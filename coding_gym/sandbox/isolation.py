"""Limits the worker applies to itself before it runs any code.

Runs inside the worker (standard library only). The parent adds what a process cannot do to
itself from inside: the cgroup (see ``cgroups.py``) and the wall-clock kill.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

_MB = 1024 * 1024

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


def _set_limit(kind: int, value: int) -> None:
    """Lower a resource limit; never try to raise a hard limit above what we were given."""
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def apply_rlimits(limits: dict[str, Any]) -> None:
    """Address space, file size, open files and core dumps, from a ``Limits`` as a dict."""
    _set_limit(resource.RLIMIT_AS, int(limits["memory_mb"]) * _MB)
    _set_limit(resource.RLIMIT_FSIZE, int(limits["max_file_mb"]) * _MB)
    _set_limit(resource.RLIMIT_NOFILE, int(limits["max_open_files"]))
    _set_limit(resource.RLIMIT_CORE, 0)
    # RLIMIT_NPROC counts every process of the uid and does not bind root; the pids cgroup is
    # the cap that holds. It still helps for unprivileged users.
    if os.geteuid() != 0:
        _set_limit(resource.RLIMIT_NPROC, int(limits["max_processes"]))


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to the worker, so the parent can still find them."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_child_subreaper = 36
        return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False
