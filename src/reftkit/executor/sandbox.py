"""The child: hardening right after fork, then its program (or, with programs_per_child > 1, several in
turn), then one length-prefixed result frame per program on a pipe.

Order matters. Descriptors and the process group come first (nothing of the worker's may leak), then resource
limits, then privileges are dropped, then the irreversible kernel filters (Landlock, seccomp), and only
then is the program run, with the audit hook installed last so that the hardening itself is not subject
to it. What a child inherits is set once in the worker: the network, IPC and PID namespaces, no_new_privs,
the working directory, the capability drop, half of the seccomp filter (worker.py, _apply_in_worker); the
worker also parses, checks and compiles the text before forking (see prepare()). Any
enabled layer that fails makes the child refuse to run the program (fail closed).
"""

from __future__ import annotations

import _signal
import ast
import decimal
import errno
import gc
import numbers
import os
import resource
import select
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from json import dumps
from types import CodeType
from typing import NoReturn

from reftkit.executor import kernel, seccomp
from reftkit.executor.config import ExecutorConfig, Status
from reftkit.executor.policy import (
    AuditPolicy,
    CappedOutput,
    Forbidden,
    Importer,
    OutputLimitExceeded,
    check_program,
    compile_violation,
)

EXIT_MEMORY = 117  # the child ran out of memory where no result could be written
EXIT_INTERNAL = 118  # the child failed outside the program (e.g. its result pipe was closed)
EXIT_ORPHAN = 119  # the worker died before the child was set up
RESULT_FD = 3
LANDLOCK_FD = 4
RETIRE_PAYLOAD = b""  # a shared child stops early on purpose: the programs it did not run go to a new child
_DETAIL_CHARS = 300
_RESULT_PIPE_POLL = select.poll()  # built once in the worker (it only records the descriptor number)
_RESULT_PIPE_POLL.register(RESULT_FD, select.POLLOUT)
_SIGTERM = int(signal.SIGTERM)


@dataclass
class ChildContext:
    """Everything a child needs, prepared once in the worker so that forking is all a program costs."""

    config: ExecutorConfig
    scratch: str
    worker_pid: int
    read_roots: tuple[str, ...]
    allowed: frozenset[str]
    importer: Importer
    policy: AuditPolicy
    builtins: dict[str, object]
    enabled: set[str] = field(default_factory=set)  # kernel layers to apply; the probe removes broken ones
    rlimits: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # layer name -> (resource, soft, hard)
    privilege: str = "none"  # "setuid": become uid/gid; "capdrop": drop all capabilities; "none"
    uid: int = 65534
    gid: int = 65534
    max_fd: int = 65536  # one past the highest descriptor the worker may hold
    landlock_fd: int | None = None
    seccomp: kernel.SeccompProgram | None = None
    steps: list[tuple[str, Callable[[], None]]] | None = None  # the enabled steps, built once in the worker
    # Enabled layers a child has without a step of its own: applied once to the worker, which every child
    # inherits, or (the parent-death signal) held through the PID namespace (worker.py, _apply_in_worker).
    inherited: set[str] = field(default_factory=set)
    shared: bool = False  # programs_per_child > 1: several programs per child, each under in-child timers
    python_layers: bool = True  # static check, restricted builtins and import proxies, audit hook (tests: off)
    decimal_context: decimal.Context = field(default_factory=decimal.Context)  # pristine, for each shared program


# ----------------------------------------------------------------------------------------------- hardening


def _setup_fds(ctx: ChildContext, result_fd: int) -> None:
    """0, 1, 2 -> /dev/null (the worker's protocol pipes must not be reachable), 3 -> result pipe,
    4 -> Landlock ruleset (when applied), everything else closed. /dev/null is opened by each child: an open
    file shared with the worker and the other children would carry the flags one program sets (fcntl
    F_SETFL) to the next. Read-only, as the inherited seccomp half refuses opens for writing: a write to fd 1
    or 2 fails (EBADF) instead of vanishing, which changes nothing (sys.stdout and sys.stderr are replaced)."""
    if result_fd != RESULT_FD:
        os.dup2(result_fd, RESULT_FD)
        os.close(result_fd)
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    landlock = ctx.landlock_fd is not None and "landlock" in ctx.enabled
    if landlock:
        os.dup2(ctx.landlock_fd, LANDLOCK_FD)
    # one close_range(2) call on current Linux and Python; `null` is above 2 (0-2 were open), so it goes too
    os.closerange(LANDLOCK_FD + 1 if landlock else LANDLOCK_FD, ctx.max_fd)


