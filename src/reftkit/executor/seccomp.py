"""The children's seccomp-BPF filter: which system calls kill the program, which fail with a named error.

Two tiers, both decided by the kernel, so that they hold when every in-Python layer has been bypassed:

* **kill** (SECCOMP_RET_KILL_PROCESS): calls that no arithmetic program and no allowed library makes, and
  that an escaped program would use to reach outside its child: processes and threads, exec, signals and
  tracing of other processes, other processes' resource limits (`prlimit64` with a pid other than 0),
  SysV and POSIX message-queue IPC, signal delivery through descriptors (`fcntl` F_SETOWN/F_SETSIG/
  F_SETOWN_EX/F_SETLEASE/F_NOTIFY, `ioctl` FIOSETOWN/SIOCSPGRP), sockets, namespaces and mounts (the mount
  API, listmount/statmount), credentials, scheduling of other processes, clocks, POSIX timers (each one
  holds a unit of the user's host-wide RLIMIT_SIGPENDING count), file-system watches (inotify, fanotify),
  kernel interfaces (bpf, perf, userfaultfd, keyrings, io_uring, AIO, modules...).
  The child dies with SIGSYS, which the worker sees and reports as `forbidden`: the program cannot catch
  it, retry, or hide the attempt (it cannot forge a status it is not alive to write).
* **named error** (SECCOMP_RET_ERRNO with errno ERRNO_BASE + syscall number): file-system mutations, data
  and metadata, writeback of other processes' data (sync, syncfs, fsync, fdatasync, sync_file_range, msync)
  (Landlock governs neither chmod/chown/utime nor extended attributes, ACLs or inode flags),
  `open`/`openat` with a write, create, truncate or append flag, and `ioctl` with any request but a few
  harmless ones that CPython makes (so no FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR... on a file opened for
  reading, which needs no write access, only ownership). Libraries that try to write a cache fail
  gracefully; the sandbox turns the errno back into the syscall's name (`syscall_of_errno`).

Everything else is allowed: a deny list keeps CPython and its extension modules working without an audit
of every call they make (an allow list would kill a program the first time a library needs a new one).
Except calls newer than the audit (FIRST_UNAUDITED and up): they fail with ENOSYS, as on an older kernel,
so that a kernel upgrade cannot open a hole nobody has looked at (Linux 6.13 and 6.17 added setxattrat,
removexattrat and file_setattr, which changed files outside the child until they were listed here).
The list was audited against "what could a program with native code execution reach outside its own
child through this call"; what stays allowed acts on the caller only (memory, its own descriptors, time,
its own signals and limits), and the worker's PID namespace leaves no other process to name but an idle
PID 1 that the kernel protects from signals sent inside the namespace.
"""

from __future__ import annotations

import struct

ERRNO_BASE = 3072  # + syscall number: far above real errnos (< 200) and the kernel's restart codes (512-530)

