"""Linux namespaces for the sandbox worker: no network, a read-only filesystem, private IPC.

Runs inside the worker, before any agent code and while it is still single-threaded. As root
it unshares the namespaces directly; as another user it first creates a user namespace (where
the kernel allows it) that maps the user to itself, and drops the capabilities that namespace
granted once the walls are built.

The filesystem the agent sees: every mount read-only and ``nosuid``; a fresh tmpfs on /tmp
and /dev/shm; a minimal /dev (null, zero, full, random, urandom, tty, a private devpts);
home directories replaced by empty tmpfs that show only the paths the interpreter needs; the
episode directory bound read-write at its own path. Standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import socket
import struct
from dataclasses import dataclass, field

from coding_gym.sandbox.libc import error, libc

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_NOATIME = 0x400
_MS_NODIRATIME = 0x800
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MS_RELATIME = 0x200000
_MS_STRICTATIME = 0x1000000
_MNT_DETACH = 0x2
_SYS_MOUNT_SETATTR = 442  # the same on every architecture (added in Linux 5.12)
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_OPTION_FLAGS = {b"nosuid": _MS_NOSUID, b"nodev": _MS_NODEV, b"noexec": _MS_NOEXEC,
                 b"noatime": _MS_NOATIME, b"nodiratime": _MS_NODIRATIME,
                 b"relatime": _MS_RELATIME}

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sH22x")

_PR_SET_DUMPABLE = 4
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522

#: Device nodes of the minimal /dev.
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
              "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}

def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    args = [None if value is None else os.fsencode(value) for value in (source, target, fstype)]
    if libc().mount(args[0], args[1], args[2], ctypes.c_ulong(flags),
                  None if data is None else data.encode()) != 0:
        raise error(f"mount {target}")


def unshare(network: bool, filesystem: bool) -> bool:
    """Enter new namespaces; True when a user namespace had to be made (not root)."""
    flags = (CLONE_NEWNET if network else 0) | (CLONE_NEWNS | CLONE_NEWIPC if filesystem else 0)
    if not flags:
        return False
    as_user = os.geteuid() != 0
    uid, gid = os.geteuid(), os.getegid()
    if as_user:
        # A process that changed uid on its way here is not dumpable, and a process that is
        # not dumpable cannot write its own uid_map.
        libc().prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    if libc().unshare(flags | (CLONE_NEWUSER if as_user else 0)) != 0:
        raise error("unshare" + (" (with a user namespace, as a non-root user)" if as_user else ""))
    if as_user:
        # Map the user to itself, so files keep their owners and the uid stays unprivileged.
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    return as_user


def drop_capabilities() -> None:
    """Give up every capability, so a user namespace's root powers end with the setup."""
    header = struct.pack("Ii", _CAPABILITY_VERSION_3, 0)
    data = bytes(24)  # effective, permitted, inheritable, for both 32-bit halves
    if libc().capset(header, data) != 0:
        raise error("capset")
    libc().prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def loopback_up() -> None:
    """Bring up ``lo``: a new network namespace starts with it down."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        reply = fcntl.ioctl(sock, _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0))
        flags = _IFREQ.unpack(reply)[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


@dataclass
class FilesystemPlan:
    """What :func:`isolate_filesystem` builds.

    Attributes:
        workdir: The episode's directory, the one writable place besides /tmp and /dev/shm.
        masked: Directories replaced by an empty read-only tmpfs (home directories, and the
            directories the worker's uid may not enter).
        exposed: Paths under ``masked`` the interpreter needs, bound back read-only.
        tmp_bytes: Size of the private /tmp and /dev/shm.
    """

    workdir: str
    masked: list[str] = field(default_factory=list)
    exposed: list[str] = field(default_factory=list)
    tmp_bytes: int = 256 << 20


@dataclass
class FilesystemResult:
    """What :func:`isolate_filesystem` could not do: writable mounts left, process list."""

    stuck: list[str] = field(default_factory=list)
    processes_hidden: bool = False


def seal_filesystem() -> FilesystemResult:
    """The part of the worker's filesystem that no episode changes, built ahead of time.

    Every mount read-only, nosuid and private; a procfs of our own; the minimal /dev. A
    zygote's spare child builds it while it waits for a request (see ``isolation.Walls``);
    :func:`isolate_filesystem` finishes it for one episode. Raises OSError when the root
    itself cannot be made read-only.
    """
    devices = [(f"/dev/{name}", _open_path(f"/dev/{name}"))
               for name in _DEVICES if os.path.exists(f"/dev/{name}")]
    try:
        result = FilesystemResult(stuck=_make_read_only())
        result.processes_hidden = _private_proc()
        _build_dev(devices)
    finally:
        for _, fd in devices:
            os.close(fd)
    return result


def isolate_filesystem(plan: FilesystemPlan,
                       sealed: FilesystemResult | None = None) -> FilesystemResult:
    """Build the worker's view of the filesystem (in a fresh mount namespace).

    ``sealed`` is what :func:`seal_filesystem` returned in this namespace, if it ran already.
    The result lists the mount points that could be neither made read-only nor hidden (none
    when the whole filesystem is read-only). Raises OSError when the root itself cannot be.
    """
    # Handles on everything bound back later, taken before tmpfs mounts cover the paths.
    binds = []
    for path in plan.exposed:
        try:
            binds.append((path, _open_path(path)))
        except PermissionError:
            pass  # this user cannot read it outside the sandbox either
    workdir = _open_path(plan.workdir)
    try:
        result = sealed if sealed is not None else seal_filesystem()
        tmp_options = f"mode=1777,size={plan.tmp_bytes},nr_inodes=65536"
        _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, tmp_options)
        # On the read-only /dev: mounting over a directory writes nothing to it.
        _mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, tmp_options)
        for path in plan.masked:
            _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV,
                   "mode=755,size=1m,nr_inodes=4096")
        for path, fd in binds:
            _makedirs(path)
            _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND)
        for path in plan.masked:
            _mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
        _makedirs(plan.workdir)
        _mount(f"/proc/self/fd/{workdir}", plan.workdir, None, _MS_BIND)
        # A bind inherits the read-only flag of its source mount: lift it for this one.
        _mount(None, plan.workdir, None, _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV)
        os.chdir(plan.workdir)
    finally:
        for fd in [fd for _, fd in binds] + [workdir]:
            os.close(fd)
    return result


def _open_path(path: str) -> int:
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


def _makedirs(path: str) -> None:
    """Create the missing directories of ``path``, each 0755 whatever the umask."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.mkdir(directory)
        os.chmod(directory, 0o755)


def _unescape(field: bytes) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes.
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


def _mounts() -> list[tuple[str, int]]:
    """(mount point, flags to keep) of every mount in this namespace, parents first."""
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            options = fields[5].split(b",")
            flags = 0
            for option in options:
                flags |= _OPTION_FLAGS.get(option, 0)
            if not flags & (_MS_RELATIME | _MS_NOATIME):
                flags |= _MS_STRICTATIME  # a user namespace may not change locked atime flags
            found.append((_unescape(fields[4]), flags))
    return found


def _make_read_only() -> list[str]:
    """Make every mount private, read-only and nosuid; hide (detach) those that refuse.

    Returns the mount points that could be neither changed nor hidden.
    """
    # One call for the whole tree where the kernel has it; else one remount per mount.
    attr = struct.pack("QQQQ", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, _MS_PRIVATE, 0)
    if libc().syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, attr, len(attr)) == 0:
        return []
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    stuck = []
    for mount_point, flags in _mounts():
        try:
            _mount(None, mount_point, None,
                   _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | flags)
            continue
        except OSError as e:
            # Covered by another mount, or below a directory this user may not enter: out of
            # reach of the agent's code as well.
            if e.errno in (errno.ENOENT, errno.EACCES):
                continue
            if mount_point == "/":
                raise
            failure = e
        if libc().umount2(os.fsencode(mount_point), _MNT_DETACH) != 0:
            stuck.append(f"{mount_point} ({failure.strerror})")
    return stuck