def _drop_privileges(ctx: ChildContext) -> None:
    if ctx.privilege == "setuid":
        os.setgroups([])
        os.setresgid(ctx.gid, ctx.gid, ctx.gid)
        os.setresuid(ctx.uid, ctx.uid, ctx.uid)
    elif ctx.privilege == "capdrop":
        kernel.drop_capabilities()


def _set_parent_death_signal(ctx: ChildContext) -> None:
    # After the uid change, which clears it. If the worker is already gone, nobody will kill us: leave.
    # In the worker's PID namespace the child's getppid() is 0 (the worker is outside it): the pipe on fd 3
    # tells instead (POLLERR on a write end once the worker, its only reader, is gone; POLLHUP on a read
    # end once the worker, its only writer, is gone).
    kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
    if "pid_namespace" in ctx.enabled:
        orphan = any(events & (select.POLLERR | select.POLLHUP) for _, events in _RESULT_PIPE_POLL.poll(0))
    else:
        orphan = os.getppid() != ctx.worker_pid
    if orphan:
        os._exit(EXIT_ORPHAN)


def _apply_landlock(_ctx: ChildContext) -> None:
    kernel.landlock_restrict(LANDLOCK_FD)
    os.close(LANDLOCK_FD)


def _steps(ctx: ChildContext) -> list[tuple[str, Callable[[], None]]]:
    steps: list[tuple[str, Callable[[], None]]] = [
        # A process group of its own, for the worker's kill. Not setsid: on kernels with scheduler
        # autogroups, every new session also gets a scheduler group of its own, which costs each child time.
        ("process_group", lambda: os.setpgid(0, 0)),
    ]
    for name, (res, soft, hard) in ctx.rlimits.items():
        steps.append((name, lambda res=res, soft=soft, hard=hard: resource.setrlimit(res, (soft, hard))))
    steps += [
        ("privileges", lambda: _drop_privileges(ctx)),
        ("parent_death_signal", lambda: _set_parent_death_signal(ctx)),
        ("landlock", lambda: _apply_landlock(ctx)),
        ("seccomp", lambda: ctx.seccomp.install()),
    ]
    return steps


def prepare_steps(ctx: ChildContext) -> None:
    """Builds the list of enabled steps once (in the worker), not in every child; an inherited layer has none."""
    ctx.steps = [(name, step) for name, step in _steps(ctx) if name in ctx.enabled and name not in ctx.inherited]


def harden(ctx: ChildContext, probe: bool = False) -> dict[str, str]:
    """Applies the enabled layers. Returns {layer: error}: the first failure, or every failure when probing."""
    failures: dict[str, str] = {}
    if ctx.steps is None or probe:
        prepare_steps(ctx)
    for name, step in ctx.steps:
        try:
            step()
        except (OSError, ValueError, AttributeError) as exc:
            failures[name] = f"{type(exc).__name__}: {exc}"
            if not probe:
                break
    return failures


# ---------------------------------------------------------------------------------------------- the program


def _result(status: Status, value: str | None = None, detail: str = "", output: str = "") -> dict:
    return {"s": status.value, "v": value, "d": detail[:_DETAIL_CHARS], "o": output}


def _describe(exc: BaseException) -> str:
    """"Type: message", defensively: the exception may be the program's own class."""
    try:
        name = type(exc).__name__
        message = str(exc)
    except BaseException:  # noqa: BLE001 -- a hostile __str__ must not take the child down
        return "exception"
    return f"{name}: {message}" if message else name


