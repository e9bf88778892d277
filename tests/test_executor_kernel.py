"""The executor's kernel layers on their own: every in-Python layer off (python_layers=False, so a program has
the real builtins, `__import__`, `os`, `resource`, `ctypes`, `fcntl`), as if it had escaped Python.

The whole attack suite of test_executor.py runs again like that, then attacks written as an escaped program
would write them (other processes' limits, SysV IPC, signals through descriptors, tracing, kernel
interfaces), then the host is checked: canary, files, IPC objects, processes, the runner's and the workers'
own limits, the next benign program. Also here: the worker health check, the shared-child weakness, the
fallbacks when a namespace is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from reftkit.executor import ExecResult, ExecutorConfig, ProgramExecutor, kernel, seccomp
from reftkit.executor.policy import Importer
from reftkit.executor.sandbox import encode_result, frame, kernel_refusal
from test_executor import (
    ATTACKS,
    BENIGN,
    CONFIG,
    ERROR,
    FORBIDDEN,
    LINUX,
    MEMORY,
    OK,
    PER_CHILD,
    TIMEOUT,
    WRONG,
    _wait_for,
    fill,
    prog,
)

pytestmark = pytest.mark.skipif(not LINUX or kernel.ARCH is None, reason="Linux kernel layers (x86_64/aarch64)")
KERNEL_CONFIG = dataclasses.replace(CONFIG, python_layers=False)
SYMPY = "import sympy\ndef solution():\n    return sympy.Integer(7)\n"

# Attacks of the main suite that only escape Python (they reach the interpreter's internals, the scrubbed
# environment, the scratch directory, the program's own signal handlers), which with the in-Python layers
# off are plain Python: any status is fine for them, as long as the host checks below hold.
PYTHON_ONLY = {
    "read_home_pathlib", "signal_handler", "dunder_import", "sys_modules", "subclasses", "importlib",
    "eval_string", "exec_string", "compile_string", "getattr_dunder", "format_string_walk", "match_class_attr",
    "match_args_class", "generator_frame", "traceback_frame", "module_attr_chain", "private_module_attr",
    "sympify_escape_caught", "unicode_import", "redefine_builtins", "exit", "relative_import", "environ",
}

_NR = seccomp.syscall_numbers(kernel.ARCH, seccomp.KILL_CALLS) if kernel.ARCH else {}


def _raw(name: str, *args: int) -> str:
    """A raw system call through ctypes, as a program with ctypes in hand would make it."""
    values = ", ".join(str(a) for a in args)
    return f"import ctypes\ndef solution():\n    return ctypes.CDLL(None).syscall({_NR.get(name, -1)}, {values})\n"


PIPE = "import fcntl, os, struct\ndef solution():\n    r, w = os.pipe()\n"
# name -> (program, a word the detail must contain). WORKER_PID and RUNNER_PID are filled in by the test.
ESCAPED = {
    # other processes' resource limits (a worker's RLIMIT_NOFILE set to 4 broke it for good)
    "prlimit_worker": ("import resource\ndef solution():\n"
                       "    resource.prlimit(WORKER_PID, resource.RLIMIT_NOFILE, (4, 4))\n"
                       "    return 1\n", "seccomp"),
    "prlimit_runner": ("import resource\ndef solution():\n"
                       "    resource.prlimit(RUNNER_PID, resource.RLIMIT_CPU, (1, 1))\n"
                       "    return 1\n", "seccomp"),
    "prlimit_pid_1": ("import resource\ndef solution():\n    resource.prlimit(1, resource.RLIMIT_NOFILE, (4, 4))\n"
                      "    return 1\n", "seccomp"),
    "prlimit_raw": (prog("""
        import ctypes
        def solution():
            limit = (ctypes.c_ulong * 2)(4, 4)
            return ctypes.CDLL(None).syscall(NR_PRLIMIT, WORKER_PID, 7, ctypes.byref(limit), None)
        """), "seccomp"),
    # IPC objects that would outlive the program, the worker and the executor
    "shmget": ("import ctypes\ndef solution():\n    return ctypes.CDLL(None).shmget(0x5EF7, 1 << 20, 0o1666)\n",
               "seccomp"),
    "msgget": ("import ctypes\ndef solution():\n    return ctypes.CDLL(None).msgget(0x5EF8, 0o1666)\n", "seccomp"),
    "semget": ("import ctypes\ndef solution():\n    return ctypes.CDLL(None).semget(0x5EF9, 1, 0o1666)\n", "seccomp"),
    "mq_open": (_raw("mq_open", 0, 0o100, 0o666, 0), "seccomp"),
    "posix_shared_memory": ("from multiprocessing import shared_memory\ndef solution():\n"
                            "    return shared_memory.SharedMemory(create=True, size=1 << 20).name\n", "openat"),
    # signals without kill(): I/O-readiness signals aimed at another process
    "fcntl_setown": (PIPE + "    fcntl.fcntl(r, fcntl.F_SETOWN, WORKER_PID)\n"
                     "    fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\n    os.write(w, b'x')\n    return 1\n", "seccomp"),
    "fcntl_setsig": (PIPE + "    return fcntl.fcntl(r, 10, 9)\n", "seccomp"),
    "fcntl_setown_ex": (PIPE + "    return len(fcntl.fcntl(r, 15, struct.pack('ii', 1, WORKER_PID)))\n", "seccomp"),
    "ioctl_fiosetown": (PIPE + "    return len(fcntl.ioctl(r, 0x8901, struct.pack('i', WORKER_PID)))\n", "seccomp"),
    "kill_worker": ("import os\ndef solution():\n    os.kill(WORKER_PID, 9)\n    return 1\n", "seccomp"),
    "kill_everything": ("import os\ndef solution():\n    os.kill(-1, 9)\n    return 1\n", "seccomp"),
    "pidfd_worker": ("import os\ndef solution():\n    return os.pidfd_open(WORKER_PID)\n", "seccomp"),
    "setpriority_all_mine": ("import os\ndef solution():\n    os.setpriority(os.PRIO_USER, 0, 19)\n    return 1\n",
                             "seccomp"),
    # tracing and reading other processes
    "ptrace_attach": (_raw("ptrace", 16, "WORKER_PID", 0, 0), "seccomp"),  # type: ignore[arg-type]
    "process_vm_readv": (_raw("process_vm_readv", "WORKER_PID", 0, 0, 0, 0, 0), "seccomp"),  # type: ignore[arg-type]
    "proc_mem_of_worker": ("def solution():\n    return open('/proc/WORKER_PID/mem', 'rb').read(1)\n",
                           "/proc/WORKER_PID/mem"),
    "proc_environ_of_runner": ("def solution():\n    return open('/proc/RUNNER_PID/environ').read()\n", "environ"),
    # kernel interfaces
    **{f"raw_{name}": (_raw(name, 0, 0, 0, 0), "seccomp") for name in (
        "keyctl", "bpf", "perf_event_open", "userfaultfd", "mount", "unshare", "setns", "pivot_root",
        "io_uring_setup", "setuid", "clone", "execve", "socket")},
    # the main suite's kernel-level classes, now named in the result
    "fork": ("import os\ndef solution():\n    return os.fork()\n", "seccomp"),
    "thread": ("import threading\ndef solution():\n    threading.Thread(target=print).start()\n    return 1\n",
               "seccomp"),
    "exec_shell": ("import os\ndef solution():\n    os.execv('/bin/sh', ['sh', '-c', 'touch CREATED'])\n", "seccomp"),
    "socket": ("import socket\ndef solution():\n    return socket.socket()\n", "seccomp"),
    "write_canary": ("def solution():\n    open('CANARY', 'w').write('x')\n", "blocked system call open"),
    "unlink_canary": ("import os\ndef solution():\n    os.unlink('CANARY')\n", "blocked system call unlink"),
    "chmod_canary": ("import os\ndef solution():\n    os.chmod('CANARY', 0o777)\n", "blocked system call chmod"),
    "read_passwd": ("def solution():\n    return open('/etc/passwd').read()\n", "'/etc/passwd'"),
    "list_root": ("import os\ndef solution():\n    return str(os.listdir('/root'))\n", "'/root'"),
}


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _ns_init(worker_pid: int) -> int:
    """The worker's child that is PID 1 of its PID namespace."""
    return next(c for c in _children(worker_pid)
                if Path(f"/proc/{c}/status").read_text().split("NSpid:")[1].split("\n")[0].split()[-1] == "1")


