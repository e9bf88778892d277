"""The sandboxed program executor: answers, classification, and containment of hostile programs.

Programs run in batches (one executor for the module) so the whole file stays within a few seconds.
The layer tests at the end bypass the upper layers on purpose (static check, restricted builtins) to show
that the audit hook holds on its own; tests/test_executor_kernel.py switches every in-Python layer off and
runs this file's attack suite again against the kernel layers alone.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings
from pathlib import Path

import pytest

from reftkit.executor import DEFAULT_ALLOWED_IMPORTS, ExecResult, ExecutorConfig, ProgramExecutor, Status

# Module fixtures that run once with a child per program and once with 8 programs per child.
PER_CHILD = {"params": [1, 8], "ids": ["per_program", "shared_8"]}
LINUX = sys.platform.startswith("linux")
OK, WRONG, ERROR, TIMEOUT, MEMORY, FORBIDDEN = (Status.OK, Status.WRONG_TYPE, Status.ERROR, Status.TIMEOUT,
                                                Status.MEMORY, Status.FORBIDDEN)
BENIGN = "def solution():\n    apples = 12\n    eaten = 5\n    result = apples - eaten\n    return result\n"
LOOP = "def solution():\n    while True:\n        pass\n"


def prog(body: str) -> str:
    return textwrap.dedent(body).strip() + "\n"


# cpu_s above timeout_s so that an endless loop always meets the wall clock first: with both at 1 s the kernel's
# CPU tick and the worker's poll race, and which one names the kill varies (the CPU limit has its own test).
# 2 s rather than 1 s of wall clock: the heaviest finite attack (nested_repr_recursion, 0.4 s of CPU) must not
# meet it on a loaded 2-core machine.
CONFIG = ExecutorConfig(workers=2, timeout_s=2.0, cpu_s=3.0, memory_mb=128, max_output_bytes=2000,
                        allowed_imports=(*DEFAULT_ALLOWED_IMPORTS, "time"))


@pytest.fixture(scope="module")
def executor():
    with ProgramExecutor(CONFIG) as ex:
        yield ex


@pytest.fixture(scope="module")
def shared_executor():
    """The opt-in mode: up to 8 programs per forked child."""
    with ProgramExecutor(dataclasses.replace(CONFIG, programs_per_child=8)) as ex:
        yield ex


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary.txt"
    path.write_text("precious")
    return path


# ------------------------------------------------------------------------------------------- behaviour

BEHAVIOUR = {
    "int": (BENIGN, OK, "7"),
    "float": ("def solution():\n    return 25 / 2\n", OK, "12.5"),
    "negative": ("def solution():\n    return 3 - 10\n", OK, "-7"),
    "fraction": ("from fractions import Fraction\ndef solution():\n    return Fraction(6, 8)\n", OK, "3/4"),
    "decimal": ("import decimal\ndef solution():\n    return decimal.Decimal('1.10') + decimal.Decimal('2.2')\n",
                OK, "3.30"),
    "sympy_rational": (prog("""
        import sympy
        def solution():
            x = sympy.symbols('x')
            return sympy.solve(sympy.Eq(4 * x + 3, 6), x)[0]
        """), OK, "3/4"),
    "sympy_system": (prog("""
        from sympy import symbols, solve
        def solution():
            x, y = symbols('x y')
            s = solve([x + y - 10, x - y - 2], [x, y])
            return s[x] * s[y]
        """), OK, "24"),
    "sympy_float": ("import sympy\ndef solution():\n    return sympy.sqrt(2)\n", OK, repr(2**0.5)),
    "sympify_benign": ("import sympy\ndef solution():\n    return sympy.sympify('3/4 + 1')\n", OK, "7/4"),
    "string_answer": ("def solution():\n    return 'b'\n", OK, "b"),
    "math_stats": (prog("""
        import math, statistics
        def solution():
            return math.ceil(statistics.mean([1, 2, 4]) * 10)
        """), OK, "24"),
    "helpers_and_classes": (prog("""
        class Box:
            def __init__(self, n):
                self.n = n
        def double(x):
            return 2 * x
        def solution():
            return sum(double(Box(i).n) for i in range(4))
        """), OK, "12"),
    "main_guard_and_print": (prog("""
        def solution():
            print("thinking")
            return 42
        if __name__ == "__main__":
            print(solution())
        """), OK, "42"),
    "datetime_itertools": (prog("""
        import datetime, itertools
        def solution():
            d = datetime.date(2024, 2, 27) + datetime.timedelta(days=3)
            return d.day + len(list(itertools.combinations(range(5), 2)))
        """), OK, "11"),
    "strptime_lazy_import": (prog("""
        import datetime
        def solution():
            return datetime.datetime.strptime('2024-03-05', '%Y-%m-%d').day
        """), OK, "5"),  # C code importing _strptime through the program's __import__
    "returns_none": ("def solution():\n    x = 1\n", WRONG, None),
    "returns_bool": ("def solution():\n    return True\n", WRONG, None),
    "returns_list": ("import sympy\ndef solution():\n    x = sympy.Symbol('x')\n    return sympy.solve(x**2 - 4, x)\n",
                     WRONG, None),
    "returns_dict": ("def solution():\n    return {'a': 1}\n", WRONG, None),
    "returns_function": ("def solution():\n    return solution\n", WRONG, None),
    "returns_complex": ("def solution():\n    return 1 + 2j\n", WRONG, None),
    "returns_symbol": ("import sympy\ndef solution():\n    return sympy.Symbol('x') + 1\n", WRONG, None),
    "exception": ("def solution():\n    return 1 / 0\n", ERROR, None),
    "syntax_error": ("def solution(:\n    return 1\n", ERROR, None),
    "no_solution": ("def answer():\n    return 1\n", ERROR, None),
    "solution_not_callable": ("solution = 5\n", ERROR, None),
    "null_byte": ("def solution():\n    return 1\x00\n", ERROR, None),
    "not_a_string": (None, ERROR, None),
    "too_long": ("# " + "x" * 200_000 + "\ndef solution():\n    return 1\n", ERROR, None),
}


@pytest.fixture(scope="module", **PER_CHILD)
def behaviour_results(request) -> dict[str, ExecResult]:
    executor = request.getfixturevalue("executor" if request.param == 1 else "shared_executor")
    names = list(BEHAVIOUR)
    results = executor.run([BEHAVIOUR[n][0] for n in names])  # one batch for all
    assert len(results) == len(names)
    return dict(zip(names, results, strict=True))


@pytest.mark.parametrize("name", list(BEHAVIOUR))
def test_behaviour(behaviour_results, name):
    _, status, value = BEHAVIOUR[name]
    result = behaviour_results[name]
    assert isinstance(result, ExecResult)
    assert (result.status, result.value) == (status, value), result
    assert result.ok == (status is OK)


def test_behaviour_details(behaviour_results):
    assert behaviour_results["syntax_error"].detail.startswith("SyntaxError")
    assert "solution" in behaviour_results["no_solution"].detail
    assert behaviour_results["exception"].detail.startswith("ZeroDivisionError")
    assert behaviour_results["main_guard_and_print"].output == "thinking\n"  # the __main__ block did not run
    assert "not a number or string" in behaviour_results["returns_list"].detail


def test_order_and_values_over_many_programs(executor):
    programs = [f"def solution():\n    return {i} * 3 + 0.5\n" for i in range(150)]
    assert [r.value for r in executor.run(programs)] == [repr(i * 3 + 0.5) for i in range(150)]
    assert executor.run([]) == []


@pytest.mark.parametrize(("programs", "chunks"), [
    (1, [[[0]], []]),
    (3, [[[0, 1]], [[2]]]),  # not both on the first worker: a call waits for its slowest worker
    (4, [[[0, 1]], [[2, 3]]]),  # a share in one chunk: parsed and compiled before the first fork
    (40, [[list(range(0, 10)), list(range(20, 30))], [list(range(10, 20)), list(range(30, 40))]]),
    (100, [[list(range(0, 16)), list(range(32, 48))], [list(range(16, 32)), list(range(48, 64))]]),
])
def test_a_call_is_spread_over_the_workers(executor, programs, chunks):
    """What the first dispatch of a call sends to each of the 2 workers: a fair share each, in one chunk when
    it fits, else in chunks of at most 16 with the next one queued behind; the rest waits for answers."""
    from reftkit.executor.pool import _Batch

    batch = _Batch([BENIGN] * programs)
    batch.queues["lean"].extend(range(programs))
    executor._dispatch(batch)
    assert [list(w.inflight) for w in executor._pool("lean")] == chunks
    while batch.left:  # let the workers answer, so that the executor stays in step for the next test
        executor._pump(batch)
        executor._dispatch(batch)
    assert [r.value for r in batch.results] == ["7"] * programs


# -------------------------------------------------------------------------------------- attack suite
# name -> (program, accepted statuses). CANARY and CREATED are replaced with paths under tmp_path.

ATTACKS = {
    "fork_bomb": ("import os\ndef solution():\n    while True:\n        os.fork()\n", {FORBIDDEN}),
    "fork_via_sympy_gadget": (prog("""
        from sympy.external import import_module
        def solution():
            import_module('os').fork()
        """), {FORBIDDEN}),
    "memory_bomb_loop": ("def solution():\n    x = []\n    while True:\n        x.append(bytearray(10**7))\n",
                         {MEMORY}),
    "memory_bomb_single": ("def solution():\n    return len(bytearray(10**11))\n", {MEMORY}),
    "memory_bomb_list": ("def solution():\n    return len([0] * 10**10)\n", {MEMORY}),
    "infinite_loop": ("def solution():\n    while True:\n        pass\n", {TIMEOUT}),
    "deep_recursion": ("def solution():\n    def f(n):\n        return f(n + 1)\n    return f(0)\n", {ERROR}),
    "nested_repr_recursion": (prog("""
        def solution():
            x = ()
            for _ in range(10**6):
                x = (x,)
            return str(x)
        """), {ERROR}),
    "huge_output": ("def solution():\n    while True:\n        print('x' * 1000)\n", {ERROR}),
    "huge_answer": ("def solution():\n    return 'x' * 10**6\n", {ERROR}),
    "huge_int": ("def solution():\n    return 10**100000\n", {ERROR}),
    "read_etc_passwd": ("def solution():\n    return open('/etc/passwd').read()\n", {FORBIDDEN}),
    "read_home_pathlib": ("import pathlib\ndef solution():\n    return str(list(pathlib.Path.home().iterdir()))\n",
                          {FORBIDDEN}),
    "read_via_io": ("import io\ndef solution():\n    return io.open('/etc/hostname').read()\n", {FORBIDDEN}),
    "write_canary": ("def solution():\n    with open('CANARY', 'w') as f:\n        f.write('pwned')\n    return 1\n",
                     {FORBIDDEN}),
    "delete_canary": ("import os\ndef solution():\n    os.remove('CANARY')\n    return 1\n", {FORBIDDEN}),
    "rmtree": ("import shutil\ndef solution():\n    shutil.rmtree('/tmp')\n", {FORBIDDEN}),
    "socket": ("import socket\ndef solution():\n    return socket.create_connection(('1.1.1.1', 80))\n", {FORBIDDEN}),
    "subprocess": ("import subprocess\ndef solution():\n    subprocess.run(['touch', 'CREATED'])\n    return 1\n",
                   {FORBIDDEN}),
    "os_system": ("import os\ndef solution():\n    return os.system('touch CREATED')\n", {FORBIDDEN}),
    "ctypes": ("import ctypes\ndef solution():\n    return ctypes.CDLL(None).system(b'touch CREATED')\n", {FORBIDDEN}),
    "signal_handler": ("import signal\ndef solution():\n    signal.signal(signal.SIGALRM, print)\n    return 1\n",
                       {FORBIDDEN}),
    "kill_parent": ("import os\ndef solution():\n    os.kill(os.getppid(), 9)\n    return 1\n", {FORBIDDEN}),
    "thread": ("import threading\ndef solution():\n    threading.Thread(target=print).start()\n    return 1\n",
               {FORBIDDEN}),
    "builtins_dict": ("def solution():\n    return __builtins__['open']('/etc/passwd').read()\n", {FORBIDDEN}),
    "dunder_import": ("def solution():\n    return __import__('os').getcwd()\n", {FORBIDDEN}),
    "sys_modules": ("import sys\ndef solution():\n    return sys.modules['os'].getcwd()\n", {FORBIDDEN}),
    "subclasses": ("def solution():\n    return len(().__class__.__base__.__subclasses__())\n", {FORBIDDEN}),
    "importlib": ("import importlib\ndef solution():\n    return importlib.import_module('os').getcwd()\n",
                  {FORBIDDEN}),
    "eval_string": ("def solution():\n    return eval(\"__import__('os').getcwd()\")\n", {FORBIDDEN}),
    "exec_string": ("def solution():\n    exec('import os')\n    return 1\n", {FORBIDDEN}),
    "compile_string": ("def solution():\n    return compile('1', 'x', 'eval')\n", {FORBIDDEN}),
    "getattr_dunder": ("def solution():\n    return getattr((), '__cl' + 'ass__')\n", {FORBIDDEN}),
    "format_string_walk": ("def solution():\n    return '{0.__class__.__base__}'.format(())\n", {FORBIDDEN}),
    "match_class_attr": ("def solution():\n    match 1:\n        case int(__class__=c):\n            return c\n",
                         {FORBIDDEN}),
    "match_args_class": (prog("""
        def solution():
            C = type('C', (), {'__match_args__': ('__class__',)})
            match C():
                case C(k):
                    return k
        """), {FORBIDDEN}),  # positional patterns read attributes named by strings
    "generator_frame": ("def solution():\n    g = (i for i in [1])\n    return g.gi_frame.f_back\n", {FORBIDDEN}),
    "traceback_frame": (prog("""
        def solution():
            try:
                1 / 0
            except Exception as e:
                return e.__traceback__.tb_frame.f_globals
        """), {FORBIDDEN}),
    "module_attr_chain": ("import fractions\ndef solution():\n    return fractions.sys.modules['os'].getcwd()\n",
                          {ERROR}),
    "private_module_attr": ("import random\ndef solution():\n    return random._os.getcwd()\n", {FORBIDDEN}),
    "sympify_escape": (prog("""
        import sympy
        def solution():
            return sympy.sympify("__import__('os').system('touch CREATED')")
        """), {FORBIDDEN}),
    "sympify_escape_caught": (prog("""
        import sympy
        def solution():
            try:
                sympy.sympify("open('/etc/passwd')")
            except BaseException:
                pass
            return 1
        """), {FORBIDDEN}),
    "unicode_import": ("import \uff4f\uff53\ndef solution():\n    return 1\n", {FORBIDDEN}),
    "redefine_builtins": ("__builtins__ = {}\ndef solution():\n    return 1\n", {FORBIDDEN}),
    "exit": ("def solution():\n    exit(0)\n", {FORBIDDEN}),
    "system_exit": ("def solution():\n    raise SystemExit(0)\n", {ERROR}),
    "keyboard_interrupt": ("def solution():\n    raise KeyboardInterrupt\n", {ERROR}),
    "relative_import": ("from . import x\ndef solution():\n    return 1\n", {FORBIDDEN}),
    "posix_spawn": ("import posix\ndef solution():\n    posix.posix_spawn('/bin/sh', ['sh'], {})\n", {FORBIDDEN}),
    "environ": ("import os\ndef solution():\n    return str(os.environ)\n", {FORBIDDEN}),
    "sleep_forever": ("import time\ndef solution():\n    time.sleep(10**6)\n", {TIMEOUT}),
}


@pytest.fixture(scope="module", **PER_CHILD)
def attack_run(request, tmp_path_factory) -> dict:
    """All attacks in one batch, then a benign program; with a canary file they must not touch. Once with a
    child per program, once with up to 8 programs per child (attacks then share children with each other)."""
    executor = request.getfixturevalue("executor" if request.param == 1 else "shared_executor")
    workdir = tmp_path_factory.mktemp("attacks")
    canary, created = workdir / "canary.txt", workdir / "created"
    canary.write_text("precious")
    names = list(ATTACKS)
    sources = [ATTACKS[n][0].replace("CANARY", str(canary)).replace("CREATED", str(created)) for n in names]
    start = time.monotonic()
    results = executor.run([*sources, BENIGN])
    elapsed = time.monotonic() - start
    return {"results": dict(zip(names, results[:-1], strict=True)), "benign": results[-1], "canary": canary,
            "created": created, "elapsed": elapsed, "executor": executor}


@pytest.mark.slow  # the whole attack suite (its fixture runs every attack once): CI, not the fast loop
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_contained(attack_run, name):
    result = attack_run["results"][name]
    assert result.status in ATTACKS[name][1], result
    assert result.value is None, result


def test_attacks_leave_the_host_unharmed(attack_run):
    assert attack_run["canary"].read_text() == "precious"
    assert not attack_run["created"].exists()
    assert attack_run["benign"] == ExecResult(OK, "7")  # answered right after the whole attack batch
    assert attack_run["executor"].run([BENIGN])[0].value == "7"  # and still serving
    assert attack_run["elapsed"] < 20
    details = attack_run["results"]
    assert details["fork_bomb"].detail == "ImportError: os not allowed"
    assert "wall-clock" in details["infinite_loop"].detail
    assert "output limit" in details["huge_output"].detail
    assert details["sympify_escape_caught"].detail.startswith("eval/exec of code with forbidden name open")


# ------------------------------------------------------------------------------- programs_per_child > 1

# (program, status, value) in submission order. With one worker and 4 programs per child, the 20 programs go
# in two chunks of 10 (more than the 16 of one chunk), run by children for 0-3, 4-7 and 8-9, then 10-13, ...
SHARED_CASES = [
    ("import math\ndef solution():\n    math.pi = 3\n    return 1\n", OK, "1"),  # group 1
    ("import math\ndef solution():\n    return math.pi\n", OK, repr(3.141592653589793)),  # fresh proxy
    ("import decimal\ndef solution():\n    decimal.getcontext().prec = 2\n    return 1\n", OK, "1"),
    ("import decimal\ndef solution():\n    return decimal.Decimal(1) / 3\n", OK, "0." + "3" * 28),
    ("def solution():\n    return 0\n", OK, "0"),  # group 2: a wall-clock kill in the middle
    ("import time\ndef solution():\n    time.sleep(100)\n", TIMEOUT, None),
    ("def solution():\n    return 1\n", OK, "1"),
    ("def solution():\n    return 2\n", OK, "2"),
    (prog("""
        class Loud:
            def __del__(self):
                print('x' * 5000)
        def solution():
            a = Loud()
            a.me = a
            return 1
        """), ERROR, None),  # group 3: its finaliser runs (and overflows) before its result is taken
    ("def solution():\n    return 3\n", OK, "3"),
    ("def solution():\n    while True:\n        print('x' * 1000)\n", ERROR, None),  # output cap, retire
    ("def solution():\n    return 4\n", OK, "4"),
    ("def solution():\n    return len(bytearray(10**11))\n", MEMORY, None),
    (ATTACKS["sympify_escape_caught"][0], FORBIDDEN, None),
    ("def solution():\n    return 5\n", OK, "5"),
    ("def solution():\n    return 6\n", OK, "6"),
    (LOOP, TIMEOUT, None),  # the CPU timer (1 s), or the wall clock (1.5 s) on a loaded machine
    ("def solution():\n    return 7\n", OK, "7"),
    ("def solution():\n    return 8\n", OK, "8"),
    ("def solution():\n    return 9\n", OK, "9"),
]


@pytest.fixture(scope="module")
def one_shared_worker():
    config = dataclasses.replace(CONFIG, workers=1, programs_per_child=4, timeout_s=1.5, cpu_s=0.5)
    with ProgramExecutor(config) as ex:
        yield ex


@pytest.mark.slow
def test_shared_child_failures_stay_with_their_program(one_shared_worker):
    results = one_shared_worker.run([source for source, _, _ in SHARED_CASES])
    assert [(r.status, r.value) for r in results] == [(status, value) for _, status, value in SHARED_CASES]
    assert "wall-clock" in results[5].detail, results[5]  # (the CPU timer is checked in test_shared_child_crash)
    assert "output limit" in results[8].detail, results[8]


def test_shared_child_shares_class_state(one_shared_worker, executor):
    """The documented price of programs_per_child > 1: class attributes set by one program are seen by the
    next one in the same child (module proxies, random and decimal state are fresh; classes are not)."""
    tag = "import fractions\ndef solution():\n    fractions.Fraction.tag = 42\n    return 1\n"
    read = "import fractions\ndef solution():\n    return fractions.Fraction.tag\n"
    assert [r.value for r in one_shared_worker.run([tag, read, BENIGN])] == ["1", "42", "7"]
    assert [r.status for r in executor.run([tag, read])] == [OK, ERROR]  # a child per program: no leak


AFFINITY = "import os\ndef solution():\n    return len(os.sched_getaffinity(0))\n"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="2+ CPUs, Linux")
def test_workers_cover_every_cpu_then_each_stays_on_one():
    """With a worker per CPU this process may use (made 2 here), each worker is pinned to a CPU of its own,
    which its children inherit; with fewer workers, or pin_workers=False, the kernel places them."""
    own = os.sched_getaffinity(0)
    two = set(sorted(own)[:2])
    os.sched_setaffinity(0, two)
    try:
        cases = {(2, True): 1, (2, False): 2, (1, True): 2}  # (workers, pin_workers) -> CPUs a child may use
        for (workers, pin), child_cpus in cases.items():
            config = dataclasses.replace(CONFIG, workers=workers, pin_workers=pin, python_layers=False)
            with ProgramExecutor(config) as ex:
                assert [r.value for r in ex.run([AFFINITY] * 4)] == [str(child_cpus)] * 4, (workers, pin)
                pinned = [os.sched_getaffinity(w.proc.pid) for w in ex._workers]
                assert pinned == ([{c} for c in sorted(two)] if child_cpus == 1 else [two] * workers), (workers, pin)
    finally:
        os.sched_setaffinity(0, own)


@pytest.mark.slow
def test_killed_workers_are_replaced(executor):
    hogs = ["def solution():\n    while True:\n        pass\n", "def solution():\n    return len(bytearray(10**11))\n"]
    loop, memory = hogs
    results = executor.run([loop, memory, BENIGN, memory, loop, BENIGN])  # one timeout per worker
    assert [r.status for r in results] == [TIMEOUT, MEMORY, OK, MEMORY, TIMEOUT, OK]
    for worker in list(executor._workers):  # kill the workers themselves, from outside
        os.kill(worker.proc.pid, signal.SIGKILL)
    assert [r.value for r in executor.run([BENIGN] * 5)] == ["7"] * 5


def test_warm_up_programs_are_ordinary_allowed_programs():
    """The worker runs its own warm-up programs (executor/warm.py) before forking any child: constants that
    the static check would accept from anyone, importing only default-allowed modules."""
    import ast

    from reftkit.executor import warm
    from reftkit.executor.policy import check_program

    for imports, source in warm._PROGRAMS:
        assert set(imports) <= set(DEFAULT_ALLOWED_IMPORTS)
        assert check_program(ast.parse(source), frozenset(DEFAULT_ALLOWED_IMPORTS)) is None, source


def test_warm_up_leaves_no_trace():
    """The first programs a fresh worker runs see nothing of its warm-up: not its printed output, not a
    policy violation, and the warm-up follows the configured entry point."""
    config = dataclasses.replace(CONFIG, workers=1, entry="main")
    printer = "def main():\n    print('mine')\n    return 1\n"
    with ProgramExecutor(config) as ex:
        first, forbidden, benign = ex.run([printer, "import os\ndef main():\n    return 1\n",
                                           "import math\ndef main():\n    return math.floor(7.5)\n"])
    assert first == ExecResult(OK, "1", "", "mine\n")
    assert forbidden.status == FORBIDDEN
    assert benign == ExecResult(OK, "7")


def test_numpy_blas_runs_single_threaded():
    """A BLAS call that would start threads (a 300x300 product) runs in the child's one thread: the workers'
    environment asks BLAS libraries for one thread, since seccomp kills thread creation."""
    pytest.importorskip("numpy")
    config = ExecutorConfig(workers=1, timeout_s=5.0, allowed_imports=(*DEFAULT_ALLOWED_IMPORTS, "numpy"))
    source = "import numpy as np\ndef solution():\n    a = np.ones((300, 300))\n    return float(np.dot(a, a).sum())\n"
    with ProgramExecutor(config) as ex:
        assert ex.run([source])[0] == ExecResult(OK, "27000000.0")


def run_from_threads(executor: ProgramExecutor, threads: int, programs: int) -> dict[int, list[str | None]]:
    """Each of `threads` threads runs `programs` programs at once on one executor; thread k's i-th program
    returns k * 1000 + i. Returns each thread's values, in order."""
    out: dict[int, list[str | None]] = {}

    def work(k: int) -> None:
        sources = [f"def solution():\n    return {k * 1000 + i}\n" for i in range(programs)]
        out[k] = [r.value for r in executor.run(sources)]

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    return out


