"""The two chain-of-thought styles: what the model is trained to write and how its output is graded.

- natural (N-CoT): free-text reasoning, then `Therefore, the answer is: {answer}`; graded by
  reading the answer after the trigger.
- program (P-CoT): generation starts inside `def solution():\\n    \"\"\"{question}\"\"\"\\n` (the
  paper's prefix) and the model writes the body; the answer is what `solution()` returns, run in
  reftkit's sandboxed executor, never in this process.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

from reftkit.answers import TRIGGER, Grade, Grader, NaturalLanguageGrader, is_correct, read_answer
from reftkit.data.records import Example

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
            raise ValueError(f"item {example.id!r}: field cot (answer_cot) is not a Python program body, as "
                             f"--cot program needs: {err.msg} (line {err.lineno} of the function)") from None
        return body
    return f"{example.cot}\n{TRIGGER} {example.answer}"


class ProgramGrader:
    """P-CoT grading: header + completion is executed in the sandbox; the return value is the answer.

    A program that runs and returns a number (or an option letter) has an extracted answer; one that
    fails, times out, is forbidden or returns something else has none (reward 0, as in the paper).
    """

    def __init__(self, executor, tol: float = 1e-2) -> None:
        self.executor, self.tol = executor, tol

    def grade(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Grade]:
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        programs = [response_prefix(ex, "program") + c for c, ex in zip(completions, examples, strict=True)]
        grades = []
        for result, ex in zip(self.executor.run(programs), examples, strict=True):
            extracted = read_answer(result.value, ex.is_multiple_choice) if result.status == "ok" else None
            detail = result.status if result.status == "ok" else f"{result.status}: {result.detail}"
            grades.append(Grade(extracted, is_correct(extracted, ex, self.tol), detail))
        return grades


@contextmanager
def open_grader(cfg) -> Iterator[Grader]:
    """The grader of `cfg.cot`; for programs, a sandboxed executor runs for as long as it is open."""
    if cfg.cot == "natural":
        yield NaturalLanguageGrader()
        return
    from reftkit.executor import ExecutorConfig, ProgramExecutor

    limits = ExecutorConfig(workers=cfg.exec_workers, timeout_s=cfg.exec_timeout, memory_mb=cfg.exec_memory_mb,
                            programs_per_child=cfg.exec_programs_per_child)
    with ProgramExecutor(limits) as executor:
        yield ProgramGrader(executor)