def _exited(pid: int) -> bool:
    """Whether a process has exited (a zombie not yet reaped, or gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _limits(pid: int | str) -> str:
    return Path(f"/proc/{pid}/limits").read_text()


def _sysvipc() -> dict[str, list[str]]:
    return {kind: Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:] for kind in ("shm", "msg", "sem")}


def _ready_limits(ex: ProgramExecutor) -> dict[int, str]:
    """Every started worker's limits, once each is ready (a worker sets its own address-space limit at the end
    of its start-up, which may still be under way for a worker the first programs did not need)."""
    for kind in {w.kind for w in ex._workers}:
        ex._wait_ready(kind)
    return {w.proc.pid: _limits(w.proc.pid) for w in ex._workers}


def _own_limits() -> dict[str, tuple[int, int]]:
    return {name: resource.getrlimit(getattr(resource, name)) for name in dir(resource) if name.startswith("RLIMIT_")}


@pytest.fixture(scope="module", **PER_CHILD)
def kernel_run(request, tmp_path_factory) -> dict:
    """Both suites in one batch per mode, with the in-Python layers off; host snapshots around it."""
    workdir = tmp_path_factory.mktemp("kernel")
    canary, created = workdir / "canary.txt", workdir / "created"
    canary.write_text("precious")
    before = {"ipc": _sysvipc(), "limits": _own_limits(), "files": sorted(os.listdir(workdir))}
    config = dataclasses.replace(KERNEL_CONFIG, programs_per_child=request.param)
    with ProgramExecutor(config) as ex:
        assert [r.value for r in ex.run([BENIGN, SYMPY])] == ["7", "7"]  # both pools started before the batch
        worker_pid = ex._workers[0].proc.pid
        worker_limits = _ready_limits(ex)
        names = {"CANARY": canary, "CREATED": created, "WORKER_PID": worker_pid, "RUNNER_PID": os.getpid(),
                 "NR_PRLIMIT": seccomp.syscall_numbers(kernel.ARCH, {"p": (302, 261)})["p"]}
        suites = {**{f"main:{n}": s for n, (s, _) in ATTACKS.items()},
                  **{f"esc:{n}": s for n, (s, _) in ESCAPED.items()}}
        results = ex.run([fill(s, names) for s in suites.values()] + [BENIGN])
        after = {"workers": {pid: _limits(pid) for pid in worker_limits if Path(f"/proc/{pid}").exists()},
                 "children": [_children(w.proc.pid) for w in ex._workers],
                 "ns_inits": [[_ns_init(w.proc.pid)] for w in ex._workers],
                 "next": ex.run([BENIGN])[0], "layers": ex.layers}
    return {"results": dict(zip(suites, results, strict=False)), "benign": results[-1], "before": before,
            "after": after, "worker_limits": worker_limits, "canary": canary, "created": created,
            "workdir": workdir, "names": names}


@pytest.mark.slow  # the whole attack suite (its fixture runs every attack once): CI, not the fast loop
@pytest.mark.parametrize("name", list(ATTACKS))
def test_main_attack_suite_contained_by_the_kernel_alone(kernel_run, name):
    result = kernel_run["results"][f"main:{name}"]
    if name not in PYTHON_ONLY:
        assert result.status in ATTACKS[name][1], result


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ESCAPED))
def test_escaped_program_is_stopped_by_the_kernel(kernel_run, name):
    result = kernel_run["results"][f"esc:{name}"]
    word = fill(ESCAPED[name][1], kernel_run["names"])
    assert (result.status, result.value) == (FORBIDDEN, None), result
    assert word in result.detail, result


@pytest.mark.slow
def test_kernel_alone_leaves_the_host_unharmed(kernel_run):
    assert kernel_run["canary"].read_text() == "precious"
    assert not kernel_run["created"].exists()
    assert sorted(os.listdir(kernel_run["workdir"])) == ["canary.txt"]
    assert _sysvipc() == kernel_run["before"]["ipc"]  # no SysV segment, queue or semaphore set left
    assert _own_limits() == kernel_run["before"]["limits"]  # the runner's own limits
    assert kernel_run["after"]["workers"] == kernel_run["worker_limits"]  # the workers' limits, all still there
    assert kernel_run["after"]["children"] == kernel_run["after"]["ns_inits"]  # no process left but the PID 1s
    assert kernel_run["benign"] == ExecResult(OK, "7")
    assert kernel_run["after"]["next"] == ExecResult(OK, "7")
    layers = kernel_run["after"]["layers"]
    for name in ("static_check", "audit_hook", "restricted_builtins"):
        assert layers[name].startswith("off: python_layers=False"), layers
    for name in ("seccomp", "landlock", "pid_namespace", "ipc_namespace", "network"):
        assert layers[name].startswith("on"), layers  # this kernel has them all; the fallbacks are tested below


def test_pid_namespace_hides_every_other_process(kernel_run):
    """On its own (calls seccomp allows): a child sees only itself and the namespace's PID 1, and cannot even
    look up the worker or the runner."""
    with ProgramExecutor(dataclasses.replace(KERNEL_CONFIG, workers=1)) as ex:
        ex.run([BENIGN])
        source = prog(f"""
            import os
            def solution():
                visible = []
                for pid in [*range(1, 4096), {ex._workers[0].proc.pid}, {os.getpid()}]:
                    try:
                        os.getsid(pid)
                        visible.append(pid)
                    except ProcessLookupError:
                        pass
                return f"{{visible == [1, os.getpid()]}} {{os.getppid()}}"
            """)
        assert ex.run([source])[0] == ExecResult(OK, "True 0")


def test_worker_namespaces_are_not_the_runners(kernel_run):
    with ProgramExecutor(dataclasses.replace(KERNEL_CONFIG, workers=1)) as ex:
        ex.run([BENIGN])
        pid = ex._workers[0].proc.pid
        for kind in ("ipc", "net"):
            assert os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}")


# ----------------------------------------------------------------------------------- shared children

FORGER = "import os\ndef solution():\n    os.write(3, FORGED)\n    os._exit(0)\n"


def test_shared_child_lets_an_escaped_program_forge_the_next_answer():
    """The documented weakness of programs_per_child > 1, exactly: a program that has escaped Python writes
    result frames for itself and the program after it in its chunk, which then gets the forged answer.
    With a child per program the same program only decides its own result."""
    forged = frame(encode_result({"s": "ok", "v": "999", "d": "", "o": ""}))
    sources = [FORGER.replace("FORGED", repr(forged * 2)), "def solution():\n    return 17\n"]
    shared = dataclasses.replace(KERNEL_CONFIG, workers=1, programs_per_child=8)
    with ProgramExecutor(shared) as ex:  # one chunk, one child: the forger and its victim share it
        assert [r.value for r in ex.run(sources)] == ["999", "999"]
        assert [r.value for r in ex.run([BENIGN, BENIGN])] == ["7", "7"]  # the next child is clean
    with ProgramExecutor(dataclasses.replace(shared, programs_per_child=1)) as ex:
        assert [r.value for r in ex.run(sources)] == ["999", "17"]


# ---------------------------------------------------------------------------------------- health check


def test_a_broken_worker_is_replaced(caplog):
    """A worker that can no longer run programs (here its open-file limit is lowered from outside, as a
    program once did before seccomp and the PID namespace stopped it) fails its known-good program
    and is replaced; the programs it could not run are answered by the new worker, not charged."""
    with ProgramExecutor(dataclasses.replace(CONFIG, workers=1)) as ex:
        assert ex.run([BENIGN])[0].value == "7"
        broken = ex._workers[0].proc.pid
        resource.prlimit(broken, resource.RLIMIT_NOFILE, (4, 4))
        with caplog.at_level("WARNING", logger="reftkit.executor"):
            assert ex.run([BENIGN] * 3) == [ExecResult(OK, "7")] * 3
        assert "replacing a lean worker: known-good program failed" in caplog.text
        assert [w.proc.pid for w in ex._workers] != [broken]
        assert ex.run([BENIGN])[0].value == "7"


def test_a_worker_whose_namespace_lost_its_pid_1_is_replaced(caplog):
    """If the PID namespace's PID 1 dies (killed from outside), the worker can no longer fork: its health
    check fails and the pool replaces it."""
    with ProgramExecutor(dataclasses.replace(CONFIG, workers=1)) as ex:
        assert ex.run([BENIGN])[0].value == "7"
        worker = ex._workers[0].proc.pid
        ns_init = _ns_init(worker)
        os.kill(ns_init, 9)
        # Until the kernel has torn the namespace down, a fork into it still works (and a program may finish
        # there first, rightly answered): wait for that PID 1 to have exited, so the next fork must fail.
        assert _wait_for(lambda: _exited(ns_init))
        with caplog.at_level("WARNING", logger="reftkit.executor"):
            assert ex.run([BENIGN] * 2) == [ExecResult(OK, "7")] * 2
        # Either the next fork fails (the health check's known-good program then fails), or a child
        # running when PID 1 died was killed with the namespace: both replace the worker, and the
        # program is rerun rather than reported as out of memory.
        assert "known-good program failed" in caplog.text or "PID 1 died" in caplog.text
        assert [w.proc.pid for w in ex._workers] != [worker]


def test_a_program_killed_with_its_namespace_is_rerun_not_reported_out_of_memory():
    """PID 1 dies while a program runs: the kernel SIGKILLs the program with the namespace. That is not
    the program's doing: the worker is replaced and the program runs again (not 'out of memory')."""
    import threading

    busy = "def solution():\n    n = 0\n    for i in range(30_000_000):\n        n += 1\n    return n\n"
    with ProgramExecutor(dataclasses.replace(CONFIG, workers=1, timeout_s=20.0, cpu_s=20.0)) as ex:
        assert ex.run([BENIGN])[0].value == "7"
        worker = ex._workers[0].proc.pid
        killer = threading.Timer(0.5, lambda: os.kill(_ns_init(worker), 9))
        killer.start()
        result = ex.run([busy])[0]
        killer.join()
        assert (result.status, result.value) == (OK, "30000000"), result
        assert [w.proc.pid for w in ex._workers] != [worker]


