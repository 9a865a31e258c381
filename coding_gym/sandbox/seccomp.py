"""A seccomp filter for the sandbox worker, compiled with libseccomp through ctypes.

The filter allows every system call except a deny list: sockets other than AF_UNIX (no
internet, no vsock, no netlink, no raw packets), debugging and memory access of other
processes, mounts, namespaces, kernel keyrings, BPF, perf events, io_uring (which could open
sockets behind the filter's back), module loading, kexec, reboot, clock setting and a few
more. Denied calls fail with EPERM, so agent code gets a plain ``PermissionError``. Calls of
another architecture (32-bit ``int 0x80`` on x86-64) kill the process.

Signals to the worker's ancestors and its zygote (and ``kill(-1, ...)``) are refused too: when
the worker keeps the caller's uid, that is what stops it from killing the process that runs
the env, or the zygote every episode of that process depends on.

Compiling takes about 1 ms and needs libseccomp; loading the compiled program needs neither.
:func:`compile_filter` caches the program per process, so a parent that forks workers compiles
once, before forking. Standard library only (the worker imports this module).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from coding_gym.sandbox.libc import libc

_ALLOW = 0x7FFF0000
_KILL_PROCESS = 0x80000000
_ERRNO = 0x00050000
_ATTR_ACT_BADARCH = 2
_CMP_GT = 6
_CMP_MASKED_EQ = 7
_AF_UNIX = 1
_U32 = 0xFFFFFFFF

_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_PR_SET_NO_NEW_PRIVS = 38

#: Refused with EPERM whatever their arguments. Names the kernel or libseccomp does not know
#: on this architecture are skipped.
DENIED_SYSCALLS: tuple[str, ...] = (
    # Other processes' memory and debugging.
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
    "pidfd_getfd",
    # Mounts and namespaces: the sandbox's own walls.
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns",
    # Kernel attack surface that sandboxed code has no use for.
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "keyctl", "add_key", "request_key", "lookup_dcookie",
    "fanotify_init", "open_by_handle_at", "modify_ldt", "iopl", "ioperm", "uselib",
    "ustat", "sysfs", "_sysctl", "syslog", "vhangup", "quotactl", "quotactl_fd",
    # The machine itself.
    "kexec_load", "kexec_file_load", "reboot", "init_module", "finit_module",
    "delete_module", "create_module", "swapon", "swapoff", "acct", "settimeofday",
    "clock_settime", "clock_adjtime", "sethostname", "setdomainname",
    # Superseded by tgkill; refusing it keeps the signal rules below complete.
    "tkill",
)

#: clone() flags that create namespaces; clone3 passes flags in memory the filter cannot
#: read, so it fails with ENOSYS and the C library falls back to clone.
_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000,
                    0x20000000, 0x40000000, 0x00000080)

#: Calls whose first argument is a pid that must not be one of the worker's ancestors.
_PID_CALLS = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open")


class SeccompUnavailable(OSError):
    """The filter cannot be compiled or loaded here; the message says why."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_library: ctypes.CDLL | None = None
_programs: dict[tuple[bool, tuple[int, ...]], bytes] = {}


def _load_libseccomp() -> ctypes.CDLL:
    """The library by its usual soname, else wherever ``find_library`` finds it.

    ``ctypes.util`` only when needed: it imports ``subprocess``, hence ``threading`` and
    ``random``, whose handlers run after every fork of the zygote (~0.8 ms of a new worker's
    CPU, most of it copy-on-write faults).
    """
    try:
        return ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        from ctypes.util import find_library

        name = find_library("seccomp")
        if name is None:
            raise
        return ctypes.CDLL(name, use_errno=True)


def _libseccomp() -> ctypes.CDLL:
    global _library
    if _library is None:
        try:
            lib = _load_libseccomp()
        except OSError as e:
            raise SeccompUnavailable(
                f"libseccomp is not installed ({e}); on Debian/Ubuntu: apt-get install libseccomp2"
            ) from e
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _library = lib
    return _library


_ancestors: dict[int, tuple[int, ...]] = {}