def _private_proc() -> bool:
    """A procfs of our own that shows other uids' processes to nobody but root.

    Without it, code could list every process of the machine and read their command lines
    (a server's ``--token``). Only from Linux 5.8, where each proc mount is an instance of its
    own: before, the options would change the machine's /proc as well.
    """
    release = tuple(int(part) for part in re.findall(r"\d+", os.uname().release)[:2])
    if release < (5, 8):
        return False
    try:
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY,
               "hidepid=invisible")
    except OSError:
        return False
    return True


def _build_dev(devices: list[tuple[str, int]]) -> None:
    """A minimal, read-only /dev: device nodes bound from the real one, a private devpts, and
    an empty /dev/shm for the episode's tmpfs."""
    _mount("tmpfs", "/dev", "tmpfs", _MS_NOSUID | _MS_NOEXEC, "mode=755,size=64k,nr_inodes=64")
    for path, fd in devices:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND)
    for name, target in _DEV_LINKS.items():
        os.symlink(target, f"/dev/{name}")
    for name in ("shm", "pts"):
        os.mkdir(f"/dev/{name}")
        os.chmod(f"/dev/{name}", 0o755)
    try:
        _mount("devpts", "/dev/pts", "devpts", _MS_NOSUID | _MS_NOEXEC,
               "newinstance,ptmxmode=0666,mode=0620")
    except OSError:
        pass  # no pseudo-terminals then: os.openpty() fails, nothing else does
    _mount(None, "/dev", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NOEXEC)
