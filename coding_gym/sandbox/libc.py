"""The C library through ctypes, loaded once per process, for calls ``os`` does not offer."""

from __future__ import annotations

import ctypes
import os

_handle: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The process's C library; failed calls leave their errno for :func:`error`."""
    global _handle
    if _handle is None:
        _handle = ctypes.CDLL(None, use_errno=True)
    return _handle


def error(what: str) -> OSError:
    """An OSError for the errno of the C call that just failed."""
    number = ctypes.get_errno()
    return OSError(number, f"{what}: {os.strerror(number)}")


_PR_SET_NAME = 15


def set_process_name(name: str) -> None:
    """The process's name (``ps -o comm``, /proc/PID/comm), 15 bytes at most. Through the
    one handle: the zygote names itself first, so its children find ``prctl`` looked up (a
    new handle would build a ctypes class in each)."""
    try:
        libc().prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


#: ``mallopt`` parameters (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def mallopt(param: int, value: int) -> bool:
    """Set a glibc malloc parameter; False where the C library has no ``mallopt`` or refuses."""
    try:
        function = libc().mallopt
    except AttributeError:
        return False
    return bool(function(param, value))