def protected_pids() -> tuple[int, ...]:
    """The worker's ancestors (parent first, init excluded): pids it must never signal.

    Read from /proc once per parent pid, not at every reset: a chain changes only when one of
    its processes exits, and a new parent is a new key. (A grandparent's exit leaves the
    cached chain naming it, and missing the subreaper that adopted our parent.)
    """
    parent = os.getppid()
    known = _ancestors.get(parent)
    if known is None:
        known = _ancestors[parent] = _read_ancestors(parent)
    return known


def _read_ancestors(pid: int) -> tuple[int, ...]:
    pids: list[int] = []
    while pid > 1 and len(pids) < 64:
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            break
        pid = int(stat[stat.rfind(b")") + 2:].split()[1])
    return tuple(pids)


def compile_filter(deny_network: bool, protected: tuple[int, ...]) -> bytes:
    """The filter as a classic BPF program (``struct sock_filter`` array), cached per process."""
    key = (deny_network, protected)
    program = _programs.get(key)
    if program is None:
        program = _programs[key] = _build(deny_network, protected)
    return program


def _build(deny_network: bool, protected: tuple[int, ...]) -> bytes:
    lib = _libseccomp()
    ctx = lib.seccomp_init(_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        eperm = _ERRNO | errno.EPERM
        _check(lib.seccomp_attr_set(ctx, _ATTR_ACT_BADARCH, _KILL_PROCESS), "set bad-arch action")
        for name in DENIED_SYSCALLS:
            _rule(lib, ctx, eperm, name)
        _rule(lib, ctx, _ERRNO | errno.ENOSYS, "clone3")
        for flag in _NAMESPACE_FLAGS:
            _rule(lib, ctx, eperm, "clone", (0, _CMP_MASKED_EQ, flag, flag))
        if deny_network:
            # Families are compared as 64-bit values, so any value but 0 and 1 is refused.
            for name in ("socket", "socketpair"):
                _rule(lib, ctx, eperm, name, (0, _CMP_GT, _AF_UNIX, 0))
        # pid_t is 32 bits: compare the low half only, or a forged high half slips through.
        targets = {-1 & _U32}
        for pid in protected:
            targets.add(pid)
            try:
                targets.add(-os.getpgid(pid) & _U32)
            except OSError:
                pass
        for name in _PID_CALLS:
            for target in sorted(targets):
                _rule(lib, ctx, eperm, name, (0, _CMP_MASKED_EQ, _U32, target))
        return _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def _rule(lib: ctypes.CDLL, ctx: int, action: int, name: str,
          compare: tuple[int, int, int, int] | None = None) -> None:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number < 0:
        return  # not a system call on this architecture
    args = (_ArgCmp * 1)(_ArgCmp(*compare)) if compare else None
    _check(lib.seccomp_rule_add_array(ctx, action, number, 1 if compare else 0, args),
           f"add a rule for {name}")


def _check(result: int, what: str) -> None:
    if result < 0:
        raise SeccompUnavailable(f"libseccomp could not {what}: {os.strerror(-result)}")


def _export(lib: ctypes.CDLL, ctx: int) -> bytes:
    read_fd, write_fd = os.pipe()
    try:
        _check(lib.seccomp_export_bpf(ctx, write_fd), "export the filter")
        os.close(write_fd)
        write_fd = -1
        chunks = []
        while chunk := os.read(read_fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def load(program: bytes) -> None:
    """Install ``program`` on every thread of this process, for good (no way to remove it)."""
    machine = os.uname().machine
    if machine not in _SYS_SECCOMP:
        raise SeccompUnavailable(f"no seccomp system call number known for {machine}")
    # Also stops setuid programs from regaining privileges once the uid has been dropped.
    if libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SeccompUnavailable(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    size = struct.calcsize("HBBI")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // size, ctypes.cast(buffer, ctypes.c_void_p).value)
    result = libc().syscall(_SYS_SECCOMP[machine], _SECCOMP_SET_MODE_FILTER,
                          _SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(fprog))
    if result > 0:
        raise SeccompUnavailable(f"seccomp(SET_MODE_FILTER): thread {result} could not be synced")
    if result != 0:
        raise SeccompUnavailable(f"seccomp(SET_MODE_FILTER): {os.strerror(ctypes.get_errno())}")