def test_threads_share_an_executor(executor):
    assert run_from_threads(executor, 3, 20) == {k: [str(k * 1000 + i) for i in range(20)] for k in range(3)}


def test_layers_reported(executor):
    layers = executor.layers
    for name in ("process", "audit_hook", "static_check", "restricted_builtins", "rlimit_cpu"):
        assert name in layers
    assert all(v.split(":")[0] in ("on", "off", "partial") for v in layers.values())
    if LINUX:
        for name in ("network", "seccomp", "landlock", "no_new_privs", "parent_death_signal", "rlimit_as"):
            assert name in layers  # reported either way; "off" ones come with a reason and a warning


def test_degraded_layer_warns_once():
    ex = ProgramExecutor(ExecutorConfig(workers=1))  # never started: no process
    fake_worker = types.SimpleNamespace(layers={"seccomp": "off: not on this test's kernel"})
    with pytest.warns(RuntimeWarning, match="'seccomp' degraded: off: not on this test's kernel"):
        ex._note_layers(fake_worker)
        ex._flush_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex._note_layers(fake_worker)  # a second worker reporting the same: no second warning
        ex._flush_warnings()
    assert ex.layers["seccomp"].startswith("off")
    ex.close()


def _processes_with(tag: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if tag.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _ns_pid(pid: int) -> int | None:
    """The process's pid in its own (innermost) PID namespace."""
    try:
        return int(Path(f"/proc/{pid}/status").read_text().split("NSpid:")[1].split("\n")[0].split()[-1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has already died


def _wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_cpu_limit_kills_a_child_per_program():
    with ProgramExecutor(ExecutorConfig(workers=1, timeout_s=10.0, cpu_s=1.0)) as ex:
        result, after = ex.run([LOOP, BENIGN])
    assert (result.status, result.detail) == (TIMEOUT, "CPU limit of 1 s exceeded"), result  # not the wall clock
    assert after == ExecResult(OK, "7")


@pytest.mark.skipif(not LINUX, reason="uses /proc")
def test_close_leaves_no_process():
    ex = ProgramExecutor(ExecutorConfig(workers=2, timeout_s=0.5))
    results = ex.run([BENIGN, LOOP, "import sympy\ndef solution():\n    return sympy.Integer(2)\n"])
    assert [r.status for r in results] == [OK, TIMEOUT, OK]
    tag = ex._tag
    # two stdlib workers, two sympy workers (each forks its PID namespace's PID 1 once it has warmed up)
    assert len([p for p in _processes_with(tag) if _ns_pid(p) != 1]) == 4
    ex.close()
    assert _wait_for(lambda: not _processes_with(tag), 2.0)
    with pytest.raises(RuntimeError):
        ex.run([BENIGN])
    ex.close()  # idempotent


@pytest.mark.skipif(not LINUX, reason="uses /proc")
def test_unclosed_executor_is_cleaned_up():
    ex = ProgramExecutor(ExecutorConfig(workers=1))
    assert ex.run([BENIGN])[0].value == "7"
    tag = ex._tag
    del ex
    gc.collect()
    assert _wait_for(lambda: not _processes_with(tag), 2.0)


@pytest.mark.skipif(not LINUX, reason="uses /proc and the parent-death signal")
def test_worker_death_takes_its_program_along():
    with ProgramExecutor(ExecutorConfig(workers=1, timeout_s=1.0)) as ex:
        results: list[ExecResult] = []
        runner = threading.Thread(target=lambda: results.extend(ex.run([LOOP])))
        runner.start()
        assert _wait_for(lambda: len(_processes_with(ex._tag)) == 3)  # the worker, its PID 1, the program
        zygote = ex._workers[0].proc.pid
        child = next(p for p in _processes_with(ex._tag) if _ppid(p) == zygote and _ns_pid(p) != 1)
        ns_init = next(p for p in _processes_with(ex._tag) if _ppid(p) == zygote and _ns_pid(p) == 1)
        os.kill(zygote, signal.SIGKILL)
        assert _wait_for(lambda: not _alive(child) and not _alive(ns_init), 5.0)  # the namespace's PID 1 too
        runner.join(timeout=20)
        assert [r.status for r in results] == [TIMEOUT]  # rerun on a fresh worker, then timed out there


def test_config_validation():
    with pytest.raises(ValueError):
        ExecutorConfig(allowed_imports=("os",))
    with pytest.raises(ValueError):
        ExecutorConfig(allowed_imports=("math", "ctypes.util"))
    with pytest.raises(ValueError):
        ExecutorConfig(entry="not an identifier")
    with pytest.raises(ValueError):
        ExecutorConfig(workers=0)
    with pytest.raises(ValueError, match="pin_workers must be a bool"):
        ExecutorConfig(pin_workers="no")
    assert ExecutorConfig(timeout_s=1.5).cpu_limit_s == 2


# ------------------------------------------------------------------------------------ layer by layer
# A worker is built in a subprocess (it moves itself into new namespaces) and given code that skips the
# static check. "audit" keeps the audit hook, with the full builtins (as if the program had escaped the
# restricted ones); "shared" switches every in-Python layer off (python_layers=False) and runs lists of
# programs 4 to a child. The kernel layers alone, through the public API: tests/test_executor_kernel.py.

LAYER_SCRIPT = r"""
import builtins, json, os, sys, tempfile
from reftkit.executor.config import ExecutorConfig
from reftkit.executor.worker import Zygote
mode, attacks = sys.argv[1], json.loads(sys.argv[2])
scratch = tempfile.mkdtemp(); os.chmod(scratch, 0o555)
shared = mode == "shared"
restricted = mode == "restricted"  # the static check has fallen; restricted builtins and the hook have not
config = ExecutorConfig(timeout_s=5.0 if shared else 2.0, cpu_s=1.0 if shared else None,
                        programs_per_child=4 if shared else 1, python_layers=not shared)
zygote = Zygote(config, ["math"], scratch)
if not restricted:
    zygote.ctx.builtins = dict(vars(builtins))  # as if the program had escaped the restricted builtins
out = {"layers": zygote.layers}
for name, source in attacks.items():
    sources = [source] if isinstance(source, str) else source
    results = zygote.runner.run_codes([compile(s, "<attack>", "exec") for s in sources])
    out[name] = results[0] if isinstance(source, str) else results
print(json.dumps(out))
"""

ESCAPE = "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0].__init__.__globals__"
# The sandbox's own frame, one level up from solution(): what a program that reached sys would walk to.
SANDBOX_FRAME = "__import__('sys')._getframe(1)"
AUDIT_ATTACKS = {
    "os_system_via_subclasses": (f"def solution():\n    return {ESCAPE}['system']('touch CREATED')\n", "blocked"),
    "open_passwd": ("def solution():\n    return open('/etc/passwd').read()\n", "open"),
    "open_write": ("def solution():\n    open('CANARY', 'w').write('x')\n", "writing"),
    "fork": ("def solution():\n    return __import__('os').fork()\n", "os.fork"),
    "kill_parent": ("def solution():\n    import os\n    os.kill(os.getppid(), 9)\n", "os.kill"),
    "remove": ("def solution():\n    __import__('os').remove('CANARY')\n", "os.remove"),
    "listdir_root": ("def solution():\n    return str(__import__('os').listdir('/'))\n", "os.listdir"),
    "import_socket": ("def solution():\n    return __import__('socket')\n", "socket"),
    "ctypes_dlopen": ("def solution():\n    return __import__('ctypes').CDLL(None)\n", "ctypes"),
    "eval_escape": ("def solution():\n    return eval(\"__import__('os')\")\n", "__import__"),
    "path_like_runs_code_in_hook": (prog("""
        class P:
            def __fspath__(self):
                __import__('os').system('touch CREATED')
                return '/etc/passwd'
        def solution():
            return open(P()).read()
        """), "blocked"),
    "caught_and_hidden": (prog("""
        def solution():
            try:
                open('/etc/passwd')
            except BaseException:
                pass
            return 1
        """), "open"),
    # The sticky record cleared through the sandbox's frame after catching the exception; the
    # hook switched off by replacing __call__ on its class, or the code of its method.
    "caught_and_record_cleared": (prog(f"""
        def solution():
            try:
                open('/etc/passwd')
            except BaseException:
                pass
            {SANDBOX_FRAME}.f_locals['ctx'].policy.violation = None
            return 1
        """), "open"),
    "hook_class_call_replaced": (prog(f"""
        def solution():
            policy = {SANDBOX_FRAME}.f_locals['ctx'].policy
            type(policy).__call__ = lambda self, event, args: None
            return open('/etc/passwd').read()
        """), "open"),  # no effect: the hook was registered as a bound method
    "hook_code_replaced": (prog(f"""
        def solution():
            policy = {SANDBOX_FRAME}.f_locals['ctx'].policy
            policy.__call__.__func__.__code__ = (lambda self, event, args: None).__code__
            return open('/etc/passwd').read()
        """), "__code__"),
}


IMPORTER = "(lambda: 0).__globals__['__builtins__']['__import__']"
IMPORTER_ATTACKS = {  # name -> (program, (status, value, detail)), run with the restricted builtins
    "os_by_list_fromlist": (f"def solution():\n    return {IMPORTER}('os', None, None, ['path']).getcwd()\n",
                            ("error", None, "AttributeError: 'NoneType' object has no attribute 'getcwd'")),
    "ctypes_already_loaded": (f"def solution():\n    return {IMPORTER}('ctypes', None, None, ['CDLL']).CDLL\n",
                              ("error", None, "AttributeError: 'NoneType' object has no attribute 'CDLL'")),
    "allowed_module_as_proxy": (f"def solution():\n    return {IMPORTER}('math', None, None, ['sqrt']).sqrt(16)\n",
                                ("ok", "4.0", "")),
}
SEGV = "def solution():\n    return __import__('ctypes').string_at(0)\n"  # a crash, as after an escape
SILENT_EXIT = "def solution():\n    __import__('os')._exit(0)\n"  # ends the child cleanly, without a result
SHARED_ATTACKS = {name: ([(
    f"def solution():\n    return {k}\n"
) for k in range(3)], None) for name in ("segv", "exit", "cpu")}
for _name, _hostile in (("segv", SEGV), ("exit", SILENT_EXIT), ("cpu", LOOP)):
    SHARED_ATTACKS[_name][0].insert(1, _hostile)


def _run_layers(mode: str, attacks: dict, canary: Path, created: Path) -> dict:
    sources = {n: fill(s, {"CANARY": canary, "CREATED": created}) for n, (s, _) in attacks.items()}
    proc = subprocess.run([sys.executable, "-c", LAYER_SCRIPT, mode, json.dumps(sources)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def fill(source: str | list[str], names: dict[str, object]) -> str | list[str]:
    """`source` (or each of a list) with every placeholder of `names` replaced by its value, longer names
    first (NR_INOTIFY_INIT1 before a shorter name it starts with)."""
    if isinstance(source, list):
        return [fill(s, names) for s in source]
    for key in sorted(names, key=len, reverse=True):
        source = source.replace(key, str(names[key]))
    return source


@pytest.fixture(scope="module")
def layer_runs(tmp_path_factory) -> dict:
    if not LINUX:
        pytest.skip("Linux layers")
    workdir = tmp_path_factory.mktemp("layers")
    canary, created = workdir / "canary.txt", workdir / "created"
    canary.write_text("precious")
    runs = {mode: _run_layers(mode, attacks, canary, created)
            for mode, attacks in (("audit", AUDIT_ATTACKS), ("shared", SHARED_ATTACKS),
                                  ("restricted", IMPORTER_ATTACKS))}
    return {"runs": runs, "canary": canary, "created": created}


@pytest.mark.parametrize("name", list(IMPORTER_ATTACKS))
def test_import_function_hands_out_no_module(layer_runs, name):
    """The sandbox's __import__, reached through a function's __globals__, returned real modules
    when called with a list fromlist (its branch for C callers). Now: a proxy of an allowed module, or None."""
    result = layer_runs["runs"]["restricted"][name]
    assert (result["s"], result["v"], result["d"]) == IMPORTER_ATTACKS[name][1], result


@pytest.mark.parametrize("name", list(AUDIT_ATTACKS))
def test_audit_hook_alone_blocks(layer_runs, name):
    result, word = layer_runs["runs"]["audit"][name], AUDIT_ATTACKS[name][1]
    assert result["s"] == "forbidden", result
    assert word in result["d"], result


@pytest.mark.parametrize("name", list(SHARED_ATTACKS))
def test_shared_child_crash(layer_runs, name):
    """A child killed by a crash, by its CPU timer, or ended without a result in the middle of a chunk: the
    program that did it is charged, the others are answered (those after it by fresh children), in order."""
    results = layer_runs["runs"]["shared"][name]
    expected = {"segv": ("error", "SIGSEGV"), "exit": ("error", "no result"), "cpu": ("timeout", "CPU limit")}[name]
    assert [r["v"] for r in results] == ["0", None, "1", "2"], results
    assert (results[1]["s"], expected[1] in results[1]["d"]) == (expected[0], True), results[1]


def test_layer_attacks_left_the_host_unharmed(layer_runs):
    assert layer_runs["canary"].read_text() == "precious"
    assert not layer_runs["created"].exists()


# Run as uid 65534 with the in-Python layers off, once against the worker and once against the runner.
UNPRIVILEGED_ESCAPES = [
    "import resource\ndef solution():\n    resource.prlimit(PID, resource.RLIMIT_NOFILE, (4, 4))\n    return 1\n",
    "import ctypes\ndef solution():\n    return ctypes.CDLL(None).shmget(0x5EFA, 1 << 20, 0o1666)\n",
    "import fcntl, os\ndef solution():\n    r, w = os.pipe()\n    fcntl.fcntl(r, fcntl.F_SETOWN, PID)\n    return 1\n",
]
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]


def _unprivileged_python() -> str | None:
    """An interpreter uid 65534 can run and start again itself (as the executor will)."""
    check = ("import subprocess, sys; assert sys.version_info >= (3, 10); "
             "subprocess.run([sys.executable, '-c', 'import ast'], check=True)")
    for candidate in (sys.executable, "/usr/bin/python3"):
        path = shutil.which(candidate) or candidate
        try:
            ok = subprocess.run([*AS_NOBODY, path, "-c", check], capture_output=True, timeout=20, cwd="/")
        except (OSError, subprocess.TimeoutExpired):
            return None
        if ok.returncode == 0:
            return path
    return None


def _run_executor_as(prefix: list[str], python: str) -> dict:
    """Runs the executor under `python` (started as `prefix`): three ordinary programs with every layer on,
    then UNPRIVILEGED_ESCAPES with the in-Python layers off, aimed at the worker and at the runner."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    script = (
        f"import sys, json; sys.path.insert(0, {src!r})\n"
        "from reftkit.executor import ProgramExecutor, ExecutorConfig\n"
        "cfg = ExecutorConfig(workers=1, timeout_s=0.5, allowed_imports=('math', 'fractions'))\n"
        "with ProgramExecutor(cfg) as ex:\n"
        "    rs = ex.run(['def solution():\\n    return 6 * 7\\n', 'import os\\ndef solution():\\n    return 1\\n',\n"
        "                 'def solution():\\n    while True:\\n        pass\\n'])\n"
        "    layers = ex.layers\n"
        "import dataclasses, os\n"
        "with ProgramExecutor(dataclasses.replace(cfg, python_layers=False)) as ex:\n"
        "    ex.run(['def solution():\\n    return 1\\n'])\n"
        "    pids = (ex._workers[0].proc.pid, os.getpid())\n"
        f"    escaped = [s.replace('PID', str(p)) for s in {UNPRIVILEGED_ESCAPES!r} for p in pids]\n"
        "    rs += ex.run(escaped)\n"
        "    kernel_layers = ex.layers\n"
        "print(json.dumps({'r': [[r.status.value, r.value] for r in rs], 'layers': layers, 'kernel': kernel_layers}))\n"
    )
    proc = subprocess.run([*prefix, python, "-c", script],
                          capture_output=True, text=True, timeout=60, cwd="/", check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["r"] == [["ok", "42"], ["forbidden", None], ["timeout", None]] + [["forbidden", None]] * 6
    assert out["kernel"]["pid_namespace"].startswith("on"), out["kernel"]
    return out


@pytest.mark.skipif(not LINUX or os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root + setpriv")
def test_unprivileged_user():
    """An ordinary user (uid 65534, no capabilities): the namespaces come from a user namespace."""
    python = _unprivileged_python()
    if python is None:
        pytest.skip("no Python interpreter readable by uid 65534")
    out = _run_executor_as(AS_NOBODY, python)
    assert out["layers"]["privileges"].startswith("on: not root")
    for name in ("network", "ipc_namespace"):
        assert out["kernel"][name].startswith("on: new user +"), out["kernel"]


@pytest.mark.skipif(not LINUX or os.geteuid() != 0, reason="needs root")
def test_root_with_a_world_readable_python_drops_to_nobody():
    """Root, with an interpreter that uid 65534 can read (a system Python): children run as nobody."""
    python = _unprivileged_python()
    if python is None:
        pytest.skip("no Python interpreter readable by uid 65534")
    out = _run_executor_as([], python)
    assert out["layers"]["privileges"].startswith("on: runs as uid 65534"), out["layers"]
    expected = {"network": "on: new network namespace", "ipc_namespace": "on: new IPC namespace"}
    assert {name: out["kernel"][name] for name in expected} == expected


def test_more_workers_than_usable_cpus_are_refused_naming_the_maximum(monkeypatch):
    """--exec_workers 500 was accepted and ran slower; a count the machine cannot run
    is refused, in the config (before any work) and by the executor itself."""
    from pydantic import ValidationError

    from reftkit import config as config_module
    from reftkit.config import EvalConfig, SandboxOptions
    from reftkit.executor import config as executor_config
    from reftkit.executor.config import usable_cpus

    most = usable_cpus()
    with pytest.raises(ValueError, match=rf"^{most + 1} sandbox workers, but this process may use {most} CPUs? "
                                         rf"\(os.sched_getaffinity\): at most {most}$"):
        ProgramExecutor(ExecutorConfig(workers=most + 1))
    with pytest.raises(ValidationError, match=rf"exec_workers\n.*at most {most}"):
        EvalConfig(cot="program", exec_workers=500)
    assert EvalConfig(exec_workers=most).exec_workers == most
    # The defaults stay within the machine: 2 where there are 2 CPUs or more, 1 on one CPU.
    monkeypatch.setattr(executor_config, "usable_cpus", lambda: 1)
    monkeypatch.setattr(config_module, "_usable_cpus", lambda: 1)
    assert SandboxOptions().exec_workers == 1 and ExecutorConfig().workers == 1
    with pytest.raises(ValidationError, match="2 sandbox workers, but this process may use 1 CPU "):
        SandboxOptions(exec_workers=2)