# --------------------------------------------------------------------------------------------- fallbacks

FALLBACK_SCRIPT = r"""
import json, os, sys, tempfile
from reftkit.executor import kernel
from reftkit.executor.config import ExecutorConfig
from reftkit.executor.worker import Zygote
def no_namespaces(*args):
    raise OSError(1, "simulated: no user namespaces here")
kernel.unshare_namespaces = kernel.unshare_pid_namespace = no_namespaces
scratch = tempfile.mkdtemp(); os.chmod(scratch, 0o555)
zygote = Zygote(ExecutorConfig(timeout_s=2.0, python_layers=False), ["math"], scratch)
sources = [s.replace("WORKER_PID", str(os.getpid())) for s in json.loads(sys.argv[1])]
print(json.dumps({"layers": zygote.layers, "results": zygote.runner.run_chunk(sources)}))
"""


def test_without_namespaces_seccomp_still_holds():
    """A container without user namespaces (simulated: every unshare fails): the layers are
    reported off with a reason, programs still run, the worker is visible to the child but out of reach."""
    sources = [BENIGN, ESCAPED["prlimit_worker"][0], ESCAPED["kill_worker"][0], ESCAPED["shmget"][0],
               "import os\ndef solution():\n    return os.getsid(WORKER_PID) > 0\n"]
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, json.dumps(sources)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for name in ("pid_namespace", "ipc_namespace", "network"):
        assert out["layers"][name].startswith("off: simulated"), out["layers"]
    assert [(r["s"], r["v"]) for r in out["results"]] == [
        ("ok", "7"), ("forbidden", None), ("forbidden", None), ("forbidden", None), ("wrong_type", None)]


