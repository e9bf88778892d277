"""Warming, in the worker, the Python code that every child runs after its hardening.

CPython 3.11 counts the calls of each function in its code object until it specialises ("quickens") that
code, and writes the specialised instructions and their inline caches into the code object as well. A
function first run in a child therefore writes memory the child shares with the worker: a copy-on-write
page fault per page touched, in every child. So the worker runs the child's path once it has hardened
(executing a program in a fresh namespace, the import proxies, the audit policy's common checks, answer
classification, result encoding) on known-good programs of its own, often enough for that code to be
specialised once, in the worker, before any program's child is forked.

Nothing from outside runs in the worker: the programs below are constants, compiled here.
"""

from __future__ import annotations

import os
import sys

from reftkit.executor.sandbox import ChildContext, _write_all, encode_result, execute, frame

# (modules each imports, source): plain arithmetic, true division, and the stdlib modules math programs use.
_PROGRAMS = (
    ((), "def solution():\n    a = 12\n    b = 5\n    result = a * b - a // b\n    return result\n"),
    ((), "def solution():\n    total = 250\n    n = 8\n    result = total / n * 1.5\n    return result\n"),
    ((), "def solution():\n    print('working', 3)\n    return 'seven'\n"),
    (("math",), "import math\ndef solution():\n    result = math.ceil(17 / 5) + math.sqrt(16)\n    return result\n"),
    (("fractions",), "import fractions\ndef solution():\n    return 120 * fractions.Fraction(3, 4)\n"),
    (("statistics",), "import statistics\ndef solution():\n    return statistics.mean([70, 85, 90])\n"),
)
_ROUNDS = 10  # more calls than CPython 3.11's quickening delay (8)


def warm_child_path(ctx: ChildContext) -> None:
    """Runs the known-good programs whose imports are allowed and loaded, `_ROUNDS` times, in the worker;
    leaves the worker's standard streams and the audit policy's state as they were. Not for shared children
    (programs_per_child > 1): their path arms per-program timers, which must never run in the worker, and
    each of their children runs many programs anyway."""
    if ctx.shared:
        return
    entry = f"def {ctx.config.entry}():"
    programs = [compile(source.replace("def solution():", entry), "<warm-up>", "exec") for imports, source in _PROGRAMS
                if all(m in ctx.allowed and m in sys.modules for m in imports)]
    streams = sys.stdout, sys.stderr
    read_fd, write_fd = os.pipe()  # stands for the result pipe
    try:
        for _ in range(_ROUNDS):
            for code in programs:
                ctx.policy("exec", (code,))  # the audit hook's path for an allowed event
                _write_all(write_fd, frame(encode_result(execute(ctx, code))))
                os.read(read_fd, 65536)
    finally:
        sys.stdout, sys.stderr = streams
        ctx.policy.violation = None
        os.close(read_fd)
        os.close(write_fd)
