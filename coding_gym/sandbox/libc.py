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