# -------------------------------------------------------------------------------------------- unit level


def test_kernel_refusals_are_named():
    nr = seccomp.syscall_numbers(kernel.ARCH, seccomp.NAMED_ERRNO_CALLS)["unlinkat"]
    assert kernel_refusal(OSError(seccomp.ERRNO_BASE + nr, "x")) == "blocked system call unlinkat (seccomp)"
    assert kernel_refusal(PermissionError(13, "Permission denied", "/etc/passwd")) == \
        "refused by the kernel (EACCES): '/etc/passwd'"
    assert kernel_refusal(PermissionError(1, "Operation not permitted")) == "refused by the kernel (EPERM)"
    assert kernel_refusal(FileNotFoundError(2, "No such file", "x")) is None


def _run_bpf(bpf: bytes, arch: int, nr: int, args: tuple[int, ...] = ()) -> int:
    """A classic-BPF interpreter for the instructions the filter uses, on one seccomp_data."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * 6)[:6])
    insns = [struct.unpack("=HBBI", bpf[i:i + 8]) for i in range(0, len(bpf), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == 0x06:
            return k
        elif code == 0x05:
            pc += k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        pc += 1


def test_seccomp_filter_decisions():
    """Every listed call gets its action, arguments are checked where they matter, the rest is allowed."""
    arches = {"x86_64": (0xC000003E, {"read": 0, "write": 1, "mmap": 9, "exit_group": 231, "getpid": 39},
                         {"open": 2, "openat": 257, "prlimit64": 302, "fcntl": 72, "ioctl": 16}),
              "aarch64": (0xC00000B7, {"read": 63, "write": 64, "mmap": 222, "exit_group": 94, "getpid": 172},
                          {"openat": 56, "prlimit64": 261, "fcntl": 25, "ioctl": 29})}
    kill, allow = seccomp.RET_KILL_PROCESS, seccomp.RET_ALLOW
    for arch, (audit, plain, nr) in arches.items():
        bpf = seccomp.build_filter(arch)
        assert len(bpf) % 8 == 0 and len(bpf) // 8 < 4096
        for call, n in seccomp.syscall_numbers(arch, seccomp.KILL_CALLS).items():
            assert _run_bpf(bpf, audit, n) == kill, (arch, call)
        for call, n in seccomp.syscall_numbers(arch, seccomp.NAMED_ERRNO_CALLS).items():
            assert _run_bpf(bpf, audit, n) == seccomp.RET_ERRNO | (seccomp.ERRNO_BASE + n), (arch, call)
        for call, n in plain.items():
            assert _run_bpf(bpf, audit, n) == allow, (arch, call)
        path = 1 if "open" in nr else 2  # the flags argument: open(path, flags), openat(dirfd, path, flags)
        opener = nr.get("open", nr["openat"])
        assert _run_bpf(bpf, audit, opener, (0, 0, 0) if path == 2 else (0, 0)) == allow
        flags = [0, 0, 0]
        flags[path] = os.O_WRONLY
        assert _run_bpf(bpf, audit, opener, tuple(flags)) == seccomp.RET_ERRNO | (seccomp.ERRNO_BASE + opener)
        assert _run_bpf(bpf, audit, nr["openat"], (0, 0, os.O_CREAT | os.O_RDONLY)) != allow
        assert _run_bpf(bpf, audit, nr["prlimit64"], (0, 7)) == allow  # the caller itself
        for pid in (1, 4242, 1 << 32):
            assert _run_bpf(bpf, audit, nr["prlimit64"], (pid, 7)) == kill
        assert _run_bpf(bpf, audit, nr["fcntl"], (3, 3)) == allow  # F_GETFL
        for cmd in (8, 10, 15):  # F_SETOWN, F_SETSIG, F_SETOWN_EX
            assert _run_bpf(bpf, audit, nr["fcntl"], (3, cmd)) == kill
        assert _run_bpf(bpf, audit, nr["ioctl"], (3, 0x541B)) == allow  # FIONREAD
        assert _run_bpf(bpf, audit, nr["ioctl"], (3, 0x8901)) == kill  # FIOSETOWN
        assert _run_bpf(bpf, 0x40000003, 0) == kill  # a foreign architecture (i386)
    assert _run_bpf(seccomp.build_filter("x86_64"), 0xC000003E, 0x40000000 + 39) == kill  # x32


def _strictest(*returns: int) -> int:
    """What the kernel does with the answers of all of a process's filters: the action of highest precedence
    (the lowest as a signed 32-bit number: KILL_PROCESS first, ALLOW last); on a tie, the newest filter's."""
    signed = [(r & 0xFFFF0000) - (1 << 32) if r & 0x80000000 else r & 0xFFFF0000 for r in returns]
    return returns[signed.index(min(signed))]


