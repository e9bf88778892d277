"""Linux kernel isolation primitives through ctypes: namespaces, seccomp, Landlock, prctl, capabilities.

Importable anywhere. On other systems, or where a kernel feature is missing, the functions raise OSError,
so that the worker can report the layer as unavailable and warn, instead of failing at import time.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

IS_LINUX = sys.platform.startswith("linux")
MACHINE = platform.machine().lower()

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
PR_SET_SECCOMP = 22
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
CLONE_NEWUSER = 0x10000000
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


def unshare_network() -> str:
    """Moves the calling (single-threaded) process into a fresh network namespace: loopback only, down.

    Tries a plain network namespace (needs CAP_SYS_ADMIN), then one inside a new user namespace (works
    unprivileged where the distribution allows it). Returns a description; raises OSError if neither works.
    """
    _need_linux("unshare")
    if _libc.unshare(CLONE_NEWNET) == 0:
        return "on: new network namespace"
    first = _fail("unshare(CLONE_NEWNET)")
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return "on: new user + network namespace"
    second = _fail("unshare(CLONE_NEWUSER|CLONE_NEWNET)")
    raise OSError(second.errno, f"{first.strerror}; {second.strerror}")


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

# Denied with EPERM: process creation and exec, signals and tracing of other processes, sockets, namespace
# and mount operations, every file-system mutation, kernel keyrings/modules/bpf/io_uring and similar
# attack surface no arithmetic program needs. Everything else is allowed (a deny list keeps CPython and
# its extension modules working without an audit of every syscall they make).
_DENY_COMMON = (
    "clone", "clone3", "execve", "execveat", "kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
    "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "socket", "socketpair", "bind", "listen", "accept", "accept4", "connect",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "reboot", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "swapon", "swapoff", "acct", "syslog", "bpf", "perf_event_open",
    "userfaultfd", "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "personality", "seccomp", "prctl", "sethostname", "setdomainname", "settimeofday", "clock_settime",
    "quotactl", "fanotify_init", "name_to_handle_at", "open_by_handle_at", "openat2",
    "unlinkat", "renameat", "renameat2", "mkdirat", "linkat", "symlinkat", "fchmod", "fchmodat", "fchmodat2",
    "fchown", "fchownat", "truncate", "ftruncate", "mknodat", "utimensat", "fallocate", "setxattr", "lsetxattr",
    "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
)
_DENY_X86_64_ONLY = (
    "fork", "vfork", "unlink", "rename", "rmdir", "mkdir", "link", "symlink", "chmod", "chown", "lchown",
    "creat", "mknod", "utime", "utimes", "futimesat", "iopl", "ioperm",
)
_NR = {
    "x86_64": {
        "clone": 56, "clone3": 435, "execve": 59, "execveat": 322, "kill": 62, "tkill": 200, "tgkill": 234,
        "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "pidfd_open": 434, "pidfd_send_signal": 424,
        "pidfd_getfd": 438, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
        "socket": 41, "socketpair": 53, "bind": 49, "listen": 50, "accept": 43, "accept4": 288, "connect": 42,
        "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "reboot": 169, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "swapon": 167, "swapoff": 168, "acct": 163, "syslog": 103,
        "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250, "add_key": 248,
        "request_key": 249, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "personality": 135, "seccomp": 317, "prctl": 157, "sethostname": 170, "setdomainname": 171,
        "settimeofday": 164, "clock_settime": 227, "quotactl": 179, "fanotify_init": 300,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "openat2": 437, "unlinkat": 263, "renameat": 264,
        "renameat2": 316, "mkdirat": 258, "linkat": 265, "symlinkat": 266, "fchmod": 91, "fchmodat": 268,
        "fchmodat2": 452, "fchown": 93, "fchownat": 260, "truncate": 76, "ftruncate": 77, "mknodat": 259,
        "utimensat": 280, "fallocate": 285, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
        "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "fork": 57, "vfork": 58, "unlink": 87,
        "rename": 82, "rmdir": 84, "mkdir": 83, "link": 86, "symlink": 88, "chmod": 90, "chown": 92,
        "lchown": 94, "creat": 85, "mknod": 133, "utime": 132, "utimes": 235, "futimesat": 261, "iopl": 172,
        "ioperm": 173, "open": 2, "openat": 257,
    },
    "aarch64": {  # asm-generic numbering
        "clone": 220, "clone3": 435, "execve": 221, "execveat": 281, "kill": 129, "tkill": 130, "tgkill": 131,
        "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240, "pidfd_open": 434, "pidfd_send_signal": 424,
        "pidfd_getfd": 438, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272,
        "socket": 198, "socketpair": 199, "bind": 200, "listen": 201, "accept": 202, "accept4": 242,
        "connect": 203, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "reboot": 142, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "swapon": 224, "swapoff": 225, "acct": 89, "syslog": 116,
        "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "keyctl": 219, "add_key": 217,
        "request_key": 218, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "personality": 92, "seccomp": 277, "prctl": 167, "sethostname": 161, "setdomainname": 162,
        "settimeofday": 170, "clock_settime": 112, "quotactl": 60, "fanotify_init": 262,
        "name_to_handle_at": 264, "open_by_handle_at": 265, "openat2": 437, "unlinkat": 35, "renameat": 38,
        "renameat2": 276, "mkdirat": 34, "linkat": 37, "symlinkat": 36, "fchmod": 52, "fchmodat": 53,
        "fchmodat2": 452, "fchown": 55, "fchownat": 54, "truncate": 45, "ftruncate": 46, "mknodat": 33,
        "utimensat": 88, "fallocate": 47, "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14,
        "lremovexattr": 15, "fremovexattr": 16, "openat": 56,
    },
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_OPEN_WRITE_FLAGS = 0x643  # O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND (x86_64 and aarch64)

_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM = 1


def _arch() -> str | None:
    return {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(MACHINE)


def _assemble(program: list[tuple]) -> bytes:
    """Classic BPF from (code, k, jump-if-true label, jump-if-false label) tuples and ("label", name)."""
    labels: dict[str, int] = {}
    insns: list[tuple] = []
    for item in program:
        if item[0] == "label":
            labels[item[1]] = len(insns)
        else:
            insns.append(item)
    out = bytearray()
    for index, (code, k, jt, jf) in enumerate(insns):
        offsets = [0 if t is None else labels[t] - index - 1 for t in (jt, jf)]
        if not all(0 <= o < 256 for o in offsets):
            raise ValueError("seccomp filter too long for 8-bit jumps")
        out += struct.pack("=HBBI", code, offsets[0], offsets[1], k)
    return bytes(out)


def seccomp_filter() -> bytes:
    """The filter's BPF bytes for this machine; raises OSError on an architecture without a syscall table."""
    arch = _arch()
    if not IS_LINUX or arch is None:
        raise OSError(0, f"seccomp: no syscall table for {sys.platform}/{MACHINE}")
    nr = _NR[arch]
    names = _DENY_COMMON + (_DENY_X86_64_ONLY if arch == "x86_64" else ())
    prog: list[tuple] = [
        (_LD_W_ABS, 4, None, None),  # architecture
        (_JEQ_K, _AUDIT_ARCH[arch], None, "kill"),
        (_LD_W_ABS, 0, None, None),  # syscall number
    ]
    if arch == "x86_64":
        prog.append((_JGE_K, 0x40000000, "deny", None))  # x32 ABI numbers: never needed, deny them all
    prog += [(_JEQ_K, nr[name], "deny", None) for name in names if name in nr]
    # open()/openat() may only read: a write, create, truncate or append flag is refused.
    checks = [("open", 1), ("openat", 2)] if arch == "x86_64" else [("openat", 2)]
    prog += [(_JEQ_K, nr[name], f"check_{name}", None) for name, _ in checks]
    prog.append((_RET_K, _RET_ALLOW, None, None))
    for name, arg in checks:
        prog += [("label", f"check_{name}"), (_LD_W_ABS, 16 + 8 * arg, None, None)]
        prog += [(_JSET_K, _OPEN_WRITE_FLAGS, "deny", None), (_RET_K, _RET_ALLOW, None, None)]
    prog += [("label", "deny"), (_RET_K, _RET_ERRNO | _EPERM, None, None)]
    prog += [("label", "kill"), (_RET_K, _RET_KILL_PROCESS, None, None)]
    return _assemble(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class SeccompProgram:
    """A prepared filter: built once in the worker, installed in each child with one prctl call."""

    def __init__(self, bpf: bytes) -> None:
        self._buffer = ctypes.create_string_buffer(bpf, len(bpf))
        self._fprog = _SockFprog(len(bpf) // 8, ctypes.addressof(self._buffer))

        self._address = ctypes.addressof(self._fprog)

    def install(self) -> None:
        """Irreversible for the calling thread; needs no_new_privs (or CAP_SYS_ADMIN)."""
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._address)