def prepare(ctx: ChildContext, source: str) -> CodeType | dict:
    """Parses, checks and compiles a program: its code object, or the result that refuses it.

    Runs in the worker, before forking: the child then starts from ready bytecode, which saves it hundreds
    of copy-on-write page faults. Only CPython's parser and compiler see the text here (bounded by the
    source size cap, their own nesting limits and the caller's watchdog); nothing of it is executed.
    """
    try:
        tree = ast.parse(source, "<program>")
    except SyntaxError as exc:
        return _result(Status.ERROR, detail=f"SyntaxError: {exc.msg} (line {exc.lineno})")
    except (ValueError, RecursionError, OverflowError, UnicodeError, MemoryError) as exc:
        return _result(Status.ERROR, detail=f"cannot parse: {_describe(exc)}")
    # The compile-cost bound protects the worker itself, so it holds with the in-Python layers off too.
    reason = check_program(tree, ctx.allowed) if ctx.python_layers else compile_violation(tree)
    if reason is not None:
        return _result(Status.FORBIDDEN, detail=reason)
    try:
        return compile(tree, "<program>", "exec")
    except (SyntaxError, ValueError, RecursionError, OverflowError, MemoryError) as exc:
        return _result(Status.ERROR, detail=f"cannot compile: {_describe(exc)}")


def execute(ctx: ChildContext, code: CodeType) -> dict:
    """Runs one prepared program in the (already hardened) child, under the audit hook installed before."""
    output = CappedOutput(ctx.config.max_output_bytes)
    sys.stdout = sys.stderr = output
    if ctx.shared:
        _fresh_state(ctx)
        _arm_timers(ctx.config.timeout_s, ctx.config.cpu_limit_s)
    ctx.policy.violation = None  # the policy object is reused by the programs of a shared child
    status, value, detail = _run(ctx, code)
    if ctx.shared:
        ctx.importer.forget()  # drops what the program hung on its module proxies, finalisers included...
        gc.collect()  # ...and its garbage cycles, so that their finalisers run (and count) as this program's
        _arm_timers(0, 0)
    if ctx.policy.violation is not None:  # also when the program caught the exception
        status, value, detail = Status.FORBIDDEN, None, ctx.policy.violation
    elif output.exceeded:
        status, value, detail = Status.ERROR, None, f"output limit of {ctx.config.max_output_bytes} bytes exceeded"
    return _result(status, value, detail, output.getvalue())


def _fresh_state(ctx: ChildContext) -> None:
    """What one program of a shared child could otherwise leave to the next: module proxies (and attributes
    set on them), the random stream and its seed, the decimal context."""
    ctx.importer.forget()
    random = sys.modules.get("random")
    if random is not None:
        random.seed()
    decimal.setcontext(ctx.decimal_context.copy())


def _arm_timers(wall_s: float, cpu_s: float) -> None:
    """Per-program limits in a shared child: SIGALRM and SIGPROF keep their default action (terminate), so the
    kernel ends the child even inside a long C call; the worker then charges the program that was running."""
    _signal.setitimer(_signal.ITIMER_REAL, wall_s)
    _signal.setitimer(_signal.ITIMER_PROF, cpu_s)


def _run(ctx: ChildContext, code: CodeType) -> tuple[Status, str | None, str]:
    entry = ctx.config.entry
    namespace: dict[str, object] = {"__builtins__": ctx.builtins, "__name__": "__sandbox__"}
    try:
        exec(code, namespace)  # noqa: S102 -- this is the sandbox
        function = namespace.get(entry)
        if function is None or not callable(function):
            return Status.ERROR, None, f"no {entry}() function defined"
        return answer(function(), ctx.config.max_output_bytes)
    except Forbidden as exc:
        return Status.FORBIDDEN, None, str(exc)
    except OutputLimitExceeded:
        return Status.ERROR, None, "output limit exceeded"
    except MemoryError:
        return Status.MEMORY, None, "MemoryError"
    except OSError as exc:
        refusal = kernel_refusal(exc)
        return (Status.ERROR, None, _describe(exc)) if refusal is None else (Status.FORBIDDEN, None, refusal)
    except BaseException as exc:  # noqa: BLE001 -- every exception of the program is a result
        return Status.ERROR, None, _describe(exc)