@pytest.mark.slow
def test_seccomp_filter_halves_decide_like_the_whole():
    """The worker installs one half of the filter and every child adds the other (seccomp.CHILD_CALLS): for
    every syscall number and the arguments the filter looks at, a child under both gets exactly the whole
    filter's answer, and the worker's own half allows what the worker needs to fork, wait and kill."""
    audits = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
    argument_cases = [(), (0, 8, os.O_WRONLY), (0, os.O_WRONLY, os.O_WRONLY), (1, 10, 0), (3, 15), (3, 0x8901),
                      (4242, 7), (0, 7), (1 << 32, 7), (3, 0x5412)]
    for arch, audit in audits.items():
        whole, worker, child = (seccomp.build_filter(arch, part) for part in ("whole", "worker", "child"))
        assert len(child) < len(whole) // 8  # the per-child install is the small half
        for nr in [*range(0, 1100), 0x40000000 + 39]:
            for args in argument_cases:
                expected = _run_bpf(whole, audit, nr, args)
                child_view = _strictest(_run_bpf(child, audit, nr, args), _run_bpf(worker, audit, nr, args))
                assert child_view == expected, (arch, nr, args)
        assert _strictest(_run_bpf(child, 0x40000003, 0), _run_bpf(worker, 0x40000003, 0)) == seccomp.RET_KILL_PROCESS
        numbers = seccomp.syscall_numbers(arch, seccomp.KILL_CALLS)
        for call in ("clone", "kill", "pidfd_open", "prctl", "capset", "setresuid"):  # the worker's own calls
            assert _run_bpf(worker, audit, numbers[call]) == seccomp.RET_ALLOW, (arch, call)
            assert _run_bpf(child, audit, numbers[call]) == seccomp.RET_KILL_PROCESS, (arch, call)


