"""The two chain-of-thought styles: what the model is trained to write and how its output is graded.

- natural (N-CoT): free-text reasoning, then `Therefore, the answer is: {answer}`; graded by
  reading the answer after the trigger.
- program (P-CoT): generation starts inside `def solution():\\n    \"\"\"{question}\"\"\"\\n` (the
  paper's prefix) and the model writes the body; the answer is what `solution()` returns, run in
  reftkit's sandboxed executor, never in this process.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

from reftkit.data.records import Example
from reftkit.executor.config import Status
from reftkit.grading.answers import TRIGGER, Grade, Grader, NaturalLanguageGrader, is_correct, read_answer

log = logging.getLogger("reftkit")

CotStyle = Literal["natural", "program"]

# The reference programs in the data files are whole functions; the model writes only the body.
_HEADER_RE = re.compile(r"\A\s*def solution\(\)\s*:[ \t]*\n(?:[ \t]*(?P<q>\"\"\"|''')[\s\S]*?(?P=q)[ \t]*\n)?")


def question_text(example: Example) -> str:
    """The question as the model sees it; multiple choice lists its options after it."""
    if example.options is None:
        return example.question
    letters = "abcdefghij"
    opts = " , ".join(f"{letters[i]} ) {o}" for i, o in enumerate(example.options))
    return f"{example.question}\nOptions: {opts}"


def _docstring(text: str) -> str:
    """`text` made safe inside a triple-quoted docstring (no early close, no escapes)."""
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return text[:-1] + '\\"' if text.endswith('"') else text


def program_header(question: str) -> str:
    """The generation prefix of P-CoT: the function line and the question as its docstring."""
    return f'def solution():\n    """{_docstring(question)}"""\n'


def program_body(cot: str) -> str:
    """A reference program without its `def solution():` line and docstring, if it has them."""
    return _HEADER_RE.sub("", cot, count=1)


def response_prefix(example: Example, cot: CotStyle) -> str:
    """Text after `Answer reasoning:\\n` that is part of the prompt, not generated."""
    return program_header(question_text(example)) if cot == "program" else ""


def response_text(example: Example, cot: CotStyle = "natural") -> str:
    """The SFT target (EOS is appended as a token by the caller)."""
    if cot == "program":
        body = program_body(example.cot)
        try:  # parsed, never run: catches natural-language CoT given to --cot program
            ast.parse(response_prefix(example, cot) + body)
        except SyntaxError as err:
            where = f"{example.cot_source} (item {example.id!r})" if example.cot_source else f"item {example.id!r}"
            raise ValueError(f"{where}: the reference CoT is not a Python program body, as --cot program needs: "
                             f"{err.msg} (line {err.lineno} of the function); --cot program trains on P-CoT data "
                             "such as the ReFT repository's *_python_sdp.json") from None
        return body
    return f"{example.cot}\n{TRIGGER} {example.answer}"


class ProgramGrader:
    """P-CoT grading: header + completion is executed in the sandbox; the return value is the answer.

    A program that runs and returns a number (or an option letter) has an extracted answer; one that
    fails, times out, is forbidden or returns something else has none (reward 0, as in the paper).
    """

    def __init__(self, executor, tol: float = 1e-2) -> None:
        self.executor, self.tol = executor, tol
        self.checked_first_batch = False

    def grade(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Grade]:
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        programs = [response_prefix(ex, "program") + c for c, ex in zip(completions, examples, strict=True)]
        if not self.checked_first_batch and programs:
            self.checked_first_batch = True
            warn_if_not_programs(programs, examples)
        grades = []
        for result, ex in zip(self.executor.run(programs), examples, strict=True):
            extracted = read_answer(result.value, ex.is_multiple_choice) if result.status == "ok" else None
            detail = result.status if result.status == "ok" else f"{result.status}: {result.detail}"
            grades.append(Grade(extracted, is_correct(extracted, ex, self.tol), detail))
        return grades


# "Nearly every" program of the first batch failing to parse means a model that does not write
# programs (trained on natural-language CoT), not a few broken samples.
NOT_PROGRAMS_SHARE = 0.9


def _syntax_error(program: str) -> str | None:
    """Why `program` is not valid Python, or None. Parsed, never run."""
    try:
        ast.parse(program)
    except SyntaxError as err:
        return f"{err.msg} (line {err.lineno})"
    except (ValueError, RecursionError, MemoryError) as err:  # null bytes, absurd nesting
        return type(err).__name__
    return None


def warn_if_not_programs(programs: Sequence[str], examples: Sequence[Example]) -> bool:
    """Warns (once per grader: it is called on the first batch) when nearly every program is not even
    valid Python, as when a natural-CoT model is run with --cot program: every reward and every
    accuracy would be 0 without a word. Returns whether it warned."""
    errors = [(ex, why) for ex, why in ((ex, _syntax_error(p)) for p, ex in zip(programs, examples, strict=True))
              if why is not None]
    if len(errors) < NOT_PROGRAMS_SHARE * len(programs):
        return False
    example, why = errors[0]
    log.warning("--cot program: %d of %d programs in the first graded batch are not valid Python (item %r: %s), "
                "so they earn no reward and count as wrong. Check that the model was trained on program CoT "
                "(SFT with --cot program on P-CoT data), not natural-language CoT, and that max_length leaves "
                "room for a whole program", len(errors), len(programs), example.id, why)
    return True


# Per-status counts of graded programs, as metrics name them: programs_ok, programs_timeout, ...
STATUS_KEYS = tuple(f"programs_{s}" for s in Status)
# The statuses that are the sandbox's own limits, not the program's doing, and the option that sets each.
_LIMIT_OPTIONS = {Status.TIMEOUT: "exec_timeout", Status.MEMORY: "exec_memory_mb"}
# A share of programs stopped by a limit at which the limit, not the model, may be what is measured.
LIMITED_SHARE = 0.05


def status_counts(details: Iterable[str]) -> dict[str, int]:
    """{programs_<status>: count} over program grades' details ("ok", "timeout: ..."; ProgramGrader),
    every status present; {} for no details (natural CoT has none)."""
    counts = dict.fromkeys(STATUS_KEYS, 0)
    seen = False
    for detail in details:
        counts[f"programs_{detail.partition(':')[0]}"] += 1
        seen = True
    return counts if seen else {}


def warn_if_sandbox_limited(counts: Mapping[str, int], cfg, where: str) -> bool:
    """Warns when at least LIMITED_SHARE of the programs counted (`status_counts`) were stopped by
    the sandbox's time or memory limit (cfg: its exec_* options): those count as wrong, so accuracy
    and reward then measure the limit. Returns whether it warned."""
    total = sum(counts.get(key, 0) for key in STATUS_KEYS)  # counts may hold other read-outs too
    hit = {status: counts.get(f"programs_{status}", 0) for status in _LIMIT_OPTIONS}
    if not total or sum(hit.values()) < LIMITED_SHARE * total:
        return False
    parts = ", ".join(f"{n} {status} (--{_LIMIT_OPTIONS[status]} {getattr(cfg, _LIMIT_OPTIONS[status])})"
                      for status, n in hit.items() if n)
    log.warning("%s: %d of %d programs were stopped by the sandbox's limits: %s. They count as wrong (reward 0); "
                "raise the limit if the programs are meant to need more", where, sum(hit.values()), total, parts)
    return True


@contextmanager
def open_grader(cfg) -> Iterator[Grader]:
    """The grader of `cfg.cot`; for programs, a sandboxed executor runs for as long as it is open."""
    if cfg.cot == "natural":
        yield NaturalLanguageGrader()
        return
    from reftkit.executor import ProgramExecutor

    with ProgramExecutor(cfg.executor_config()) as executor:
        yield ProgramGrader(executor)