# name: (x86_64 number, aarch64 number or None)
KILL_CALLS = {
    # processes, exec
    "clone": (56, 220), "clone3": (435, 435), "fork": (57, None), "vfork": (58, None), "execve": (59, 221),
    "execveat": (322, 281),
    # other processes: signals, tracing, memory, limits, scheduling
    "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240), "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424),
    "pidfd_getfd": (438, 438), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "kcmp": (312, 272), "process_madvise": (440, 440),
    "process_mrelease": (448, 448), "migrate_pages": (256, 238), "move_pages": (279, 239),
    "setpriority": (141, 140), "ioprio_set": (251, 30), "sched_setscheduler": (144, 119),
    "sched_setparam": (142, 118), "sched_setattr": (314, 274), "sched_setaffinity": (203, 122),
    # POSIX timers: each one charges the user's RLIMIT_SIGPENDING count, which is host-wide (shared with the
    # trainer and every process of the uid): ~96,000 of them in a child left none for anyone else. The
    # shared child's own timers are setitimer(2) timers, which charge nothing.
    "timer_create": (222, 107),
    # IPC that outlives the program: SysV shared memory, semaphores, message queues; POSIX message queues
    "shmget": (29, 194), "shmat": (30, 196), "shmctl": (31, 195), "shmdt": (67, 197), "semget": (64, 190),
    "semop": (65, 193), "semctl": (66, 191), "semtimedop": (220, 192), "msgget": (68, 186),
    "msgsnd": (69, 189), "msgrcv": (70, 188), "msgctl": (71, 187), "mq_open": (240, 180),
    "mq_unlink": (241, 181), "mq_timedsend": (242, 182), "mq_timedreceive": (243, 183),
    "mq_notify": (244, 184), "mq_getsetattr": (245, 185),
    # network
    "socket": (41, 198), "socketpair": (53, 199), "bind": (49, 200), "listen": (50, 201), "accept": (43, 202),
    "accept4": (288, 242), "connect": (42, 203),
    # namespaces, mounts, credentials
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442), "open_tree_attr": (467, 467), "statmount": (457, 457),
    "listmount": (458, 458), "setuid": (105, 146), "setgid": (106, 144), "setreuid": (113, 145),
    "setregid": (114, 143), "setresuid": (117, 147), "setresgid": (119, 149), "setgroups": (116, 159),
    "setfsuid": (122, 151), "setfsgid": (123, 152), "capset": (126, 91),
    # kernel interfaces and attack surface no program needs
    "reboot": (169, 142), "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "swapon": (167, 224), "swapoff": (168, 225),
    "acct": (163, 89), "syslog": (103, 116), "bpf": (321, 280), "perf_event_open": (298, 241),
    "userfaultfd": (323, 282), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "io_setup": (206, 0), "io_destroy": (207, 1), "io_getevents": (208, 4), "io_submit": (209, 2),
    "io_cancel": (210, 3), "personality": (135, 92), "seccomp": (317, 277), "prctl": (157, 167),
    "sethostname": (170, 161), "setdomainname": (171, 162), "settimeofday": (164, 170),
    "clock_settime": (227, 112), "adjtimex": (159, 171), "clock_adjtime": (305, 266),
    "quotactl": (179, 60), "quotactl_fd": (443, 443),
    # watches on any path (Landlock does not govern them): events of directories outside the read roots, and
    # the user's host-wide watch and instance counts
    "fanotify_init": (300, 262), "fanotify_mark": (301, 263), "inotify_init": (253, None),
    "inotify_init1": (294, 26), "inotify_add_watch": (254, 27),
    "name_to_handle_at": (303, 264), "open_by_handle_at": (304, 265),
    "lookup_dcookie": (212, 18), "vhangup": (153, 58), "splice": (275, 76), "vmsplice": (278, 75),
    "tee": (276, 77), "uselib": (134, None), "modify_ldt": (154, None), "iopl": (172, None),
    "ioperm": (173, None),
}
# File-system mutations: refused with a named errno. Landlock refuses the data and directory ones too (EACCES),
# but not metadata: modes, owners, times, extended attributes (POSIX ACLs are one: a chmod by another name)
# and file attributes are refused here only.
NAMED_ERRNO_CALLS = {
    "unlinkat": (263, 35), "renameat": (264, 38), "renameat2": (316, 276), "mkdirat": (258, 34),
    "linkat": (265, 37), "symlinkat": (266, 36), "fchmod": (91, 52), "fchmodat": (268, 53),
    "fchmodat2": (452, 452), "fchown": (93, 55), "fchownat": (260, 54), "truncate": (76, 45),
    "ftruncate": (77, 46), "mknodat": (259, 33), "utimensat": (280, 88), "fallocate": (285, 47),
    "setxattr": (188, 5), "lsetxattr": (189, 6), "fsetxattr": (190, 7), "removexattr": (197, 14),
    "lremovexattr": (198, 15), "fremovexattr": (199, 16), "setxattrat": (463, 463),
    "removexattrat": (466, 466), "file_setattr": (469, 469), "openat2": (437, 437), "unlink": (87, None),
    "rename": (82, None), "rmdir": (84, None), "mkdir": (83, None), "link": (86, None),
    "symlink": (88, None), "chmod": (90, None), "chown": (92, None), "lchown": (94, None),
    "creat": (85, None), "mknod": (133, None), "utime": (132, None), "utimes": (235, None),
    "futimesat": (261, None),
    # Writeback of other processes' data: a child cannot dirty a page of any file (no write access, RLIMIT_FSIZE
    # 0, no writable shared mapping), so these only ever flush what the trainer and the rest of the host wrote,
    # host-wide for sync, and wait in uninterruptible sleep while they do (a SIGKILLed child then outlives the
    # worker's deadline). msync(MS_SYNC) on a shared mapping of a file opened for reading is an fsync too.
    "sync": (162, 81), "syncfs": (306, 267), "fsync": (74, 82), "fdatasync": (75, 83),
    "sync_file_range": (277, 84), "msync": (26, 227),
}
# The whole filter in two halves. The worker installs the "worker" half once, when it has started (every
# child inherits it; a filter can never be removed); each child adds the "child" half: the calls below, which
# the worker itself still makes (forking, and killing and waiting on its children) or which the child makes
# while hardening itself before its own filter is in place (prctl, capset, the uid change). Each call's rule is
# in exactly one half and the other half allows it, and the kernel applies the strictest answer of all the
# filters a process has, so a child decides every call exactly as under the whole filter
# (test_seccomp_filter_halves_decide_like_the_whole). Installing the small half costs a child far less than
# the whole filter (the kernel translates and JIT-compiles every filter at install).
CHILD_CALLS = frozenset({
    "clone", "clone3", "fork", "vfork", "kill", "tkill", "tgkill", "pidfd_open", "prctl", "capset",
    "setgroups", "setresuid", "setresgid",
})
# Allowed unless an argument says otherwise: (x86_64, aarch64) numbers.
_OPEN, _OPENAT = (2, None), (257, 56)
_PRLIMIT64 = (302, 261)  # only pid 0 (the caller itself)
_FCNTL = (72, 25)
_IOCTL = (16, 29)
# F_SETOWN, F_SETSIG, F_SETOWN_EX: signals sent by I/O readiness; F_SETLEASE, F_NOTIFY: signals on other
# processes' opens and directory changes (a lease also stalls other processes' opens); F_SET_RW_HINT,
# F_SET_FILE_RW_HINT: state of the inode, seen by every process.
_FCNTL_KILL_CMDS = (8, 10, 15, 1024, 1026, 1036, 1038)
_IOCTL_SIGNAL_CMDS = (0x8901, 0x8902, 0x5412)  # FIOSETOWN, SIOCSPGRP, TIOCSTI (typing into a terminal)
# The only ioctl requests allowed (the same numbers on x86_64 and aarch64): what CPython itself makes on its
# descriptors (isatty, terminal size, os.set_blocking, os.set_inheritable) and FIONREAD. Every other request
# fails with a named errno: file-system requests on a file or directory opened read-only (FS_IOC_SETFLAGS,
# FS_IOC_FSSETXATTR, FS_IOC_SETVERSION, FS_IOC_ENABLE_VERITY...) need only ownership, not write access, and
# Landlock governs ioctls on devices only.
IOCTL_ALLOWED = (0x5401, 0x5413, 0x540F, 0x541B, 0x5421, 0x5450, 0x5451)
# TCGETS, TIOCGWINSZ, TIOCGPGRP, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX
_OPEN_WRITE_FLAGS = 0x643  # O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND (x86_64 and aarch64)

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_LD_W_ABS, _JA, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x05, 0x15, 0x35, 0x45, 0x06
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
ENOSYS = 38
# Every number from here up is a call this table has never been audited against (on x86_64 and aarch64 alike:
# new calls get one number on every architecture; 469 is file_setattr, Linux 6.17). A deny list would allow
# them; they fail with ENOSYS instead, as on a kernel that predates them, which libc and CPython fall back
# from. Raise it only together with an audit of the new calls.
FIRST_UNAUDITED = 470
_NR_OFFSET = 0


