"""What an escaped program (python_layers=False: real os, ctypes, fcntl, raw system calls) tries against the
kernel layers beyond tests/test_executor_kernel.py's suite.

Classes: file metadata outside the child (extended attributes, POSIX ACLs, inode flags through ioctl and
file_setattr: Landlock governs none of them), host-wide per-user counts (POSIX timers and RLIMIT_SIGPENDING,
inotify), watches and mount listings outside the read roots, clocks, fcntl requests that reach other
processes, system calls newer than the seccomp table's audit, the worker protocol (malformed frames, a
closed or flooded result pipe), process groups and blocked signals, every call of the kill tier on the real
kernel, and a program text whose compilation would blow up the worker. After the batch the host is checked:
the canary's content, mode and attributes, the inode flags of a file inside a read root, no new file, no
SysV object, no process left, the runner's and the workers' limits, the next benign program.

Each probe asserts a specific contained outcome, so each can fail. The tests at the end are for holes in the
worker's side found the same way: a forged "ok" without a value, a worker descriptor left open without
Landlock, /dev/null's open file shared between children, and the worker's own limits.
"""

from __future__ import annotations

import array
import ast
import dataclasses
import errno
import fcntl
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reftkit.executor import ExecResult, ProgramExecutor, kernel, seccomp
from reftkit.executor.policy import COMPILE_COST_LIMIT, check_program, compile_cost
from reftkit.executor.sandbox import encode_result, frame
from reftkit.executor.warm import _PROGRAMS as WARM_PROGRAMS
from test_executor import BEHAVIOUR, BENIGN, CONFIG, ERROR, FORBIDDEN, LINUX, OK, PER_CHILD, TIMEOUT, fill, prog
from test_executor_kernel import (
    _children,
    _limits,
    _ns_init,
    _own_limits,
    _ready_limits,
    _run_bpf,
    _strictest,
    _sysvipc,
)

pytestmark = pytest.mark.skipif(not LINUX or kernel.ARCH is None, reason="Linux kernel layers (x86_64/aarch64)")

# One second of wall clock: the probes that loop meet it; cpu_s above it so that the wall clock names the kill.
REDTEAM_CONFIG = dataclasses.replace(CONFIG, timeout_s=1.0, cpu_s=2.0, python_layers=False,
                                     allowed_imports=(*CONFIG.allowed_imports, "rtmod"))
KILLED = "the seccomp filter killed the program"
FS_IOC_GETFLAGS, FS_NODUMP_FL = 0x80086601, 0x40
AUDITS = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

# Raw system calls as a program with ctypes would make them; a refusal is raised as the OSError it is, so the
# child names it (`blocked system call <name> (seccomp)`, `refused by the kernel (EACCES)`).
RAW = prog("""
    import ctypes, os, struct
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    def sc(nr, *args):
        r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
        if r < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return r
    def xattr_args(value):
        buf = ctypes.create_string_buffer(value, len(value))
        return buf, ctypes.create_string_buffer(struct.pack('=QII', ctypes.addressof(buf), len(value), 0), 16)
    """)
# A POSIX ACL giving everyone rwx: setting it is a chmod 0777 by another name.
ACL_777 = b"\x02\x00\x00\x00" + b"".join(bytes([tag, 0, 7, 0]) + b"\xff\xff\xff\xff" for tag in (1, 4, 0x20))


# The probes' own syscall numbers (x86_64, aarch64): ABI constants, not read from the table under test.
PROBE_CALLS = {"setxattrat": (463, 463), "removexattrat": (466, 466), "file_setattr": (469, 469),
               "inotify_init1": (294, 26), "inotify_add_watch": (254, 27), "listmount": (458, 458),
               "open_tree_attr": (467, 467), "adjtimex": (159, 171), "clock_adjtime": (305, 266),
               "openat2": (437, 437)}


def _nr(name: str) -> int:
    table = {**seccomp.KILL_CALLS, **seccomp.NAMED_ERRNO_CALLS, **PROBE_CALLS}
    return seccomp.syscall_numbers(kernel.ARCH, table)[name]


