"""Numbers as answers write them: the one number of a short answer text, read exactly, and one canonical text.

Shared by the readers (gold answers), reftkit.grading.answers (model answers) and reftkit.grading.faithfulness; imports
nothing of reftkit, so neither depends on the other. The rules are listed in reftkit.grading.answers.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from fractions import Fraction

# Light cleanup shared by numbers and option letters: models and datasets wrap answers in markup. Markup
# becomes a space, never nothing, so "2*3" stays two numbers; braces go ("1{,}234" is LaTeX for 1,234).
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")  # \frac{3}{4} -> 3/4
_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+")  # \boxed, \text, \left ... (arguments are kept)
_MARKUP = str.maketrans({c: " " for c in "\\$*<>`"} | {"{": None, "}": None, "\u2212": "-", "\u2013": "-"})

# One unsigned number: "72", "1,234" (commas only in groups of three), "3.", "0.25", ".5", "1e-05" (a float's
# repr). A leading-dot decimal must not follow a letter, so "rs.150" is 150, not 0.15.
_UNSIGNED = r"(?:(?:[0-9]{1,3}(?:,[0-9]{3}(?![0-9]))+|[0-9]+)(?:\.[0-9]*)?|(?<![A-Za-z])\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_NUMBER_RE = re.compile(
    r"(?P<sign>[-+]\s*)?"
    r"(?:(?P<whole>[0-9]+)\s+(?=[0-9]+\s*/\s*[0-9]))?"  # whole part of a mixed number "1 1/2"
    rf"(?P<num>{_UNSIGNED})"
    rf"(?:\s*/\s*(?P<den>{_UNSIGNED}))?"
)
# Beside one number, these change its value or say it is not one value: "√3", "4π", "2^3", "5!", "5 million",
# "3 or 4", "minus 5", "about 5", "more than 5". Units, currency and other words are allowed ("5 dollars",
# "5 more apples", "5 times", "5 quarters").
_NOT_ONE_VALUE = re.compile(
    r"[√∛∜π^!×÷±∞≈~]|\b(?:or|and|plus|minus|negative|divided|squared|cubed|sqrt|root|pi|power"
    r"|hundreds?|thousands?|millions?|billions?|trillions?|lakhs?|crores?|k|mn|bn"
    r"|about|approx|approximately|around|roughly|nearly|almost|between"
    r"|(?:more|less|fewer|greater|smaller)\s+than|at\s+(?:least|most))\b",
    re.IGNORECASE,
)
_LONGEST = 1000  # characters of one number: far more than any float or answer has; bounds int() and Fraction()
_LARGEST = Fraction(sys.float_info.max)  # beyond a float's range is no answer (as inf is not)

_DECIMALS = 10  # canonical text keeps this many decimals: short, and far below any tolerance


@dataclass(frozen=True)
class Number:
    """A number as written: its exact value, and whether it was written exactly (an integer or a fraction of
    integers) or as a float's digits (decimals or an exponent: "0.5", "2.0", "1e-05"), which are compared
    within a tolerance."""

    value: Fraction
    exact: bool

    def __float__(self) -> float:
        return float(self.value)


def clean_answer_text(text: str) -> str:
    """`text` without LaTeX commands and markup characters; \\frac{a}{b} -> a/b."""
    text = _FRAC_RE.sub(r"\1/\2", text)
    return _LATEX_CMD_RE.sub(" ", text).translate(_MARKUP).strip()


def parse_number(text: str) -> Number | None:
    """The number a short answer text states, or None when it states none or more than one (see
    reftkit.grading.answers for the rules). Never raises."""
    cleaned = clean_answer_text(text)
    found = _NUMBER_RE.finditer(cleaned)
    match = next(found, None)
    if match is None or next(found, None) is not None:
        return None
    before, after = cleaned[: match.start()].rstrip(), cleaned[match.end() :].lstrip()
    if before.endswith("/") or after.startswith("/"):  # "5 / x", "x/5"; units such as "km/h" are fine
        return None
    rest = f"{before} {after}"
    if _NOT_ONE_VALUE.search(rest) or any(c.isnumeric() for c in rest):  # "٣", "½": digits we do not read
        return None
    return _number(match)


def _number(match: re.Match[str]) -> Number | None:
    num = _decimal(match["num"])
    den = _decimal(match["den"]) if match["den"] is not None else (Fraction(1), True)
    if num is None or den is None or den[0] == 0:
        return None
    value, exact = num[0] / den[0], num[1] and den[1]
    if match["whole"] is not None:
        if not (exact and num[0] < den[0]):  # "10 20/4" is two numbers, not a mixed number
            return None
        value += int(match["whole"])
    if match["sign"] is not None and match["sign"][0] == "-":
        value = -value
    return Number(value, exact) if abs(value) <= _LARGEST else None


def _decimal(text: str) -> tuple[Fraction, bool] | None:
    """(exact value, written without decimals or exponent) of one unsigned number, None past a float's range."""
    text = text.replace(",", "")
    if len(text) > _LONGEST:
        return None
    mantissa, _, exponent = text.lower().partition("e")
    if exponent and abs(int(exponent)) > 400:  # beyond any float: never build 10**huge
        value = float(text)
        return (Fraction(value), False) if value != float("inf") else None
    return Fraction(text), not exponent and not mantissa.partition(".")[2]  # "72." ends a sentence: exact


def number_of(value: int | float | Fraction) -> Number | None:
    """A number given as a value (a JSON number): ints and Fractions exactly, floats by their repr's digits."""
    if isinstance(value, float):
        return parse_number(float.__repr__(value))
    value = Fraction(value)
    return Number(value, True) if abs(value) <= _LARGEST else None


def format_number(number: Number) -> str:
    """Canonical text: an integer as itself ("72", "-3", "100000000000000001"), any other exact value as a
    reduced fraction ("3/4"), a float's digits to _DECIMALS decimals ("0.75", "0.3333333333", "0.00001").
    Reading the text back gives the same number, integers and fractions exactly."""
    value = number.value
    if not number.exact:
        value = Fraction(round(value * 10**_DECIMALS), 10**_DECIMALS)
        if value.denominator != 1:
            whole, part = divmod(abs(value.numerator), value.denominator)
            digits = f"{part * 10**_DECIMALS // value.denominator:0{_DECIMALS}d}".rstrip("0")
            return f"{'-' if value < 0 else ''}{whole}.{digits}"
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