def _arg_low(index: int) -> int:
    return 16 + 8 * index  # seccomp_data.args[index], low 32 bits (little-endian arches only)


def syscall_numbers(arch: str, table: dict[str, tuple[int, int | None]]) -> dict[str, int]:
    column = 0 if arch == "x86_64" else 1
    return {name: nrs[column] for name, nrs in table.items() if nrs[column] is not None}


def syscall_of_errno(err: object, arch: str | None) -> str | None:
    """The syscall a named errno stands for (see the module docstring), or None for any other errno."""
    if arch not in _AUDIT_ARCH or type(err) is not int or not ERRNO_BASE <= err < ERRNO_BASE + 1024:
        return None
    nr = err - ERRNO_BASE
    names = syscall_numbers(arch, {**NAMED_ERRNO_CALLS, "open": _OPEN, "openat": _OPENAT, "ioctl": _IOCTL})
    return next((name for name, n in names.items() if n == nr), f"#{nr}")


def kill_list(arch: str) -> list[str]:
    """Names of the calls that kill the program (plus the argument checks), for the docs and tests."""
    return sorted(syscall_numbers(arch, KILL_CALLS))


def build_filter(arch: str, part: str = "whole") -> bytes:
    """Classic BPF for `arch` ("x86_64" or "aarch64"): the syscall number is looked up in a binary search tree
    of the listed calls, so a call costs about log2(150) comparisons rather than a pass over the list, and so
    does the kernel's emulation of the filter for each syscall number when it builds its cache of always-
    allowed calls (at every filter install).

    `part` is "whole", or "worker" / "child": the two halves of the whole filter (see CHILD_CALLS), each of
    which keeps the architecture checks and allows every call whose rule is in the other half."""
    rules = {nr: leaf for nr, (name, leaf) in _rules(arch).items() if part == "whole" or
             (name in CHILD_CALLS) == (part == "child")}
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_JEQ_K, 1, 0, _AUDIT_ARCH[arch]),
        (_RET_K, 0, 0, RET_KILL_PROCESS),  # a foreign ABI: never ours
        (_LD_W_ABS, 0, 0, _NR_OFFSET),
    ]
    if arch == "x86_64":
        prog += [(_JGE_K, 0, 1, 0x40000000), (_RET_K, 0, 0, RET_KILL_PROCESS)]  # x32 ABI numbers
    prog += [(_JGE_K, 0, 1, FIRST_UNAUDITED), (_RET_K, 0, 0, RET_ERRNO | ENOSYS)]  # calls newer than the audit
    prog += _tree(sorted(rules.items()))
    return b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in prog)