# name -> (program, status, a word the detail must contain). CANARY (outside every read root), VICTIM (a file
# inside a read root: the directory of the allowed module `rtmod`), WORKDIR and NR_* are filled in.
PROBES = {
    # file metadata: Landlock governs none of it, and the calls below are newer than the table was
    "xattr_on_canary": (RAW + "def solution():\n    buf, args = xattr_args(b'pwned')\n"
                        "    return sc(NR_SETXATTRAT, -100, b'CANARY', 0, b'user.pwned', args, 16)\n",
                        FORBIDDEN, "blocked system call setxattrat"),
    "acl_chmod_canary": (RAW + f"def solution():\n    buf, args = xattr_args({ACL_777!r})\n"
                         "    return sc(NR_SETXATTRAT, -100, b'CANARY', 0, b'system.posix_acl_access', args, 16)\n",
                         FORBIDDEN, "blocked system call setxattrat"),
    "remove_xattr_of_canary": (RAW + "def solution():\n"
                               "    return sc(NR_REMOVEXATTRAT, -100, b'CANARY', 0, b'user.keep')\n",
                               FORBIDDEN, "blocked system call removexattrat"),
    "file_setattr_canary": (RAW + "def solution():\n"
                            "    attr = ctypes.create_string_buffer(struct.pack('=QIIII', 0x80, 0, 0, 0, 0), 24)\n"
                            "    return sc(NR_FILE_SETATTR, -100, b'CANARY', attr, 24, 0)\n",
                            FORBIDDEN, "blocked system call file_setattr"),
    "old_fsetxattr_on_victim": ("import os\ndef solution():\n    fd = os.open('VICTIM', os.O_RDONLY)\n"
                                "    os.setxattr(fd, 'user.pwned', b'x')\n",
                                FORBIDDEN, "blocked system call fsetxattr"),
    # inode flags through ioctl on a descriptor opened for reading (needs ownership, not write access)
    **{f"ioctl_{name}_victim": ("import fcntl, os, struct\ndef solution():\n"
                                "    fd = os.open('VICTIM', os.O_RDONLY)\n"
                                f"    return len(fcntl.ioctl(fd, {request:#x}, {arg}))\n",
                                FORBIDDEN, "blocked system call ioctl") for name, request, arg in (
        ("setflags", 0x40086602, "struct.pack('l', 0x40)"),
        ("fssetxattr", 0x401C5820, "struct.pack('=IIIII8x', 0x80, 0, 0, 0, 0)"),
        ("setversion", 0x40087602, "struct.pack('l', 1234)"),
        ("enable_verity", 0x40806685, "bytes(128)"))},
    "ioctl_setflags_scratch": ("import fcntl, os, struct\ndef solution():\n    fd = os.open('.', os.O_RDONLY)\n"
                               "    return len(fcntl.ioctl(fd, 0x40086602, struct.pack('l', 0x40)))\n",
                               FORBIDDEN, "blocked system call ioctl"),
    "cpython_own_ioctls_still_work": (prog("""
        import os
        def solution():
            r, w = os.pipe()                 # the child's own pipe: fd 0 is shared with the worker (dup)
            os.set_blocking(r, False)        # FIONBIO
            os.set_inheritable(r, True)      # FIONCLEX
            os.set_inheritable(r, False)     # FIOCLEX
            try:
                os.get_terminal_size(r)      # TIOCGWINSZ: a pipe is no terminal
            except OSError as exc:
                return f"{os.get_blocking(r)} {os.isatty(r)} {exc.errno}"
        """), OK, ""),
    # fcntl requests that signal or stall other processes, or change the inode for everyone
    "fcntl_setlease_victim": ("import fcntl, os\ndef solution():\n"
                              "    return fcntl.fcntl(os.open('VICTIM', os.O_RDONLY), 1024, 0)\n",
                              FORBIDDEN, KILLED),
    "fcntl_notify_dir": ("import fcntl, os\ndef solution():\n"
                         "    return fcntl.fcntl(os.open('.', os.O_RDONLY), 1026, 3)\n",
                         FORBIDDEN, KILLED),
    "fcntl_set_rw_hint_victim": ("import fcntl, os, struct\ndef solution():\n    fd = os.open('VICTIM', os.O_RDONLY)\n"
                                 "    return len(fcntl.fcntl(fd, 1036, struct.pack('Q', 5)))\n", FORBIDDEN, KILLED),
    # host-wide per-user counts: ~96,000 POSIX timers took the uid's whole RLIMIT_SIGPENDING count
    "posix_timer_flood": (RAW + prog("""
        def solution():
            event = ctypes.create_string_buffer(64)
            struct.pack_into('=iii', event, 8, 10, 0, 1)  # SIGUSR1, SIGEV_NONE
            timer, n = ctypes.c_int(), 0
            while libc.timer_create(1, event, ctypes.byref(timer)) == 0:
                n += 1
            return n
        """), FORBIDDEN, KILLED),
    "inotify_outside_read_roots": (RAW + "def solution():\n    fd = sc(NR_INOTIFY_INIT1, 0)\n"
                                   "    return sc(NR_INOTIFY_ADD_WATCH, fd, b'WORKDIR', 0xFFF)\n", FORBIDDEN, KILLED),
    # mounts and clocks
    "listmount": (RAW + "def solution():\n"
                  "    req = ctypes.create_string_buffer(struct.pack('=IIQQQ', 32, 0, 2**64 - 1, 0, 0), 32)\n"
                  "    return sc(NR_LISTMOUNT, req, (ctypes.c_uint64 * 64)(), 64, 0)\n", FORBIDDEN, KILLED),
    "open_tree_attr": (RAW + "def solution():\n    return sc(NR_OPEN_TREE_ATTR, -100, b'/', 1, None, 0)\n",
                       FORBIDDEN, KILLED),
    "adjtimex": (RAW + "def solution():\n    return sc(NR_ADJTIMEX, ctypes.create_string_buffer(256))\n",
                 FORBIDDEN, KILLED),
    "clock_adjtime": (RAW + "def solution():\n    return sc(NR_CLOCK_ADJTIME, 0, ctypes.create_string_buffer(256))\n",
                      FORBIDDEN, KILLED),
    # a call newer than the audit of the table: ENOSYS from the filter, whatever the kernel has
    "unaudited_syscall": (RAW + f"def solution():\n    return sc({seccomp.FIRST_UNAUDITED}, 0, 0, 0)\n",
                          ERROR, "Errno 38"),
    # files: reads outside the read roots, writes anywhere
    "o_path_then_read": ("import os\ndef solution():\n    os.fchdir(os.open('/etc', os.O_PATH))\n"
                         "    return open('passwd').read()\n", FORBIDDEN, "EACCES"),
    "openat2_resolve": (RAW + "def solution():\n"
                        "    how = ctypes.create_string_buffer(struct.pack('=QQQ', 0, 0, 8), 24)\n"
                        "    return sc(NR_OPENAT2, -100, b'/etc/passwd', how, 24)\n",
                        FORBIDDEN, "blocked system call openat2"),
    "o_tmpfile": ("import os\ndef solution():\n    return os.open('/tmp', os.O_TMPFILE | os.O_RDWR, 0o600)\n",
                  FORBIDDEN, "blocked system call openat"),
    "hard_link_into_read_root": ("import os\ndef solution():\n    os.link('CANARY', 'VICTIM.link')\n",
                                 FORBIDDEN, "blocked system call link"),
    "proc_self_environ": ("def solution():\n    return open('/proc/self/environ').read()\n", FORBIDDEN, "EACCES"),
    "proc_runner_cwd": ("import os\ndef solution():\n    return os.readlink('/proc/RUNNER_PID/cwd')\n",
                        FORBIDDEN, "EACCES"),
    "sys_read": ("def solution():\n    return open('/sys/kernel/mm/transparent_hugepage/enabled').read()\n",
                 FORBIDDEN, "EACCES"),
    "memfd_write": ("import os\ndef solution():\n    return os.write(os.memfd_create('x'), b'x' * 100)\n",
                    ERROR, "Errno 27"),  # RLIMIT_FSIZE=0 holds for anonymous files too
    # the worker protocol
    "malformed_frame": ("import os\ndef solution():\n    os.write(3, b'99999999999:zz')\n    os._exit(0)\n",
                        ERROR, "no result (malformed or missing)"),
    "result_pipe_closed": ("import os\ndef solution():\n    os.close(3)\n    return 5\n", ERROR, "no result"),
    "result_pipe_flood": ("import os\ndef solution():\n    while True:\n        os.write(3, b'x' * 65536)\n",
                          ERROR, "output limit exceeded"),
    # process groups and signals: the worker's kill still lands, nothing stays behind
    "setpgid_into_pid_1s_group": ("import os\ndef solution():\n    os.setpgid(0, 1)\n    while True:\n        pass\n",
                                  TIMEOUT, "limit"),
    "all_signals_blocked": ("import signal\ndef solution():\n"
                            "    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))\n"
                            "    while True:\n        pass\n", TIMEOUT, "limit"),
}


