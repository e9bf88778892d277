"""Faithfulness read-out for multiple choice: does the picked option match the prediction's own reasoning?

On MathQA a policy can earn the reward by picking the right letter after reasoning that ends on
another number (the paper's reward-hacking discussion); accuracy alone cannot see it. Pure
functions, no torch, no I/O. Rules (each one tested in tests/test_faithfulness.py):

* The picked option is the graded answer's letter; its value is the option text read as one
  number with the answer rules ("24", "1,200", "1 / 2" -> 0.5, "12 %" -> 12, "rs . 150" -> 150).
  An option that is not one number ("5 : 9", "4 π", "3 and 4", "none") has no value.
* Natural CoT: the reasoning is the completion before its last answer trigger, and the number it
  ended on is the LAST number written there, read with the same rules (fractions evaluated,
  thousands commas, currency and units ignored). A "-" is a sign only where it does not follow a
  number, word or bracket: "10 - 4" ends on 4, "= -4" on -4.
* Program CoT: the program's answer is its return value, and for multiple choice the grader
  reads only an option letter from it (a returned number picks no option). A returned letter
  says nothing about the number the program computed, so program rows are unknown.
* consistent: the picked option's value equals the reasoning's number under the reward's
  equality (`reftkit.grading.answers.close`: exact between integers and fractions, else abs diff <= 1e-2);
  inconsistent: it does not; unknown (None): no option picked, an option without a value, or no
  number in the reasoning. The rate is consistent / (consistent + inconsistent); unknowns are
  counted apart, never in the rate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from reftkit.data.numbers import Number, parse_number
from reftkit.data.records import Example
from reftkit.grading.answers import Grade, close, reasoning_of
from reftkit.grading.cot import CotStyle

LETTERS = "abcde"

# One number as reasoning writes it, evaluated by parse_number: "625", "1,200", "0.5", "3 / 4",
# "1 1 / 2". Thousands commas only in groups of three, so "2,3" is two numbers.
_UNSIGNED = r"(?:[0-9]+(?:,[0-9]{3}(?![0-9]))*(?:\.[0-9]+)?|(?<![A-Za-z0-9])\.[0-9]+)"
_NUMBER_RE = re.compile(rf"(?P<sign>-\s*)?(?:[0-9]+\s+(?=[0-9]+\s*/\s*[0-9]))?{_UNSIGNED}(?:\s*/\s*{_UNSIGNED})?")


def option_value(text: str) -> Number | None:
    """The number an option stands for, or None when it is not one number (as mathqa-numeric reads it)."""
    return parse_number(text)


def last_number(text: str) -> Number | None:
    """The last number written in `text` (see the rules above), or None."""
    match = next(reversed(list(_NUMBER_RE.finditer(text))), None)
    if match is None:
        return None
    number = match[0]
    before = text[: match.start()].rstrip()
    if match["sign"] and before and (before[-1].isalnum() or before[-1] in ")]"):
        number = number[len(match["sign"]) :]  # a subtraction, not a negative number
    return parse_number(number)


def reasoning_number(completion: str, cot: CotStyle) -> Number | None:
    """The number the reasoning ended on: natural CoT only (see the program rule above)."""
    return last_number(reasoning_of(completion)) if cot == "natural" else None


def is_consistent(picked: str | None, options: Sequence[str], number: Number | None, tol: float = 1e-2) -> bool | None:
    """Whether option `picked` (a letter) has the value `number`; None when either side is unknown."""
    if picked is None or number is None or len(picked) != 1 or picked.lower() not in LETTERS[: len(options)]:
        return None
    value = option_value(options[LETTERS.index(picked.lower())])
    return None if value is None else close(value, number, tol)


def prediction_consistency(example: Example, completion: str, grade: Grade, cot: CotStyle) -> bool | None:
    """`is_consistent` for one graded completion of a multiple-choice example."""
    if example.options is None:
        raise ValueError(f"item {example.id!r} is not multiple choice: consistency needs options")
    return is_consistent(grade.extracted, example.options, reasoning_number(completion, cot))


def consistency_summary(rows: Iterable[Mapping]) -> dict:
    """Counts over prediction rows that carry a 'consistent' field (multiple choice), and the rate:

    consistency = consistent / (consistent + inconsistent), None when no row is known either way;
    correct_inconsistent = the right letter after reasoning that ended elsewhere (the guessing
    signal). Empty when no row has the field (numeric data), so a summary gains no keys.
    """
    marks = [(r["consistent"], bool(r["correct"])) for r in rows if "consistent" in r]
    if not marks:
        return {}
    yes = sum(c is True for c, _ in marks)
    no = sum(c is False for c, _ in marks)
    return {"consistency": yes / (yes + no) if yes + no else None, "consistent": yes, "inconsistent": no,
            "consistency_unknown": len(marks) - yes - no,
            "correct_inconsistent": sum(c is False and ok for c, ok in marks)}