def _rules(arch: str) -> dict[int, tuple[str, list[tuple[int, int, int, int]]]]:
    """Syscall number -> (name, the code deciding it) for every call the filter does not simply allow."""
    column = 0 if arch == "x86_64" else 1
    rules = {nr: (name, [(_RET_K, 0, 0, RET_KILL_PROCESS)]) for name, nr in syscall_numbers(arch, KILL_CALLS).items()}
    for name, nr in syscall_numbers(arch, NAMED_ERRNO_CALLS).items():
        rules[nr] = (name, [(_RET_K, 0, 0, RET_ERRNO | (ERRNO_BASE + nr))])
    for name, nrs, arg in (("open", _OPEN, 1), ("openat", _OPENAT, 2)):
        if nrs[column] is not None:
            nr = nrs[column]
            rules[nr] = (name, [(_LD_W_ABS, 0, 0, _arg_low(arg)), (_JSET_K, 0, 1, _OPEN_WRITE_FLAGS),
                                (_RET_K, 0, 0, RET_ERRNO | (ERRNO_BASE + nr)), (_RET_K, 0, 0, RET_ALLOW)])
    rules[_PRLIMIT64[column]] = ("prlimit64", [  # pid (args[0], 64 bits) must be 0
        (_LD_W_ABS, 0, 0, _arg_low(0)), (_JEQ_K, 0, 2, 0), (_LD_W_ABS, 0, 0, _arg_low(0) + 4),
        (_JEQ_K, 1, 0, 0), (_RET_K, 0, 0, RET_KILL_PROCESS), (_RET_K, 0, 0, RET_ALLOW),
    ])
    rules[_FCNTL[column]] = ("fcntl", _kill_if_arg_in(1, _FCNTL_KILL_CMDS))
    ioctl = _IOCTL[column]
    rules[ioctl] = ("ioctl", _ioctl_leaf(RET_ERRNO | (ERRNO_BASE + ioctl)))
    return rules


def _tree(items: list[tuple[int, list[tuple[int, int, int, int]]]]) -> list[tuple[int, int, int, int]]:
    """Code that runs the leaf of the syscall number in the accumulator (every leaf returns), or allows a
    number not in `items`. Sorted items; large subtrees are skipped with BPF_JA (32-bit offsets)."""
    if len(items) <= 4:
        code: list[tuple[int, int, int, int]] = []
        for nr, leaf in items:
            code += [(_JEQ_K, 0, len(leaf), nr), *leaf]
        return code + [(_RET_K, 0, 0, RET_ALLOW)]
    middle = len(items) // 2
    low, high = _tree(items[:middle]), _tree(items[middle:])
    # nr >= items[middle]: take the jump over the low half; otherwise fall into it.
    return [(_JGE_K, 0, 1, items[middle][0]), (_JA, 0, 0, len(low)), *low, *high]


def _ioctl_leaf(refuse: int) -> list[tuple[int, int, int, int]]:
    """ioctl: kill for the signal requests, allow IOCTL_ALLOWED, `refuse` (a named errno) for the rest. The
    request is compared on its low 32 bits: the kernel takes it as an unsigned int."""
    body = [(_LD_W_ABS, 0, 0, _arg_low(1))]
    kills, allowed = _IOCTL_SIGNAL_CMDS, IOCTL_ALLOWED
    # instruction i (from 1) jumps to the kill return, the allow return or falls through to the next test
    n = len(kills) + len(allowed)
    for p, v in enumerate(kills, start=1):
        body.append((_JEQ_K, n - p + 2, 0, v))  # -> kill (after the refuse and allow returns)
    for p, v in enumerate(allowed, start=len(kills) + 1):
        body.append((_JEQ_K, n - p + 1, 0, v))  # -> allow
    return body + [(_RET_K, 0, 0, refuse), (_RET_K, 0, 0, RET_ALLOW), (_RET_K, 0, 0, RET_KILL_PROCESS)]


def _kill_if_arg_in(arg: int, values: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """Kill when the low 32 bits of args[arg] equal one of `values`, allow otherwise."""
    k = len(values)
    body = [(_LD_W_ABS, 0, 0, _arg_low(arg))]
    body += [(_JEQ_K, k + 1 - p, 0, v) for p, v in enumerate(values, start=1)]
    return body + [(_RET_K, 0, 0, RET_ALLOW), (_RET_K, 0, 0, RET_KILL_PROCESS)]
