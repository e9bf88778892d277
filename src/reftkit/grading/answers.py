"""Reading final answers off model completions and grading them (N-CoT).

Pure functions, no torch, no I/O. Rules (each one a decision, tested in tests/test_answers.py):

* The answer lives after the LAST answer trigger ("Therefore, the answer is:"), matched
  case-insensitively with the comma and colon optional, up to the end of that line. Text after
  an earlier trigger is ignored even when the last one yields nothing.
* No trigger -> None. There is deliberately no fallback to "the last number in the text": the
  paper gives reward 0 when no answer can be extracted, and a fallback would pay a policy for
  unformatted output. So "The answer is 5" (no "Therefore") -> None.
* Numbers: the answer text must state ONE number, or nothing is read: "3 or 4", "3-4", "1 000", "2 + 3",
  "5, 6" -> None. Around it, currency, units and other words are dropped ("$5", "rs . 150", "5 dollars",
  "x = 7"), and "%" too (5% -> 5, not 0.05); words and signs that change its value or make it not one value
  are not: "√3", "4π", "2^3", "5 million", "minus 5", "about 5", "more than 5" -> None (numbers.py lists them).
  Thousands separators are commas in groups of three ("1,234,567"); a space never is ("1 000" is two
  numbers), nor a comma elsewhere ("1,5" is two). "." is always the decimal point. Fractions "a/b" and mixed
  numbers "1 1/2" (integer parts, proper fraction) are evaluated; a zero denominator, a value beyond a
  float's range, inf or nan -> None. Only ASCII digits count, and any other digit ("٣", "½") makes it None.
* Equality: integers and fractions of integers are exact and compare exactly (10**17 + 1 is not 10**17); a
  number written with a decimal point or an exponent is a float's digits, and whenever one side is, the two
  match within the tolerance, |x - y| <= 1e-2 (the paper's), computed without rounding. The canonical text
  (format_number) keeps that distinction: "3/4" but "0.75"; a whole number is "72", whichever way written.
* Multiple choice: only an option letter a-e counts ("c", "(C)", "c)", "c .", "option c",
  "c) 625"); a letter must stand alone ("a total of 5" -> None) and the option text alone
  ("625") is not matched back to a letter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

from reftkit.data.numbers import Number, clean_answer_text, format_number, parse_number
from reftkit.data.records import Example

TRIGGER = "Therefore, the answer is:"

# Comma and colon optional: the ReFT data files write "Therefore, the answer is <203>."
_TRIGGER_RE = re.compile(r"therefore,?\s*the\s+answer\s+is\s*:?", re.IGNORECASE)

# An option letter standing alone, optionally in brackets or after "option"/"choice".
_LETTER_RE = re.compile(
    r"^(?:(?:option|choice)\s*:?\s*)?[(\[]?\s*(?P<letter>[a-e])\s*(?:[)\].:,]|$)",
    re.IGNORECASE,
)

def _answer_line(completion: str) -> str | None:
    """The text after the last trigger up to the end of its line, or None without a trigger."""
    last = next(reversed(list(_TRIGGER_RE.finditer(completion))), None)
    if last is None:
        return None
    rest = completion[last.end() :].splitlines()
    return rest[0] if rest else ""


def reasoning_of(completion: str) -> str:
    """The completion before its last answer trigger (all of it when there is none)."""
    last = next(reversed(list(_TRIGGER_RE.finditer(completion))), None)
    return (completion if last is None else completion[: last.start()]).rstrip()


def extract_answer(completion: str, multiple_choice: bool = False) -> str | None:
    """Canonical answer text after the last trigger: a number string or an option letter a-e."""
    line = _answer_line(completion)
    return None if line is None else read_answer(line, multiple_choice)


def read_answer(line: str, multiple_choice: bool = False) -> str | None:
    """Canonical answer text of an answer (a trigger's line, or a program's return value)."""
    if multiple_choice:
        match = _LETTER_RE.match(clean_answer_text(line))
        return match["letter"].lower() if match else None
    value = parse_number(line)
    return None if value is None else format_number(value)


def same_answer(a: str, b: str, tol: float = 1e-2, multiple_choice: bool = False) -> bool:
    """Numeric: the same number, under `close`. Multiple choice: same letter, any case."""
    if multiple_choice:
        return a.strip().lower() == b.strip().lower()
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and close(x, y, tol)


def close(x: Number, y: Number, tol: float = 1e-2) -> bool:
    """The reward's numeric equality: exact between integers and fractions, |x - y| <= tol (1e-2 in the
    paper) where either is a float's digits."""
    if x.exact and y.exact:
        return x.value == y.value
    return abs(x.value - y.value) <= Fraction(repr(float(tol)))  # tol's decimal value: 1e-2 is exactly 1/100


def is_correct(extracted: str | None, example: Example, tol: float = 1e-2) -> bool:
    """`extracted` is the gold answer, under `same_answer`."""
    return extracted is not None and same_answer(extracted, example.answer, tol, example.is_multiple_choice)


@dataclass(frozen=True)
class Grade:
    extracted: str | None  # the answer read off the completion, canonical text, or None
    correct: bool
    detail: str = ""  # how it was graded, when there is more to say (a program's exit status)


class Grader(Protocol):
    """Grades a batch of completions; batched because program-CoT executes code in batches."""

    def grade(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Grade]: ...


class NaturalLanguageGrader:
    """N-CoT grading: extract_answer + is_correct."""

    def __init__(self, tol: float = 1e-2) -> None:
        self.tol = tol

    def grade(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Grade]:
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        grades = []
        for completion, example in zip(completions, examples, strict=True):
            extracted = extract_answer(completion, multiple_choice=example.is_multiple_choice)
            grades.append(Grade(extracted, is_correct(extracted, example, self.tol)))
        return grades


def reward_from_grade(grade: Grade, correct_reward: float = 1.0, partial_reward: float = 0.1) -> float:
    """Paper's reward: correct -> 1, answer extracted but wrong -> 0.1, nothing extracted -> 0.

    partial_reward=0.0 turns partial credit off.
    """
    if grade.correct:
        return correct_reward
    return partial_reward if grade.extracted is not None else 0.0
