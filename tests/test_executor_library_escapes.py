"""In-Python escapes through library functions, against the production configuration (cot.open_grader: the default
allow-list with sympy, the in-Python layers on, a child per program or 8 per child).

* In-Python escapes through library functions that turn strings into objects, with only the default
  allow-list: sympy's `get_class('os.getcwd')` (any callable of any loaded module, `sys._getframe` and
  `builtins.getattr` included, which led to the audit policy through the frames and switched it off), the
  already refused `import_module` imported under another name (`from sympy.external import import_module as
  im`: the static check looked only at the bound name), and lambdify, which prints a symbol's name verbatim into
  the code it compiles (`Symbol('builtins.getattr')`, `Symbol('libmp.backend.os.getcwd')` with mpmath). All
  three gave the real modules; the kernel still held (Landlock refused `/etc/hostname`, seccomp `unlink`), but
  the program then returned `ok` after both refusals. Now each is `forbidden` before anything runs.
* The worker, Landlocked and pinned: a program whose parsing needs a module the worker had not loaded
  (`\\N{...}` escapes need unicodedata), the sympy pool's lazy imports, and that no worker is replaced.
* The trainer: several threads, close() during run(), KeyboardInterrupt mid-batch, a worker SIGKILLed from
  outside in the middle of a chunk of several programs, the trainer itself SIGKILLed: one result per program,
  innocent programs answered, no process left.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from reftkit.executor import ExecutorConfig, ProgramExecutor, kernel
from reftkit.executor.policy import check_library_code
from test_executor import (
    BENIGN,
    FORBIDDEN,
    LINUX,
    OK,
    PER_CHILD,
    _alive,
    _ns_pid,
    _ppid,
    _processes_with,
    _wait_for,
    prog,
    run_from_threads,
)

pytestmark = pytest.mark.skipif(not LINUX or kernel.ARCH is None, reason="Linux kernel layers (x86_64/aarch64)")

# What cot.open_grader builds with the trainer's defaults (exec_workers=2, exec_timeout=2.0, exec_memory_mb=512).
PRODUCTION = ExecutorConfig(workers=2, timeout_s=2.0, memory_mb=512)

_FRAMES_TO_POLICY = """
            ga = get_class('builtins.getattr')
            sa = get_class('builtins.setattr')
            f = get_class('sys._getframe')(0)
            while f is not None:
                loc = ga(f, 'f_lo' + 'cals')
                if 'ctx' in loc:
                    sa(loc['ctx'].policy, '_ju' + 'dge', lambda e, a: None)
                    break
                f = ga(f, 'f_ba' + 'ck')
