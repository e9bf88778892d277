"""The result path into the trainer, and the system calls an escaped program can still make (beyond
tests/test_executor_kernel_escapes.py).

* The result path end to end, into the trainer's grader (cot.ProgramGrader, answers.read_answer/is_correct), which
  runs in the trainer's process: odd values returned with the default layers (NaN, infinities, huge ints,
  Decimals and Fractions, lone surrogates, sympy's nan/oo/zoo and conversions that overflow or explode), and
  result frames forged by an escaped program (surrogates, invalid UTF-8, fields at and past the size limits,
  unknown statuses). A crash, a hang or a huge allocation in the trainer would be a hole; each case asserts its
  status and that grading returns.
* System calls the first pass left allowed, made for real by an escaped program: foreign ABIs (int 0x80, x32,
  out-of-range and high-bit numbers), writeback of other processes' data (sync, syncfs, fsync, fdatasync,
  sync_file_range, msync: refused now; they flushed the host's dirty data and slept uninterruptibly), memory
  poisoning, secret memory, another process's robust futex list, uretprobe, sendfile into the result pipe.
* What survives a child for the next program: a lock on a file of a read root, a shrunken result pipe.
* What an escaped program can read of the other programs of its chunk (a documented limit: their text, and the
  results of those that ran before it, are in the worker's memory image it was forked from; it cannot change
  them).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import time

import pytest

from reftkit.data.records import Example
from reftkit.executor import ExecResult, ProgramExecutor, kernel, seccomp
from reftkit.executor.sandbox import encode_result, frame
from reftkit.grading.answers import read_answer
from reftkit.grading.cot import ProgramGrader, program_header
from test_executor import BENIGN, CONFIG, ERROR, FORBIDDEN, LINUX, MEMORY, OK, TIMEOUT, WRONG, prog
from test_executor_kernel import _children, _ns_init
from test_executor_kernel_escapes import KILLED, RAW, REDTEAM_CONFIG

pytestmark = pytest.mark.skipif(not LINUX or kernel.ARCH is None, reason="Linux kernel layers (x86_64/aarch64)")

ESCAPED = dataclasses.replace(REDTEAM_CONFIG, workers=1, allowed_imports=CONFIG.allowed_imports)
LIMIT = CONFIG.max_output_bytes
READ_ROOT_FILE = os.__file__  # a file every child may read (the standard library)
# What the grader may extract: a canonical number (an integer, a reduced fraction, a decimal) or nothing.
CANONICAL = re.compile(r"-?[0-9]+(\.[0-9]+|/[0-9]+)?")
X86 = kernel.ARCH == "x86_64"


def _nr(x86_64: int, aarch64: int) -> int:
    return x86_64 if X86 else aarch64


# ------------------------------------------------------------------------------- the result path, layers on

# name -> (function body, status). Run with the default layers (python_layers=True), graded by ProgramGrader.
RETURNED = {
    "nan": ("return float('nan')", OK),
    "inf": ("return float('inf')", OK),
    "minus_inf": ("return -float('inf')", OK),
    "int_past_str_digits": ("return 10 ** 5000", ERROR),  # int -> str refuses > 4300 digits
    "int_past_answer_cap": ("return 10 ** 4000", ERROR),  # 4001 characters > max_output_bytes
    "int_at_answer_cap": (f"return 10 ** {LIMIT - 1}", OK),  # the cap itself: 1e1999 reads as no number
    "decimal_huge_exponent": ("import decimal\n    return decimal.Decimal('1e999999999')", OK),
    "decimal_nan": ("import decimal\n    return decimal.Decimal('-sNaN')", OK),
    "decimal_tiny": ("import decimal\n    return decimal.Decimal('7e-999999999')", OK),
    "fraction_huge_terms": ("import fractions\n    return fractions.Fraction(10 ** 1999, 3)", ERROR),
    "lone_surrogate": ("return '\\ud800'", OK),
    "surrogate_after_digit": ("return '7\\udcff'", OK),
    "nul_and_controls": ("return '\\x00\\x1b[2J7'", OK),
    "str_subclass": ("class S(str):\n        pass\n    return S('7')", OK),
    "int_subclass": ("class I(int):\n        pass\n    return I(7)", OK),
    "answer_at_cap": (f"return '7' * {LIMIT}", OK),
    "bool": ("return True", WRONG),
    "complex": ("return 7j", WRONG),
    "sympy_nan": ("import sympy\n    return sympy.nan", OK),
    "sympy_oo": ("import sympy\n    return sympy.oo", WRONG),
    "sympy_zoo": ("import sympy\n    return sympy.zoo", WRONG),
    "sympy_float_overflow": ("import sympy\n    return sympy.Float('1e100000')", OK),
    "sympy_exp_overflow": ("import sympy\n    return sympy.exp(10 ** 6)", OK),  # float() gives inf
    "sympy_rational_past_str_digits": ("import sympy\n    return sympy.Rational(10 ** 5000, 3)", ERROR),
    "sympy_power_explodes": ("import sympy\n    return sympy.Integer(10) ** (10 ** 9)", (MEMORY, TIMEOUT)),
    "sympy_unevaluated_huge": ((
        "import sympy\n    return sympy.Pow(10, 10 ** 12, evaluate=False)"
    ), (OK, ERROR, TIMEOUT)),
}


def _example(answer: str = "7") -> Example:
    return Example("rt2", "How many?", "", answer)


@pytest.mark.slow
def test_odd_return_values_reach_the_grader_as_bounded_text():
    """Every odd value a program can return with the default layers ends as a status in the child, and the
    trainer's grader reads what comes back without raising: a canonical number or no answer."""
    examples = [_example() for _ in RETURNED]
    completions = ["    " + body + "\n" for body, _ in RETURNED.values()]
    with ProgramExecutor(dataclasses.replace(CONFIG, workers=1, timeout_s=1.5, cpu_s=2.0)) as ex:
        grader = ProgramGrader(ex)
        start = time.monotonic()
        grades = grader.grade(completions, examples)
        results = ex.run([program_header(e.question) + c for e, c in zip(examples, completions, strict=True)])
        assert time.monotonic() - start < 40
    for (name, (_, wanted)), grade, result in zip(RETURNED.items(), grades, results, strict=True):
        assert result.status in (wanted if isinstance(wanted, tuple) else (wanted,)), (name, result)
        assert grade.extracted is None or CANONICAL.fullmatch(grade.extracted), (name, grade)
        assert result.value is None or len(result.value) <= LIMIT, name
        assert len(result.detail) <= 300 and len(result.output) <= LIMIT, name
    by_name = dict(zip(RETURNED, grades, strict=True))
    for name in ("nan", "inf", "minus_inf", "decimal_huge_exponent", "decimal_nan", "lone_surrogate",
                 "sympy_nan", "sympy_float_overflow", "sympy_exp_overflow", "int_at_answer_cap", "answer_at_cap"):
        assert by_name[name].extracted is None and not by_name[name].correct, (name, by_name[name])
    assert by_name["nul_and_controls"].extracted is None  # the 2 of the escape sequence and the 7: not one number
    for name in ("str_subclass", "int_subclass", "surrogate_after_digit"):
        assert by_name[name].extracted == "7" and by_name[name].correct, (name, by_name[name])
    assert by_name["decimal_tiny"].extracted == "0"