def _inode_flags(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        buf = array.array("l", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        return buf[0]
    except OSError:
        return None  # a file system without inode flags
    finally:
        os.close(fd)


def _xattrs(path: Path) -> dict[str, bytes] | None:
    try:
        return {name: os.getxattr(path, name) for name in os.listxattr(path)}
    except OSError:
        return None  # no extended attributes here


@pytest.fixture(scope="module", **PER_CHILD)
def redteam_run(request, tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("redteam")
    canary, library = workdir / "canary.txt", workdir / "rtlib"
    canary.write_text("precious")
    canary.chmod(0o644)
    try:
        os.setxattr(canary, "user.keep", b"kept")
    except OSError:
        pass  # no user xattrs on this file system: the attribute checks compare None with None
    (library / "rtmod").mkdir(parents=True)
    (library / "rtmod" / "__init__.py").write_text("X = 1\n")
    victim = library / "victim.txt"
    victim.write_text("victim")
    sys.path.insert(0, str(library))  # a read root of the workers: where the allowed module rtmod lives
    before = {"ipc": _sysvipc(), "limits": _own_limits(), "files": sorted(str(p) for p in workdir.rglob("*")),
              "canary": (canary.stat().st_mode, _xattrs(canary), _inode_flags(canary)),
              "victim": (victim.stat().st_mode, _xattrs(victim), _inode_flags(victim))}
    config = dataclasses.replace(REDTEAM_CONFIG, programs_per_child=request.param)
    try:
        with ProgramExecutor(config) as ex:
            assert ex.run([BENIGN])[0] == ExecResult(OK, "7")
            scratch = Path(ex._scratch[0])
            before["scratch"] = _inode_flags(scratch)
            worker_limits = _ready_limits(ex)
            names = {"CANARY": canary, "VICTIM": victim, "WORKDIR": workdir, "RUNNER_PID": os.getpid(),
                     **{f"NR_{n.upper()}": _nr(n) for n in PROBE_CALLS}}
            start = time.monotonic()
            results = ex.run([fill(source, names) for source, _, _ in PROBES.values()] + [BENIGN])
            elapsed = time.monotonic() - start
            after = {"workers": {p: _limits(p) for p in worker_limits if Path(f"/proc/{p}").exists()},
                     "children": [_children(w.proc.pid) for w in ex._workers],
                     "ns_inits": [[_ns_init(w.proc.pid)] for w in ex._workers],
                     "scratch": _inode_flags(scratch), "next": ex.run([BENIGN])[0], "layers": ex.layers}
    finally:
        sys.path.remove(str(library))
    after.update(ipc=_sysvipc(), limits=_own_limits(), files=sorted(str(p) for p in workdir.rglob("*")),
                 canary=(canary.stat().st_mode, _xattrs(canary), _inode_flags(canary)),
                 victim=(victim.stat().st_mode, _xattrs(victim), _inode_flags(victim)))
    return {"results": dict(zip(PROBES, results, strict=False)), "benign": results[-1], "before": before,
            "after": after, "worker_limits": worker_limits, "elapsed": elapsed, "canary": canary, "victim": victim}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROBES))
def test_escaped_probe_is_contained(redteam_run, name):
    result = redteam_run["results"][name]
    _, status, word = PROBES[name]
    assert result.status == status and word in result.detail, result
    if status != OK:
        assert result.value is None, result


@pytest.mark.slow
def test_cpython_own_ioctls_still_work(redteam_run):
    """The ioctl allow-list keeps what CPython does on its own descriptors (FIONBIO, FIOCLEX/FIONCLEX,
    TCGETS, TIOCGWINSZ): the pipe is non-blocking now, no terminal, and TIOCGWINSZ fails with ENOTTY, the
    kernel's own answer, not the filter's (on the child's own pipe)."""
    assert redteam_run["results"]["cpython_own_ioctls_still_work"] == ExecResult(OK, f"False False {errno.ENOTTY}")


@pytest.mark.slow
def test_redteam_batch_leaves_the_host_unharmed(redteam_run):
    before, after = redteam_run["before"], redteam_run["after"]
    assert redteam_run["canary"].read_text() == "precious"
    assert redteam_run["victim"].read_text() == "victim"
    assert after["canary"] == before["canary"]  # mode 0644, only user.keep, no new inode flag
    assert after["victim"] == before["victim"]
    assert after["canary"][0] & 0o777 == 0o644
    assert after["scratch"] == before["scratch"]  # no FS_NODUMP_FL (or any flag) set on the scratch directory
    assert after["files"] == before["files"]  # no hard link, no new file
    assert after["ipc"] == before["ipc"]
    assert after["limits"] == before["limits"]
    assert after["workers"] == redteam_run["worker_limits"]
    assert after["children"] == after["ns_inits"]  # no process left but each namespace's PID 1
    assert redteam_run["benign"] == ExecResult(OK, "7")
    assert after["next"] == ExecResult(OK, "7")
    assert redteam_run["elapsed"] < 30
    for name in ("seccomp", "landlock", "pid_namespace"):
        assert after["layers"][name].startswith("on"), after["layers"]


# ----------------------------------------------------------------------- every listed call, real kernel


@pytest.fixture(scope="module")
def kill_sweep() -> dict[str, ExecResult]:
    """Every call of the kill tier on this architecture, made for real (raw syscall, zero arguments: harmless
    even where a call got through), each in a child of its own."""
    names = seccomp.kill_list(kernel.ARCH)
    with ProgramExecutor(dataclasses.replace(REDTEAM_CONFIG, allowed_imports=CONFIG.allowed_imports)) as ex:
        sources = [f"import ctypes\ndef solution():\n    return ctypes.CDLL(None).syscall({_nr(n)}, 0, 0, 0, 0, 0, 0)\n"
                   for n in names]
        results = ex.run([*sources, BENIGN])
    return dict(zip([*names, "benign"], results, strict=True))


def test_every_kill_tier_call_kills_on_the_real_kernel(kill_sweep):
    assert kill_sweep.pop("benign") == ExecResult(OK, "7")
    survived = {name: r for name, r in kill_sweep.items() if not (r.status == FORBIDDEN and KILLED in r.detail)}
    assert not survived


def test_every_named_error_call_is_refused_by_name_on_the_real_kernel():
    """Every file-system call of the named-error tier, and ioctl requests outside the allow-list, fail with
    ERRNO_BASE + their number before the kernel sees their (zero or harmless) arguments."""
    calls = seccomp.syscall_numbers(kernel.ARCH, seccomp.NAMED_ERRNO_CALLS)
    ioctl = seccomp.syscall_numbers(kernel.ARCH, {"ioctl": (16, 29)})["ioctl"]
    source = prog(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        def errno_of(nr, *args):
            ctypes.set_errno(0)
            libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
            return ctypes.get_errno()
        def solution():
            calls = {sorted(calls.values())}
            out = [errno_of(nr, 0, 0, 0, 0, 0) for nr in calls]
            out += [errno_of({ioctl}, 0, request) for request in (0x40086602, 0x401C5820, 0x5402, 0xC0185879)]
            return ' '.join(str(e) for e in out)
        """)
    with ProgramExecutor(dataclasses.replace(REDTEAM_CONFIG, workers=1, allowed_imports=CONFIG.allowed_imports)) as ex:
        result = ex.run([source])[0]
    expected = [seccomp.ERRNO_BASE + nr for nr in sorted(calls.values())] + [seccomp.ERRNO_BASE + ioctl] * 4
    assert result == ExecResult(OK, " ".join(str(e) for e in expected)), result


# ---------------------------------------------------------------------------- the filter, by interpreter


def test_ioctl_allow_list_and_new_rules_decide_right():
    """By the BPF interpreter, on both architectures: ioctl allows only IOCTL_ALLOWED (on the request's low 32
    bits), kills the signal requests, refuses the rest by name; the new fcntl kill requests; calls newer than
    the audit fail with ENOSYS in every half; and the two halves still decide like the whole for them."""
    ioctl_nr = {"x86_64": 16, "aarch64": 29}
    fcntl_nr = {"x86_64": 72, "aarch64": 25}
    for arch, audit in AUDITS.items():
        whole, worker, child = (seccomp.build_filter(arch, part) for part in ("whole", "worker", "child"))
        refuse = seccomp.RET_ERRNO | (seccomp.ERRNO_BASE + ioctl_nr[arch])
        cases = {**{r: seccomp.RET_ALLOW for r in seccomp.IOCTL_ALLOWED},
                 **{r: seccomp.RET_KILL_PROCESS for r in (0x8901, 0x8902, 0x5412)},
                 **{r: refuse for r in (0x40086602, 0x401C5820, 0x40087602, 0x40806685, 0x800C6613, 0x5402, 0)},
                 (1 << 32) | 0x5401: seccomp.RET_ALLOW}
        for request, expected in cases.items():
            assert _run_bpf(whole, audit, ioctl_nr[arch], (3, request)) == expected, (arch, hex(request))
            assert _strictest(_run_bpf(worker, audit, ioctl_nr[arch], (3, request)),
                              _run_bpf(child, audit, ioctl_nr[arch], (3, request))) == expected, (arch, hex(request))
        for cmd in (1024, 1026, 1036, 1038):  # F_SETLEASE, F_NOTIFY, F_SET_RW_HINT, F_SET_FILE_RW_HINT
            assert _run_bpf(whole, audit, fcntl_nr[arch], (3, cmd)) == seccomp.RET_KILL_PROCESS, (arch, cmd)
        for cmd in (0, 1, 2, 3, 4, 1030, 1031, 1032):  # dup, flags, pipe size: what CPython and the worker use
            assert _run_bpf(whole, audit, fcntl_nr[arch], (3, cmd)) == seccomp.RET_ALLOW, (arch, cmd)
        for nr in (seccomp.FIRST_UNAUDITED, seccomp.FIRST_UNAUDITED + 1, 1023):
            for bpf in (whole, worker, child):
                assert _run_bpf(bpf, audit, nr) == seccomp.RET_ERRNO | errno.ENOSYS, (arch, nr)
        listed = [*seccomp.syscall_numbers(arch, seccomp.KILL_CALLS).values(),
                  *seccomp.syscall_numbers(arch, seccomp.NAMED_ERRNO_CALLS).values()]
        assert max(listed) < seccomp.FIRST_UNAUDITED  # a listed call is never shadowed by the ENOSYS rule
        for name in ("timer_create", "inotify_init1", "inotify_add_watch", "fanotify_mark", "listmount",
                     "statmount", "open_tree_attr", "adjtimex", "clock_adjtime"):
            assert name in seccomp.kill_list(arch), (arch, name)
        for name in ("setxattrat", "removexattrat", "file_setattr"):
            nr = seccomp.syscall_numbers(arch, seccomp.NAMED_ERRNO_CALLS)[name]
            assert _run_bpf(whole, audit, nr) == seccomp.RET_ERRNO | (seccomp.ERRNO_BASE + nr), (arch, name)
            assert seccomp.syscall_of_errno(seccomp.ERRNO_BASE + nr, arch) == name


# ------------------------------------------------------------------------ compile bombs, in the worker

def _finally_bomb(levels: int) -> str:
    """`levels` nested try/finally blocks: CPython copies every finally body at least twice, so the compiled
    code doubles with each level (20 levels, 3 KB of text: 16 s and 3 GB in the worker)."""
    lines, indent = ["def solution():"], "    "
    for _ in range(levels):
        lines += [f"{indent}try:", f"{indent}    x = 1", f"{indent}finally:"]
        indent += "    "
    return "\n".join([*lines, f"{indent}x = 2", "    return 1"]) + "\n"


@pytest.mark.parametrize(("per_child", "python_layers"), [(1, True), (8, True), (1, False)],
                         ids=["per_program", "shared_8", "python_layers_off"])
def test_compile_bomb_is_refused_before_the_worker_compiles_it(per_child, python_layers):
    """A program whose compilation would grow the worker without bound is refused before the compiler sees
    it, by the static check, or with the in-Python layers off by the same bound alone (it protects the
    worker, not the child); the worker stays and answers."""
    config = dataclasses.replace(CONFIG, workers=1, programs_per_child=per_child, python_layers=python_layers)
    with ProgramExecutor(config) as ex:
        assert ex.run([BENIGN])[0].value == "7"
        worker = ex._workers[0].proc.pid
        start = time.monotonic()
        bomb, fine, benign = ex.run([_finally_bomb(40), _finally_bomb(6), BENIGN])
        assert time.monotonic() - start < 10
        assert bomb.status == FORBIDDEN and "too costly to compile" in bomb.detail, bomb
        assert (fine, benign) == (ExecResult(OK, "1"), ExecResult(OK, "7"))
        assert [w.proc.pid for w in ex._workers] == [worker]


@pytest.mark.parametrize("per_child", [1, 8], ids=["per_program", "shared_8"])
def test_default_layers_end_a_hang_inside_one_c_call(per_child):
    """With the default layers, a program that hangs inside a single C call (catastrophic regex backtracking:
    no Python code runs, so nothing in Python can interrupt it) is ended by the wall clock: the worker's kill,
    or in a shared child the kernel's SIGALRM; the program after it in the same chunk gets its own answer."""
    config = dataclasses.replace(CONFIG, workers=1, timeout_s=1.0, cpu_s=2.0, programs_per_child=per_child)
    hang = "import re\ndef solution():\n    return len(re.findall(r'(a+)+$', 'a' * 60 + 'b'))\n"
    with ProgramExecutor(config) as ex:
        hung, benign = ex.run([hang, BENIGN])
    assert hung.status == TIMEOUT and "wall-clock" in hung.detail, hung
    assert benign == ExecResult(OK, "7")


def test_compile_cost_of_ordinary_programs_is_far_below_the_limit():
    ordinary = [s for s, _, _ in BEHAVIOUR.values() if isinstance(s, str) and len(s) < 100_000]
    ordinary += [source for _, source in WARM_PROGRAMS]
    ordinary += ["def solution():\n    x = [" + ",".join(["7"] * 33_000) + "]\n    return len(x)\n"]  # 66 KB
    for source in ordinary:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        assert compile_cost(tree) < COMPILE_COST_LIMIT // 2, source[:80]
    deep: ast.expr = ast.Constant(1)
    for _ in range(20_000):  # far deeper than the recursion limit: the estimate is iterative
        deep = ast.BinOp(deep, ast.Add(), ast.Constant(1))
    assert compile_cost(ast.Expression(deep)) == 1 + 20_000 * 3 + 1
    returns = "def solution(x):\n    try:\n" + "".join(f"        if x == {i}:\n            return {i}\n"
                                                      for i in range(50))
    returns += "    finally:\n        x = [" + ",".join(["1"] * 200) + "]\n"
    assert compile_cost(ast.parse(returns)) > 50 * 200  # each return copies the finally body
    assert check_program(ast.parse(_finally_bomb(14)), frozenset()) is None
    assert "too costly to compile" in check_program(ast.parse(_finally_bomb(18)), frozenset())


# ------------------------------------------------------- holes that need worker.py / sandbox.py changes


def test_forged_ok_without_a_value_is_not_ok():
    """An escaped program's frame "ok, no value" would reach the grader as ExecResult(ok, None), where reading
    the answer raises (the trainer crashed): the worker takes it for no result."""
    forged = frame(b"2:ok0:1:00:0:")  # status ok, has_value 0
    with ProgramExecutor(dataclasses.replace(REDTEAM_CONFIG, workers=1, allowed_imports=CONFIG.allowed_imports)) as ex:
        result = ex.run([f"import os\ndef solution():\n    os.write(3, {forged!r})\n    os._exit(0)\n"])[0]
    assert encode_result({"s": "ok", "v": None, "d": "", "o": ""}) == b"2:ok0:1:00:0:"
    assert not (result.status == OK and result.value is None), result


NO_LANDLOCK_SCRIPT = r"""
import json, os, sys, tempfile
from reftkit.executor import kernel
from reftkit.executor.config import ExecutorConfig
from reftkit.executor.worker import Zygote
def no_landlock(*args):
    raise OSError(95, "simulated: no Landlock on this kernel")
kernel.landlock_ruleset = no_landlock
scratch = tempfile.mkdtemp(); os.chmod(scratch, 0o555)
protocol = os.dup(1)  # as worker.main: the protocol descriptor is fd 3, so the next one the worker opens is fd 4
zygote = Zygote(ExecutorConfig(timeout_s=2.0, python_layers=False), ["math"], scratch)
source = ("import os\ndef solution():\n"
          "    return ' '.join(str(fd) for fd in range(3, 16) if os.path.exists(f'/proc/self/fd/{fd}'))\n")
print(json.dumps({"layers": zygote.layers, "results": zygote.runner.run_chunk([source])}))
"""


def test_without_landlock_a_child_holds_no_descriptor_of_the_worker():
    """Without Landlock, fd 4 (the ruleset's place) is the worker's own next descriptor: it is closed too."""
    proc = subprocess.run([sys.executable, "-c", NO_LANDLOCK_SCRIPT], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["layers"]["landlock"].startswith("off: simulated"), out["layers"]
    assert [(r["s"], r["v"]) for r in out["results"]] == [("ok", "3")]  # the result pipe, nothing else



FLAGS_SETTER = ("import fcntl, os\ndef solution():\n"
                "    fcntl.fcntl(0, fcntl.F_SETFL, os.O_APPEND | os.O_NONBLOCK)\n    return 1\n")
FLAGS_READER = ("import fcntl, os\ndef solution():\n"
                "    return fcntl.fcntl(0, fcntl.F_GETFL) & (os.O_APPEND | os.O_NONBLOCK)\n")


def test_a_program_cannot_leave_flags_on_the_next_ones_standard_streams():
    """Each child opens /dev/null for itself: status flags set on its stdin (an open file shared with the
    worker and every later child, before) are gone for the next program."""
    config = dataclasses.replace(REDTEAM_CONFIG, workers=1, allowed_imports=CONFIG.allowed_imports)
    with ProgramExecutor(config) as ex:
        assert [(r.status, r.value) for r in ex.run([FLAGS_SETTER, FLAGS_READER])] == [(OK, "1"), (OK, "0")]


def test_worker_limits_its_own_memory_and_is_not_dumpable():
    """The worker, which parses and compiles program text, has a soft address-space limit of its own (the
    backstop behind the compile-cost bound), and is not dumpable (no core dump of it or of a child, even
    through a core_pattern pipe); children still set their own, lower, limits."""
    with ProgramExecutor(dataclasses.replace(CONFIG, workers=1)) as ex:
        assert ex.run([BENIGN])[0].value == "7"
        pid = ex._workers[0].proc.pid
        soft, _ = resource.prlimit(pid, resource.RLIMIT_AS)
        size = int(Path(f"/proc/{pid}/status").read_text().split("VmSize:")[1].split()[0]) * 1024
        assert size < soft <= size + 2**30 + 2**28, (size, soft)
        assert ex.layers["worker_rlimit_as"] == f"on: {soft}"
        assert ex.layers["not_dumpable"].startswith("on")
        script = ("import ctypes, json; from reftkit.executor.config import ExecutorConfig; "
                  "from reftkit.executor.worker import Zygote; import tempfile, os; d = tempfile.mkdtemp(); "
                  "os.chmod(d, 0o555); Zygote(ExecutorConfig(timeout_s=2.0), ['math'], d); "
                  "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))")  # PR_GET_DUMPABLE
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
        assert (proc.returncode, proc.stdout.strip()) == (0, "0"), proc.stderr