"""

# name -> program; every one must be `forbidden` (before this pass each returned `ok`).
ESCAPES = {
    "get_class_real_function": """
        from sympy.utilities.source import get_class
        def solution():
            return get_class('os.getcwd')()
        """,
    "get_class_policy_off_then_read": """
        from sympy.utilities.source import get_class
        def solution():
        """ + _FRAMES_TO_POLICY + """
            try:
                get_class('os.open')('/etc/hostname', 0)
            except OSError as e:
                return 'refused by the kernel, but ok: ' + str(e)
            return 'read'
        """,
    "get_class_policy_off_then_unlink": """
        from sympy.utilities.source import get_class
        def solution():
        """ + _FRAMES_TO_POLICY + """
            try:
                get_class('os.unlink')('/nonexistent-redteam3')
            except OSError as e:
                return 'refused by the kernel, but ok: ' + str(e)
            return 'unlinked'
        """,
    "get_class_aliased": """
        import sympy.utilities.source as s
        def solution():
            return s.get_class('os.getcwd')()
        """,
    "get_class_star_import": """
        from sympy.utilities.source import *
        def solution():
            return get_class('os.getcwd')()
        """,
    "import_module_as_alias": """
        from sympy.external import import_module as im
        def solution():
            return str(im('sys').modules['os'].getcwd())
        """,
    "lambdify_symbol_builtins_getattr": """
        import sympy
        def solution():
            x = sympy.Symbol('x')
            return str(sympy.lambdify([x], sympy.Symbol('builtins.getattr'), 'math')(1))
        """,
    "lambdify_symbol_mpmath_os": """
        import sympy
        def solution():
            x = sympy.Symbol('x')
            return sympy.lambdify([x], sympy.Symbol('libmp.backend.os.getcwd'), 'mpmath')(1)()
        """,
    "lambdify_function_name_eval": """
        import sympy
        def solution():
            x = sympy.Symbol('x')
            return str(sympy.lambdify([x], sympy.Function('builtins.eval')(x), 'math'))
        """,
}
# The library paths those fixes touch, still answered.
BENIGN_LIBRARY = {
    "lambdify_math": ("import sympy\ndef solution():\n    x = sympy.Symbol('x')\n"
                      "    return sympy.lambdify(x, x ** 2 + 1, 'math')(3)\n", "10"),
    "lambdify_mpmath": ("import sympy\ndef solution():\n    x = sympy.Symbol('x')\n"
                        "    return float(sympy.lambdify(x, sympy.sqrt(x), 'mpmath')(16))\n", "4.0"),
    "parse_expr": ("from sympy.parsing.sympy_parser import parse_expr\ndef solution():\n"
                   "    return parse_expr('3/4 + 1')\n", "7/4"),
    "namedtuple": ("import collections\ndef solution():\n    P = collections.namedtuple('P', 'a b')\n"
                   "    return P(1, 2).b\n", "2"),
    "re_compile": ("import re\ndef solution():\n    return len(re.compile('a+').findall('aa b aaa'))\n", "2"),
    # \N{...} in a literal: the (Landlocked) worker's parser imports unicodedata the first time
    "named_unicode_escape_lean": ("def solution():\n    return int('\\N{DIGIT SEVEN}')\n", "7"),
    "named_unicode_escape_sympy": ("import sympy\ndef solution():\n"
                                   "    return sympy.Integer(int('\\N{DIGIT SEVEN}'))\n", "7"),
    "sympy_lazy_submodule": ("import sympy.codegen.ast\nimport sympy\ndef solution():\n"
                             "    return len(sympy.latex(sympy.Symbol('x') ** 2))\n", "5"),  # x^{2}
}


@pytest.fixture(scope="module", **PER_CHILD)
def production_run(request):
    config = dataclasses.replace(PRODUCTION, programs_per_child=request.param)
    with ProgramExecutor(config) as ex:
        sources = [prog(ESCAPES[n]) for n in ESCAPES] + [src for src, _ in BENIGN_LIBRARY.values()]
        ex.run([BENIGN])
        ex.run(["import sympy\ndef solution():\n    return 1\n"])  # both pools up
        pids = sorted(w.proc.pid for w in ex._workers)
        results = ex.run([*sources, BENIGN])
        after = sorted(w.proc.pid for w in ex._workers)
        yield {"results": dict(zip([*ESCAPES, *BENIGN_LIBRARY, "benign"], results, strict=True)),
               "pids": (pids, after)}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_string_to_object_gadgets_of_the_default_allow_list_are_refused(production_run, name):
    result = production_run["results"][name]
    assert result.status is FORBIDDEN, result
    assert result.value is None


@pytest.mark.parametrize("name", list(BENIGN_LIBRARY))
def test_library_paths_near_the_fixes_still_answer(production_run, name):
    result = production_run["results"][name]
    assert (result.status, result.value) == (OK, BENIGN_LIBRARY[name][1]), result


def test_no_worker_was_replaced_by_the_probes(production_run):
    before, after = production_run["pids"]
    assert before == after and len(before) == 4
    assert production_run["results"]["benign"].value == "7"


def test_library_code_check_refuses_interpreter_internals():
    assert check_library_code("def f(x):\n    return builtins.getattr\n") is not None
    assert check_library_code("def f(x):\n    return libmp.backend.os\n") is not None
    assert check_library_code("def f(x):\n    import os\n    return os\n") is not None
    assert check_library_code("from sys import modules\n") is not None
    assert check_library_code("from math import *\n") is None  # lambdify's own import
    assert check_library_code("def f(x):\n    return re.compile('a')\n") is None


# ------------------------------------------------------------------------------------------- trainer side

# ~0.25 s on a 2026 Xeon, ~1 s on slower CPUs: 8 of them on 2 workers outlast the 0.3 s interrupt below
# on any machine (3 * 10**6, the earlier count, finished all 8 in 0.28 s there), and each stays
# well inside the 3 s limit.
SLOW = "def solution():\n    n = 0\n    while n < 10 ** 7:\n        n += 1\n    return {v}\n"


def _programs_of(ex: ProgramExecutor) -> list[int]:
    """Program children (not the namespaces' PID 1) under the executor's workers."""
    workers = {w.proc.pid for w in ex._workers}
    return [p for p in _processes_with(ex._tag) if _ppid(p) in workers and _ns_pid(p) != 1]


def test_threads_close_and_interrupt_each_program_one_result():
    config = dataclasses.replace(PRODUCTION, timeout_s=3.0)
    ex = ProgramExecutor(config)
    try:
        # several threads at once: each gets its own values, in order
        assert run_from_threads(ex, 4, 6) == {t: [str(t * 1000 + i) for i in range(6)] for t in range(4)}

        # KeyboardInterrupt mid-batch: raised, the busy workers killed, and the next call answers everything
        def interrupt(*_):
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        try:
            with pytest.raises(KeyboardInterrupt):
                ex.run([SLOW.format(v=i) for i in range(8)])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert [r.value for r in ex.run([SLOW.format(v=i) for i in range(4)])] == ["0", "1", "2", "3"]
        assert _wait_for(lambda: not _programs_of(ex), 5.0)

        # close() from another thread during run(): it waits for the call, which gets every result
        results: list = []
        runner = threading.Thread(target=lambda: results.extend(ex.run([SLOW.format(v=i) for i in range(6)])))
        runner.start()
        time.sleep(0.1)
        ex.close()
        runner.join(timeout=30)
        assert [(r.status, r.value) for r in results] == [(OK, str(i)) for i in range(6)]
        assert _wait_for(lambda: not _processes_with(ex._tag), 3.0)
    finally:
        ex.close()


def test_a_worker_killed_in_the_middle_of_a_chunk_charges_no_innocent_program():
    """6 programs, 2 workers: a chunk of 3 each. The first worker is SIGKILLed from outside while its first
    program runs; its chunk is run again program by program on a new worker, and every program gets its own
    answer, once. The worker's namespace (its PID 1 and its program) dies with it."""
    with ProgramExecutor(dataclasses.replace(PRODUCTION, timeout_s=3.0)) as ex:
        ex.run([BENIGN, BENIGN])
        victim = ex._pool("lean")[0].proc.pid
        results: list = []
        runner = threading.Thread(target=lambda: results.extend(ex.run([SLOW.format(v=i) for i in range(6)])))
        runner.start()
        assert _wait_for(lambda: any(_ppid(p) == victim for p in _programs_of(ex)), 5.0)
        namespace = [p for p in _processes_with(ex._tag) if _ppid(p) == victim]
        os.kill(victim, signal.SIGKILL)
        runner.join(timeout=30)
        assert [(r.status, r.value) for r in results] == [(OK, str(i)) for i in range(6)]
        assert _wait_for(lambda: not any(_alive(p) for p in namespace), 3.0)
        assert victim not in {w.proc.pid for w in ex._workers}


@pytest.mark.slow
def test_a_killed_trainer_leaves_no_process():
    """The trainer SIGKILLed with both pools up and a program running: the workers read EOF and leave, and
    each namespace's PID 1 (and so every program) dies with its worker."""
    script = textwrap.dedent("""
        import sys, threading
        from reftkit.executor import ExecutorConfig, ProgramExecutor
        ex = ProgramExecutor(ExecutorConfig(workers=2, timeout_s=2.0, memory_mb=512))
        ex.run(["import sympy\\ndef solution():\\n    return 1\\n", "def solution():\\n    return 1\\n"])
        print(ex._tag, flush=True)
        ex.run(["def solution():\\n    while True:\\n        pass\\n"] * 2)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        tag = trainer.stdout.readline().strip()
        assert tag
        assert _wait_for(lambda: len(_processes_with(tag)) >= 9, 10.0)  # 4 workers, 4 PID 1s, 1+ program
        trainer.kill()
        trainer.wait()
        assert _wait_for(lambda: not _processes_with(tag), 8.0), _processes_with(tag)
    finally:
        trainer.kill()
