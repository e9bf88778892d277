"""Linux kernel isolation primitives through ctypes: namespaces, seccomp (filter in seccomp.py), Landlock,
prctl, capabilities.

Importable anywhere. On other systems, or where a kernel feature is missing, the functions raise OSError,
so that the worker can report the layer as unavailable and warn, instead of failing at import time.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

from reftkit.executor import seccomp

IS_LINUX = sys.platform.startswith("linux")
MACHINE = platform.machine().lower()
ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(MACHINE)

_libc = ctypes.CDLL(None, use_errno=True) if IS_LINUX else None
if _libc is not None:  # typed once here: calls in the children then stay on ctypes' fast paths
    _libc.syscall.restype = ctypes.c_long
    _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _libc.prctl.restype = ctypes.c_int
    _libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    _libc.capset.restype = ctypes.c_int
    _syscall2 = ctypes.CDLL(None, use_errno=True).syscall  # a separately typed handle for 2-argument calls
    _syscall2.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_long]
    _syscall2.restype = ctypes.c_long
# PyDLL keeps the GIL across the call: a fork() through it leaves the child with a consistent interpreter.
_pylibc = ctypes.PyDLL(None, use_errno=True) if IS_LINUX else None

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _need_linux(what: str) -> None:
    if not IS_LINUX:
        raise OSError(0, f"{what}: not available on {sys.platform}")


def prctl(option: int, arg: int = 0, arg3: int = 0) -> None:
    _need_linux("prctl")
    if _libc.prctl(option, arg, arg3, 0, 0) != 0:
        raise _fail(f"prctl({option})")


def _syscall(nr: int, *args: int | ctypes.c_void_p | None) -> int:
    _need_linux("syscall")
    conv = [a if isinstance(a, ctypes.c_void_p) or a is None else ctypes.c_long(a) for a in args]
    ret = _libc.syscall(ctypes.c_long(nr), *conv)
    if ret < 0:
        raise _fail(f"syscall {nr}")
    return ret


def fork(raw: bool = True) -> int:
    """fork(2), by default without CPython's at-fork bookkeeping (about 100 page faults cheaper per child).

    Only for a caller with no other Python thread, whose child never starts threads and leaves with
    os._exit (the worker checks the first); os.fork otherwise, and off Linux.
    """
    if _pylibc is None or not raw:
        return os.fork()
    pid = _pylibc.fork()
    if pid < 0:
        raise _fail("fork")
    return pid


def release_free_memory() -> None:
    """Hands the C heap's free pages back to the kernel (glibc's malloc_trim; a no-op elsewhere): every fork
    copies the page-table entries of the caller's memory, so fewer pages make every fork cheaper."""
    trim = getattr(_libc, "malloc_trim", None) if _libc is not None else None
    if trim is not None:
        trim(0)


def unshare_pid_namespace() -> None:
    """The calling process's next children go into a new PID namespace, whose PID 1 is the first of them
    (needs CAP_SYS_ADMIN in the caller's user namespace). The caller itself stays where it is, so none of
    those children can see it; if that PID 1 ends, later forks fail (ENOMEM)."""
    _need_linux("unshare")
    if _libc.unshare(CLONE_NEWPID) != 0:
        raise _fail("unshare(CLONE_NEWPID)")


def unshare_namespaces() -> tuple[str, str]:
    """Moves the calling (single-threaded) worker into fresh network and IPC namespaces, inherited by every
    child: loopback only (down), and no SysV/POSIX IPC object shared with anything outside (what a child
    could leave behind there dies with the worker).

    Tries plain namespaces (needs CAP_SYS_ADMIN), then the same inside a new user namespace (unprivileged,
    where the distribution allows it; the worker keeps its own uid and gid through a one-line id map, and
    gains the capabilities inside that namespace that make a PID namespace per child possible).
    Returns (network description, IPC description); raises OSError if no combination works.
    """
    _need_linux("unshare")
    errors = []
    for flags, made in ((CLONE_NEWNET | CLONE_NEWIPC, "new"), (CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC,
                                                             "new user +")):
        uid, gid = os.getuid(), os.getgid()
        if _libc.unshare(flags) == 0:
            if flags & CLONE_NEWUSER:
                _map_own_ids(uid, gid)
            return f"on: {made} network namespace", f"on: {made} IPC namespace"
        errors.append(_fail(f"unshare({flags:#x})").strerror)
    raise OSError(0, "; ".join(errors))