def kernel_refusal(exc: OSError) -> str | None:
    """What the kernel refused, when an OSError is a refusal: a seccomp named errno gives the syscall,
    EACCES/EPERM (Landlock, permissions, capabilities) the path when there is one."""
    err = exc.errno
    syscall = seccomp.syscall_of_errno(err, kernel.ARCH)
    if syscall is not None:
        return f"blocked system call {syscall} (seccomp)"
    if err not in (errno.EACCES, errno.EPERM):
        return None
    code = errno.errorcode[err]
    filename = exc.filename if type(exc.filename) in (str, bytes) else None
    return (
        f"refused by the kernel ({code}): {filename!r}"
    ) if filename is not None else f"refused by the kernel ({code})"


def answer(value: object, limit: int) -> tuple[Status, str | None, str]:
    """Classifies a returned value: (ok, text) for a number or string, wrong_type otherwise."""
    text = _answer_text(value)
    if text is None:
        return Status.WRONG_TYPE, None, f"returned {type(value).__name__}, not a number or string"
    if len(text) > limit:
        return Status.ERROR, None, f"answer longer than {limit} characters"
    return Status.OK, text, ""


def _answer_text(value: object) -> str | None:
    # Base-class methods, not the value's own: the text of an int subclass is that of its int value.
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return float.__repr__(value)
    if isinstance(value, Fraction):
        return Fraction.__str__(value)
    if isinstance(value, Decimal):
        return Decimal.__str__(value)
    sympy = sys.modules.get("sympy")
    if sympy is not None and isinstance(value, sympy.Basic):
        return _sympy_text(value)
    if isinstance(value, numbers.Real):  # numpy scalars and other registered reals
        return float.__repr__(float(value))
    return None


def _sympy_text(value: object) -> str | None:
    if getattr(value, "is_Rational", False):
        return str(value)  # "7", "3/4"
    if not getattr(value, "is_number", False) or getattr(value, "is_real", None) is False:
        return None  # free symbols, booleans, sets, complex numbers
    try:
        return float.__repr__(float(value))
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------- entry


def encode_result(result: dict) -> bytes:
    """Length-prefixed fields ("<n>:<text>" each). Plain string operations: cheaper in a fresh child than the
    json extension, whose code pages would all have to be faulted in."""
    value = result["v"]
    fields = (result["s"], "" if value is None else value, "0" if value is None else "1", result["d"], result["o"])
    return "".join(f"{len(f)}:{f}" for f in fields).encode("utf-8", "surrogatepass")


def decode_result(data: bytes) -> dict | None:
    """Inverse of encode_result, for untrusted bytes: None unless exactly five well-formed string fields."""
    try:
        text = data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
    fields, pos = [], 0
    while pos < len(text) and len(fields) < 5:
        colon = text.find(":", pos, pos + 12)
        length = text[pos:colon] if colon >= 0 else ""
        if not (length.isascii() and length.isdigit()):
            return None
        end = colon + 1 + int(length)
        if end > len(text):
            return None
        fields.append(text[colon + 1 : end])
        pos = end
    if len(fields) != 5 or pos != len(text) or fields[2] not in ("0", "1"):
        return None
    status, value, has_value, detail, output = fields
    return {"s": status, "v": value if has_value == "1" else None, "d": detail, "o": output}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def frame(payload: bytes) -> bytes:
    return b"%d:%b" % (len(payload), payload)


def split_frames(data: bytes, limit: int) -> list[bytes]:
    """The complete frames at the start of untrusted `data`, each at most `limit` bytes; stops at the first
    malformed or incomplete one."""
    frames, pos = [], 0
    while pos < len(data):
        colon = data.find(b":", pos, pos + 12)
        head = data[pos:colon] if colon >= 0 else b""
        if not head.isdigit() or int(head) > limit or colon + 1 + int(head) > len(data):
            break
        frames.append(data[colon + 1 : colon + 1 + int(head)])
        pos = colon + 1 + int(head)
    return frames