CAPABILITIES = prog("""
    import ctypes
    def solution():
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        sets = (ctypes.c_uint32 * 6)()
        assert ctypes.CDLL(None).capget(header, sets) == 0
        return ",".join(str(x) for x in sets)
    """)


def test_layers_applied_in_the_worker_hold_in_every_child():
    """The capability drop and one half of the seccomp filter are applied once, to the worker itself
    (docs/executor.md, "Applied once, in the worker"): the worker holds them, and every child of the same
    worker, program after program, has no capability and still meets both halves of the filter."""
    with ProgramExecutor(dataclasses.replace(KERNEL_CONFIG, workers=1)) as ex:
        assert ex.run([BENIGN])[0].value == "7"
        worker = ex._workers[0].proc.pid
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{worker}/status").read_text().splitlines()
                      if ":\t" in line)
        assert (status["Seccomp"], status["Seccomp_filters"]) == ("2", "1")  # the worker's half
        if ex.layers["privileges"].startswith(("partial", "on: not root")):  # capdrop: done in the worker
            assert {status[k] for k in ("CapInh", "CapPrm", "CapEff")} == {"0000000000000000"}
        names = {"WORKER_PID": worker}
        attacks = [fill(ESCAPED[n][0], names) for n in ("raw_clone", "kill_worker", "ptrace_attach", "raw_socket",
                                                          "raw_mount", "shmget", "fork", "socket")]
        for _ in range(2):  # later children of the same worker are no different
            results = ex.run([CAPABILITIES, *attacks, "def solution():\n    open('x', 'w')\n", BENIGN])
            assert results[0] == ExecResult(OK, "0,0,0,0,0,0"), results[0]
            for result in results[1:-2]:
                assert result.status == FORBIDDEN and "seccomp" in result.detail, result
            assert "blocked system call open" in results[-2].detail, results[-2]
            assert results[-1] == ExecResult(OK, "7")


