"""Executor configuration and result types, shared by the trainer side and the workers.

Kept free of heavy imports: the workers import this module before anything else.
"""

from __future__ import annotations

import keyword
import math
import os
from dataclasses import asdict, dataclass, field
from enum import Enum


class Status(str, Enum):
    """How a program ended. Exactly one per program."""

    OK = "ok"  # solution() returned a number or a string (see ExecResult.value)
    WRONG_TYPE = "wrong_type"  # returned anything else: None, bool, complex, containers, functions, symbols...
    ERROR = "error"  # syntax error, no entry function, exception, crash, output limit exceeded
    TIMEOUT = "timeout"  # wall-clock or CPU limit exceeded (the program was killed)
    MEMORY = "memory"  # memory limit exceeded (MemoryError, or killed by the kernel)
    FORBIDDEN = "forbidden"  # blocked import, name, attribute, audit event or system call

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ExecResult:
    """One program's outcome.

    value: the returned answer as text when status is ok: ints and floats as repr ("12", "12.5"), Fraction
    and sympy rationals as "3/4", Decimal as str, other real numbers (sympy floats and surds, numpy scalars)
    as repr(float(x)), strings unchanged ("b"). None for every other status.
    detail: a short human-readable reason ("ImportError: os not allowed"); empty when ok.
    output: what the program printed (stdout and stderr together), at most max_output_bytes characters.
    """

    status: Status
    value: str | None = None
    detail: str = ""
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


# Pure-computation modules a P-CoT program may import. Submodules of an allowed module are allowed too.
DEFAULT_ALLOWED_IMPORTS: tuple[str, ...] = (
    "math",
    "cmath",
    "fractions",
    "decimal",
    "numbers",
    "statistics",
    "itertools",
    "functools",
    "collections",
    "heapq",
    "bisect",
    "datetime",
    "random",
    "re",
    "sympy",
)

# Refused even when listed in allowed_imports: each hands a program the OS, the interpreter's internals or
# attribute access by string (operator.attrgetter, string.Formatter.get_field), which would void the
# documented guarantees of the static check.
NEVER_ALLOWED: frozenset[str] = frozenset(
    {
        "os", "posix", "nt", "sys", "builtins", "importlib", "imp", "io", "_io", "pathlib", "shutil",
        "tempfile", "glob", "fnmatch", "subprocess", "_posixsubprocess", "socket", "_socket", "ssl", "select",
        "selectors", "asyncio", "ctypes", "_ctypes", "cffi", "multiprocessing", "_multiprocessing", "threading",
        "_thread", "concurrent", "signal", "resource", "fcntl", "mmap", "pty", "tty", "termios", "gc",
        "inspect", "types", "code", "codeop", "marshal", "pickle", "_pickle", "copyreg", "shelve", "dbm",
        "operator", "_operator", "string", "pdb", "bdb", "traceback", "linecache", "runpy", "pkgutil",
        "zipimport", "site", "sysconfig", "webbrowser", "urllib", "http", "ftplib", "smtplib", "sqlite3",
        "faulthandler", "reftkit",
    }
)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one, else all of them)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def check_workers(workers: int) -> None:
    """Refuses more sandbox workers than usable CPUs: each program runs on one CPU, so more workers
    run no more programs at once; they only start (and preload) more interpreters that contend for
    the same CPUs, which is slower. Trainer side only: a worker, pinned to one
    CPU, must not check its own configuration against its affinity."""
    most = usable_cpus()
    if workers > most:
        raise ValueError(f"{workers} sandbox workers, but this process may use {most} CPU"
                         f"{'s' if most > 1 else ''} (os.sched_getaffinity): at most {most}")


def _default_workers() -> int:
    return min(8, usable_cpus())