def child_main(ctx: ChildContext, codes: list[CodeType], result_fd: int) -> NoReturn:
    """Runs in the forked child; never returns. One frame per program, in order."""
    exit_code = EXIT_INTERNAL
    try:
        _signal.signal(_SIGTERM, _signal.SIG_DFL)  # the worker's handler is not ours (the C function: no enums)
        _setup_fds(ctx, result_fd)
        failures = harden(ctx)
        if failures:
            layer, error = next(iter(failures.items()))
            failed = encode_result(_result(Status.ERROR, detail=f"sandbox setup failed ({layer}): {error}"))
            _write_all(RESULT_FD, frame(failed) * len(codes))
        else:
            _run_all(ctx, codes)
        exit_code = 0
    except MemoryError:
        exit_code = EXIT_MEMORY
    except BaseException:  # noqa: BLE001, S110 -- the worker classifies the exit code
        pass
    os._exit(exit_code)


def _end_forbidden(ctx: ChildContext, reason: str) -> NoReturn:
    """The first policy violation ends the program there and then: its `forbidden` frame is written and the
    child leaves, so there is no record left for the program to clear and no exception to catch. A shared
    child's remaining programs go to a fresh child (the retire frame)."""
    payload = frame(encode_result(_result(Status.FORBIDDEN, detail=reason)))
    _write_all(RESULT_FD, payload + (frame(RETIRE_PAYLOAD) if ctx.shared else b""))
    os._exit(0)


def _run_all(ctx: ChildContext, codes: list[CodeType]) -> None:
    if ctx.python_layers:
        ctx.policy.final = lambda reason: _end_forbidden(ctx, reason)
        # A bound method: replacing AuditPolicy.__call__ on the class afterwards changes nothing here.
        sys.addaudithook(ctx.policy.__call__)  # cannot be removed from Python code
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if ctx.shared else 0
    for n, code in enumerate(codes):
        result = execute(ctx, code)
        _write_all(RESULT_FD, frame(encode_result(result)))
        if ctx.shared and n + 1 < len(codes) and _should_retire(ctx, result, peak):
            _write_all(RESULT_FD, frame(RETIRE_PAYLOAD))
            return


def _should_retire(ctx: ChildContext, result: dict, peak_kb: int) -> bool:
    """After a program that hit a limit or the policy, or grew the heap by a quarter of the memory limit, the
    rest of the chunk gets a fresh child: less of what it did can reach them (leaks, fragmentation, state)."""
    if result["s"] in (Status.FORBIDDEN.value, Status.MEMORY.value) or "output limit" in result["d"]:
        return True
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kb
    return grown_kb > ctx.config.memory_mb * 256


def namespace_init(ctx: ChildContext, worker_alive_fd: int) -> NoReturn:
    """PID 1 of the worker's PID namespace: forked first, it keeps the namespace alive so that every
    program's child is created in it (and sees no process but itself and this one). It holds no descriptor
    of the worker's, applies the same layers as a program's child (it runs no program: a failing layer is
    ignored), reaps any orphan, and dies with the worker (parent-death signal; the namespace and whatever
    is in it die with it; `worker_alive_fd` is the read end of a pipe only the worker writes to, which
    closes the race of a worker dying before the parent-death signal is set)."""
    try:
        _signal.signal(_SIGTERM, _signal.SIG_DFL)
        _signal.signal(int(signal.SIGCHLD), lambda *_: None)  # wakes the pause below
        _setup_fds(ctx, worker_alive_fd)
        harden(ctx, probe=True)
        while True:
            try:
                os.wait()
            except ChildProcessError:
                _signal.pause()
    except BaseException:  # noqa: BLE001, S110 -- nothing to report to; the worker's health check notices
        pass
    os._exit(EXIT_INTERNAL)


def probe_main(ctx: ChildContext, result_fd: int) -> NoReturn:
    """Probe child: tries every layer, reports the ones that fail, then runs a trivial program."""
    code = EXIT_INTERNAL
    try:
        _signal.signal(_SIGTERM, _signal.SIG_DFL)
        _setup_fds(ctx, result_fd)
        failures = harden(ctx, probe=True)
        ctx.enabled -= set(failures)
        if ctx.python_layers:
            sys.addaudithook(ctx.policy.__call__)
        result = execute(ctx, compile(f"def {ctx.config.entry}():\n    return 1\n", "<probe>", "exec"))
        _write_all(RESULT_FD, dumps({"failures": failures, "result": result}).encode())
        code = 0
    except BaseException:  # noqa: BLE001, S110
        pass
    os._exit(code)