CONFINED_WORKER_SCRIPT = r"""
import json, os, tempfile
from reftkit.executor.config import ExecutorConfig
from reftkit.executor.worker import Zygote
scratch = tempfile.mkdtemp(); os.chmod(scratch, 0o555)
zygote = Zygote(ExecutorConfig(timeout_s=2.0), ["math"], scratch)
def reads(path):
    try:
        with open(path, "rb") as f:
            f.read(1)
        return "read"
    except OSError as exc:
        return type(exc).__name__
print(json.dumps({"layer": zygote.layers["landlock"], "etc": reads("/etc/hostname"), "proc": reads("/proc/self/status"),
                  "lib": reads(os.__file__),
                  "results": zygote.runner.run_chunk(["def solution():\n    return 6 * 7\n"])}))
"""


@pytest.mark.skipif(not LINUX, reason="Landlock")
def test_the_worker_is_confined_by_landlock_too():
    """Landlock is applied once, to the worker itself, before it forks anything (docs/executor.md, "Applied
    once, in the worker"): the process that parses program text cannot read outside the read roots either,
    its children inherit the domain, and the namespace's PID 1 is inside it (so the worker's death still
    reaches it: test_close_leaves_no_process)."""
    proc = subprocess.run([sys.executable, "-c", CONFINED_WORKER_SCRIPT], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    if not out["layer"].startswith("on"):
        pytest.skip(f"no Landlock here: {out['layer']}")
    assert out["layer"].endswith("applied once, to the worker itself, inherited by every child"), out
    assert (out["etc"], out["proc"], out["lib"]) == ("PermissionError", "PermissionError", "read"), out
    assert [(r["s"], r["v"]) for r in out["results"]] == [("ok", "42")]


def test_seccomp_filter_is_well_formed():
    for arch in ("x86_64", "aarch64"):
        bpf = seccomp.build_filter(arch)
        assert len(bpf) % 8 == 0 and len(bpf) // 8 < 4096
        for name in ("prctl", "ptrace", "shmget", "msgget", "semget", "keyctl", "bpf", "userfaultfd", "mount",
                     "unshare", "setns", "pivot_root", "perf_event_open", "process_vm_readv", "clone"):
            assert name in seccomp.kill_list(arch)


def test_import_function_never_hands_out_a_real_module():
    """The fromlist-list branch (what C code's PyImport_Import uses) imports for the side effect only: an
    allowed module comes back as a proxy, any other as None, never the module itself."""
    importer = Importer(frozenset({"math"}), lambda reason: None)
    assert importer("os", None, None, ["__doc__"], 0) is None
    assert importer("sys", {}, {}, ["path"], 0) is None
    math_proxy = importer("math", None, None, ["__doc__"], 0)
    assert type(math_proxy).__name__ == "ModuleProxy" and math_proxy.sqrt(4) == 2.0


def test_default_allow_list_has_no_time():
    """With the trainer's default allow-list `import time` is forbidden, so a program cannot sleep; the
    wall clock still ends a busy loop (docs/executor.md, statuses)."""
    with ProgramExecutor(ExecutorConfig(workers=1, timeout_s=0.5, cpu_s=2.0)) as ex:
        sleeper, loop = ex.run(["import time\ndef solution():\n    time.sleep(10**6)\n",
                                "def solution():\n    while True:\n        pass\n"])
    assert (sleeper.status, sleeper.detail) == (FORBIDDEN, "ImportError: time not allowed")
    assert loop.status == TIMEOUT


# statuses imported for the suites above
_ = (ERROR, MEMORY, WRONG)