@dataclass(frozen=True)
class ExecutorConfig:
    """Limits and policy for ProgramExecutor. Every field applies to each program separately.

    workers: worker processes per pool (one pool for stdlib-only programs, a second one, started on first
        use, for programs that import a third-party module such as sympy). One per CPU core is right; more
        than the CPUs this process may use is refused when the executor is made (`check_workers`).
    timeout_s: wall-clock limit per program, from fork to result; the program is killed when it is reached.
    cpu_s: CPU-time limit per program (RLIMIT_CPU, whole seconds, rounded up); None means timeout_s.
    memory_mb: address space the program may add on top of the pre-loaded interpreter (RLIMIT_AS).
    max_output_bytes: cap on what the program prints (stdout + stderr) and, separately, on the length of
        the returned answer's text; exceeding either is an error.
    allowed_imports: modules the program may import (and their submodules). Modules in NEVER_ALLOWED are
        rejected. Third-party modules (not in the standard library) are served by the second pool.
    entry: name of the function to call; the program's answer is what it returns.
    startup_timeout_s: how long a new worker may take to import the allowed modules and report ready.
    programs_per_child: 1 (default) runs every program in a fresh forked process. N > 1 (opt-in, faster) lets
        one forked process run up to N programs in turn, each in a fresh namespace under the same checks and
        its own wall-clock and CPU limits; they share one interpreter, so one program can change module
        state the later ones see (docs/executor.md, "Several programs per child").
    pin_workers: True (default) keeps each worker, and so each of its children, on one CPU when the pool has a
        worker for every CPU this process may use (os.sched_getaffinity; Linux): a child then runs where its
        worker waits for it, and neither wakes the other across CPUs nor needs TLB flushes sent to another CPU
        at every fork and copy-on-write fault (docs/reports/executor-speed-history.md). With fewer workers than
        CPUs, or False, the kernel places them.
    python_layers: True (default) keeps the in-Python layers: the static check, the restricted builtins with
        the import allow-list and module proxies, the audit hook. False is for tests only: it switches them
        off so that the tests can show what the kernel layers contain on their own (any import, open, eval
        works up to the kernel); the executor reports those layers as off and warns.
    """

    workers: int = field(default_factory=_default_workers)
    timeout_s: float = 2.0
    cpu_s: float | None = None
    memory_mb: int = 256
    max_output_bytes: int = 10_000
    allowed_imports: tuple[str, ...] = DEFAULT_ALLOWED_IMPORTS
    entry: str = "solution"
    startup_timeout_s: float = 60.0
    programs_per_child: int = 1
    pin_workers: bool = True
    python_layers: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_imports", tuple(self.allowed_imports))
        _require(self.workers >= 1, "workers must be >= 1")
        _require(self.timeout_s > 0, "timeout_s must be > 0")
        _require(self.cpu_s is None or self.cpu_s > 0, "cpu_s must be > 0 or None")
        _require(self.memory_mb >= 16, "memory_mb must be >= 16")
        _require(self.max_output_bytes >= 64, "max_output_bytes must be >= 64")
        _require(self.startup_timeout_s > 0, "startup_timeout_s must be > 0")
        _require(self.programs_per_child >= 1, "programs_per_child must be >= 1")
        _require(type(self.python_layers) is bool, "python_layers must be a bool")
        _require(type(self.pin_workers) is bool, "pin_workers must be a bool")
        _require(self.entry.isidentifier() and not keyword.iskeyword(self.entry), "entry must be an identifier")
        _require(not self.entry.startswith("_"), "entry must not start with an underscore")
        for name in self.allowed_imports:
            parts = name.split(".")
            _require(all(p.isidentifier() and not p.startswith("_") for p in parts), f"bad module name {name!r}")
            _require(parts[0] not in NEVER_ALLOWED, f"module {parts[0]!r} can never be allowed")

    @property
    def cpu_limit_s(self) -> int:
        """RLIMIT_CPU soft limit in whole seconds."""
        return max(1, math.ceil(self.cpu_s if self.cpu_s is not None else self.timeout_s))

    def to_dict(self) -> dict:
        return asdict(self)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