def test_grader_reads_adversarial_answer_text_in_linear_time():
    """read_answer on answer texts at the cap built against its regular expressions returns at once."""
    n = 10 * LIMIT
    texts = ["9" * n, "1 " + " " * n + "2", "- " * n, "\\frac{" * n, ("\\frac{" + "a" * 50 + "}") * (n // 60),
             "1/" * n, "1e" + "9" * n, "1e-" + "9" * n, "123," * n, "1" + " " * n + "/", "-" + " " * n,
             "\ud800" * n, "option " * n, "(" * n, "1 " + "2" * n + " /"]
    start = time.monotonic()
    for text in texts:
        for multiple_choice in (False, True):
            value = read_answer(text, multiple_choice)
            assert value is None or CANONICAL.fullmatch(value) or value in "abcde"
    assert time.monotonic() - start < 2


# --------------------------------------------------------------------- forged frames, layers off

def _forge(payload: bytes) -> str:
    """An escaped program that writes `payload` as its only frame and leaves."""
    return f"import os\ndef solution():\n    os.write(3, {frame(payload)!r})\n    os._exit(0)\n"


def _fields(status: str, value: str | None, detail: str = "", output: str = "") -> bytes:
    return encode_result({"s": status, "v": value, "d": detail, "o": output})


FORGED = {
    "surrogate_value": (_fields("ok", "\ud800\udfff7"), OK),
    "non_utf8": (b"2:ok1:\xff1:10:0:", ERROR),
    "overlong_utf8": (b"2:ok2:\xc0\xb71:10:0:", ERROR),
    "value_past_cap": (_fields("ok", "7" * (LIMIT + 50)), OK),  # cut to the cap by the worker
    "four_byte_chars_at_cap": (_fields("ok", "\U0010ffff" * LIMIT, "\U0010ffff" * 1000, "\U0010ffff" * LIMIT), OK),
    "detail_and_output_huge": (_fields("error", None, "d" * 50_000, "o" * 50_000), ERROR),
    "unknown_status": (_fields("OK", "7"), ERROR),
    "status_with_space": (_fields("ok ", "7"), ERROR),
    "internal_error_claimed": (_fields("error", None, "executor internal error: forged"), ERROR),
    "ok_nan": (_fields("ok", "nan"), OK),
    "ok_huge_exponent": (_fields("ok", "1e999999999999"), OK),
    "length_overflow": (b"99999999999:ok1:71:10:0:", ERROR),
    "six_fields": (_fields("ok", "7") + b"1:x", ERROR),
    "negative_length": (b"-2:ok1:71:10:0:", ERROR),
}


def test_forged_frames_reach_the_trainer_bounded_and_the_grader_copes():
    """An escaped program decides its own result, but whatever bytes it writes reach the trainer as one of the
    statuses, with every field within its limit, and the grader reads it without raising."""
    sources = [_forge(payload) for payload, _ in FORGED.values()] + [BENIGN]
    with ProgramExecutor(ESCAPED) as ex:
        worker = ex._workers[0].proc.pid
        results = ex.run(sources)
        grades = ProgramGrader(ex).grade([s.split("\n", 1)[1] for s in sources], [_example() for _ in sources])
        assert [w.proc.pid for w in ex._workers] == [worker]  # the health check a forged detail asks for passes
    for (name, (_, wanted)), result, grade in zip(FORGED.items(), results, grades, strict=False):
        assert result.status == wanted, (name, result)
        assert result.value is None or len(result.value) <= LIMIT, name
        assert len(result.detail) <= 300 and len(result.output) <= LIMIT, name
        assert grade.extracted is None or CANONICAL.fullmatch(grade.extracted), (name, grade)
    assert results[-1] == ExecResult(OK, "7")
    named = dict(zip(FORGED, results, strict=False))
    assert named["value_past_cap"].value == "7" * LIMIT
    # a pair of lone surrogates comes back joined (the JSON line to the trainer escapes each; json.loads pairs them)
    assert named["surrogate_value"].value == "\U000103ff7"
    assert named["non_utf8"].detail == "no result (malformed or missing)"


# ------------------------------------------------------------------------ system calls, made for real

SYSCALL_PROBES = {
    # foreign ABIs and numbers outside the table: the filter's architecture and x32 checks
    **({"int_0x80": (RAW + prog("""
        import mmap
        def solution():
            page = mmap.mmap(-1, 4096, prot=7)
            page.write(b'\\xb8\\x14\\x00\\x00\\x00\\xcd\\x80\\xc3')  # mov eax, 20 (i386 getpid); int 0x80; ret
            return ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
        """), FORBIDDEN, KILLED),
        "x32_getpid": (RAW + (
            "def solution():\n    return libc.syscall(ctypes.c_long(0x40000000 | 39))\n"
        ), FORBIDDEN, KILLED)}
       if X86 else {}),
    "number_minus_one": (RAW + "def solution():\n    return libc.syscall(ctypes.c_long(-1))\n", FORBIDDEN, KILLED),
    "kill_with_high_bits": (RAW + (
        f"def solution():\n    return libc.syscall(ctypes.c_long((1 << 32) | {_nr(62, 129)}), 1, 9)\n"
    ),
                            FORBIDDEN, KILLED),
    # memory of the host: poisoning and soft-offlining pages need CAP_SYS_ADMIN (or are not built in)
    "madv_hwpoison": (RAW + "import mmap\ndef solution():\n    m = mmap.mmap(-1, 4096)\n    m[0] = 1\n"
                      f"    return sc({_nr(28, 233)}, ctypes.addressof(ctypes.c_char.from_buffer(m)), 4096, 100)\n",
                      (ERROR, FORBIDDEN), "Errno"),
    "madv_soft_offline": (RAW + "import mmap\ndef solution():\n    m = mmap.mmap(-1, 4096)\n    m[0] = 1\n"
                          f"    return sc({_nr(28, 233)}, ctypes.addressof(ctypes.c_char.from_buffer(m)), 4096, 101)\n",
                          (ERROR, FORBIDDEN), "Errno"),
    # secret memory takes pages out of the kernel's direct map: it cannot be given a size (ftruncate refused)
    "memfd_secret": (RAW + "def solution():\n    fd = sc(447, 0)\n    os.ftruncate(fd, 1 << 20)\n",
                     (ERROR, FORBIDDEN), ""),
    # the namespace's PID 1 is not dumpable: its robust futex list is out of reach
    "robust_list_of_pid_1": (RAW + "def solution():\n    h, n = ctypes.c_void_p(), ctypes.c_size_t()\n"
                             f"    return sc({_nr(274, 100)}, 1, ctypes.byref(h), ctypes.byref(n))\n",
                             FORBIDDEN, "EPERM"),
    "mlockall": (RAW + f"def solution():\n    return sc({_nr(151, 230)}, 3)\n", (OK, ERROR), ""),
    # file data into the result pipe: no more than a write would do (no well-formed frame)
    "sendfile_into_result_pipe": (RAW + (
        f"def solution():\n    return sc({_nr(40, 71)}, 3, os.open({READ_ROOT_FILE!r}, os.O_RDONLY), 0, 100)\n"
    ),
                                  ERROR, "no result"),
}
if X86:  # no alarm(2) or uretprobe on aarch64
    SYSCALL_PROBES["alarm_on_itself"] = (RAW + "def solution():\n    sc(37, 1)\n    while True:\n        pass\n",
                                         TIMEOUT, "limit")
    SYSCALL_PROBES["uretprobe_outside_a_probe"] = (RAW + (
        "def solution():\n    return sc(335)\n"
    ), (ERROR, FORBIDDEN), "")


@pytest.fixture(scope="module")
def syscall_run() -> dict:
    with ProgramExecutor(ESCAPED) as ex:
        assert ex.run([BENIGN])[0] == ExecResult(OK, "7")
        results = ex.run([source for source, _, _ in SYSCALL_PROBES.values()] + [BENIGN])
        worker = ex._workers[0].proc.pid
        after = {"children": _children(worker), "ns_init": [_ns_init(worker)], "next": ex.run([BENIGN])[0]}
    return {"results": dict(zip(SYSCALL_PROBES, results, strict=False)), "benign": results[-1], **after}


@pytest.mark.parametrize("name", list(SYSCALL_PROBES))
def test_escaped_syscall_probe_is_contained(syscall_run, name):
    result = syscall_run["results"][name]
    _, status, word = SYSCALL_PROBES[name]
    assert result.status in (status if isinstance(status, tuple) else (status,)) and word in result.detail, result


def test_syscall_probes_leave_the_worker_serving(syscall_run):
    assert syscall_run["benign"] == ExecResult(OK, "7")
    assert syscall_run["next"] == ExecResult(OK, "7")
    assert syscall_run["children"] == syscall_run["ns_init"]  # no process left but the namespace's PID 1


def test_writeback_of_other_processes_data_is_refused_by_name():
    """sync, syncfs, fsync, fdatasync, sync_file_range and msync(MS_SYNC) on a shared mapping of a file opened for
    reading fail with their named errno, made with real arguments: a child has no dirty data of its own, so they
    only flushed the host's (host-wide for sync) and slept uninterruptibly meanwhile. os.fsync is `forbidden`."""
    calls = seccomp.syscall_numbers(kernel.ARCH, seccomp.NAMED_ERRNO_CALLS)
    source = RAW + prog(f"""
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        def errno_of(nr, *args):
            try:
                sc(nr, *args)
            except OSError as exc:
                return exc.errno
            return 0
        def solution():
            fd = os.open({READ_ROOT_FILE!r}, os.O_RDONLY)
            shared = libc.mmap(None, 4096, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            out = [errno_of({calls['sync']}), errno_of({calls['syncfs']}, fd), errno_of({calls['fsync']}, fd),
                   errno_of({calls['fdatasync']}, fd), errno_of({calls['sync_file_range']}, fd, 0, 0, 2),
                   errno_of({calls['msync']}, ctypes.c_void_p(shared), 4096, 4)]
            return ' '.join(map(str, out))
        """)
    expected = " ".join(str(seccomp.ERRNO_BASE + calls[n])
                        for n in ("sync", "syncfs", "fsync", "fdatasync", "sync_file_range", "msync"))
    fsync = f"import os\ndef solution():\n    os.fsync(os.open({READ_ROOT_FILE!r}, os.O_RDONLY))\n"
    with ProgramExecutor(ESCAPED) as ex:
        raw, named, benign = ex.run([source, fsync, BENIGN])
    assert raw == ExecResult(OK, expected), raw
    assert named.status == FORBIDDEN and "blocked system call fsync (seccomp)" in named.detail, named
    assert benign == ExecResult(OK, "7")


# ---------------------------------------------------------------------------- what survives a child

def test_nothing_a_child_held_reaches_the_next_program(tmp_path):
    """A lock on a file of a read root dies with the child that took it (the next program and the trainer take
    it at once); a result pipe shrunk by its program costs that program only (the next child has its own)."""
    lock = ("import fcntl, os\ndef solution():\n"
            f"    fcntl.flock(os.open({READ_ROOT_FILE!r}, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)\n    return 1\n")
    shrink = ("import fcntl, os\ndef solution():\n    fcntl.fcntl(3, 1031, 4096)\n"
              "    os.write(3, b'9' * 20000)\n    return 1\n")  # F_SETPIPE_SZ, then more than the pipe holds
    pipe_size = "import fcntl\ndef solution():\n    return fcntl.fcntl(3, 1032)\n"  # F_GETPIPE_SZ
    with ProgramExecutor(ESCAPED) as ex:
        first, second, shrunk, size, benign = ex.run([lock, lock, shrink, pipe_size, BENIGN])
    assert (first, second) == (ExecResult(OK, "1"), ExecResult(OK, "1"))
    fd = os.open(READ_ROOT_FILE, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the trainer's own lock: free
    finally:
        os.close(fd)
    assert shrunk.status in (TIMEOUT, ERROR) and shrunk.value is None, shrunk
    assert size.status == OK and int(size.value) > 4096, size
    assert benign == ExecResult(OK, "7")


# ------------------------------------------------------------ the other programs of a chunk (a known limit)

READER = prog("""
    import sys
    def solution():
        frame = sys._getframe()
        while frame is not None and frame.f_code.co_name != 'run_chunk':
            frame = frame.f_back
        return str(sum(('SIB' + 'LING') in s for s in frame.f_locals['sources']))
    """)
EARLIER_RESULTS = prog("""
    import sys
    def solution():
        frame = sys._getframe()
        while frame is not None and frame.f_code.co_name != 'run_codes':
            frame = frame.f_back
        return ' '.join(r['v'] for r in frame.f_locals['results'] if r['v'])
    """)
PATCHER = prog("""
    import sys
    def solution():
        frame = sys._getframe()
        while frame is not None and frame.f_code.co_name != 'run_codes':
            frame = frame.f_back
        for r in frame.f_locals['results']:
            r['v'] = '999'
        return 1
    """)


def test_an_escaped_program_reads_but_cannot_change_the_other_programs_of_its_chunk():
    """Known limit (docs/executor.md): a child is forked from the worker after the whole chunk was parsed and
    compiled, so an escaped program can read the text of every program of its chunk and the results of those
    that ran before it (here through the worker's frames; any of them could also scan memory). In RL that lets it
    copy the answers of sibling samples of its question. It cannot change them: with a child per program, the
    worker's results are not in its reach."""
    sibling = "def solution():\n    return 41  # SIBLING\n"
    with ProgramExecutor(ESCAPED) as ex:
        results = ex.run([sibling, sibling, READER, EARLIER_RESULTS, PATCHER, sibling])
    assert results[2] == ExecResult(OK, "3")  # itself not included: three siblings in its chunk
    assert results[3] == ExecResult(OK, "41 41 3")  # the answers of the programs before it
    assert [r.value for r in results] == ["41", "41", "3", "41 41 3", "1", "41"]  # nothing changed