def _map_own_ids(uid: int, gid: int) -> None:
    """uid and gid map to themselves in the user namespace just created (best effort: without a map they
    read as the overflow id, which changes nothing the kernel checks)."""
    for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError:
            return


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_CAP_HEADER = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, calling thread
_CAP_NONE = (_CapData * 2)()  # all zero: no effective, permitted or inheritable capability


def drop_capabilities() -> None:
    """Clears every capability of the calling thread (effective, permitted, inheritable)."""
    _need_linux("capset")
    if _libc.capset(ctypes.addressof(_CAP_HEADER), ctypes.addressof(_CAP_NONE)) != 0:
        raise _fail("capset")


# ---------------------------------------------------------------------------------------------- Landlock

_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446  # same on all arches
_LL_READ_FILE, _LL_READ_DIR = 1 << 2, 1 << 3


def landlock_abi() -> int:
    """Landlock ABI version of the running kernel; raises OSError when Landlock is unavailable."""
    return _syscall(_LANDLOCK_CREATE_RULESET, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION


def _landlock_handled(abi: int) -> tuple[int, int, int, int]:
    """(handled fs rights, handled net rights, scopes, attr size) for an ABI version."""
    fs = (1 << 13) - 1  # ABI 1: execute, write, read, read dir, remove, make char/dir/reg/sock/fifo/block/sym
    if abi >= 2:
        fs |= 1 << 13  # refer (link/rename across dirs)
    if abi >= 3:
        fs |= 1 << 14  # truncate
    if abi >= 5:
        fs |= 1 << 15  # ioctl on devices
    net = 0b11 if abi >= 4 else 0  # TCP bind and connect: no rule grants them
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals outside the sandbox
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    return fs, net, scoped, size


def landlock_ruleset(read_roots: list[str]) -> tuple[int, int]:
    """A ruleset fd that allows only reading files and listing directories under read_roots.

    Everything else Landlock can govern on this kernel is denied: writes, creation, removal, execution,
    truncation, device ioctls, TCP bind/connect (ABI >= 4), signals to processes outside (ABI >= 6).
    Returns (fd, abi). The fd is applied in each child with landlock_restrict().
    """
    abi = landlock_abi()
    fs, net, scoped, size = _landlock_handled(abi)
    attr = ctypes.create_string_buffer(struct.pack("=QQQ", fs, net, scoped)[:size], size)
    fd = _syscall(_LANDLOCK_CREATE_RULESET, ctypes.c_void_p(ctypes.addressof(attr)), size, 0)
    try:
        for root in read_roots:
            _landlock_allow_read(fd, root)
    except OSError:
        os.close(fd)
        raise
    return fd, abi


def _landlock_allow_read(ruleset_fd: int, path: str) -> None:
    dir_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        rights = _LL_READ_FILE | (_LL_READ_DIR if os.path.isdir(path) else 0)
        rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, dir_fd), 12)  # packed path_beneath attr
        _syscall(_LANDLOCK_ADD_RULE, ruleset_fd, 1, ctypes.c_void_p(ctypes.addressof(rule)), 0)
    finally:
        os.close(dir_fd)


def landlock_restrict(ruleset_fd: int) -> None:
    """Applies a ruleset to the calling thread for good (needs no_new_privs or CAP_SYS_ADMIN)."""
    _need_linux("landlock")
    if _syscall2(_LANDLOCK_RESTRICT_SELF, ruleset_fd, 0) != 0:
        raise _fail("landlock_restrict_self")


# ----------------------------------------------------------------------------------------------- seccomp


def seccomp_filter(part: str = "whole") -> bytes:
    """The filter's BPF bytes for this machine, whole or one of its halves (seccomp.py); raises OSError on an
    architecture without a syscall table."""
    if not IS_LINUX or ARCH is None:
        raise OSError(0, f"seccomp: no syscall table for {sys.platform}/{MACHINE}")
    return seccomp.build_filter(ARCH, part)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class SeccompProgram:
    """A prepared filter: built once in the worker, installed with one prctl call (in each child, or in the
    worker itself for the half that every child inherits)."""

    def __init__(self, bpf: bytes) -> None:
        self._buffer = ctypes.create_string_buffer(bpf, len(bpf))
        self._fprog = _SockFprog(len(bpf) // 8, ctypes.addressof(self._buffer))
        self._address = ctypes.addressof(self._fprog)

    def install(self) -> None:
        """Irreversible for the calling thread; needs no_new_privs (or CAP_SYS_ADMIN)."""
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._address)


