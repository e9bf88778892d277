"""Numbers as answers write them: reading the first number of a short text, and one canonical text.

Shared by the readers (gold answers) and reftkit.answers (model answers); imports nothing of
reftkit, so neither depends on the other. The rules are listed in reftkit.answers.
"""

from __future__ import annotations

import math
import re

# Light cleanup shared by numbers and option letters: models and datasets wrap answers in markup.
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")  # \frac{3}{4} -> 3/4
_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+")  # \boxed, \text, \left ... (arguments are kept)
_MARKUP = str.maketrans({c: None for c in "\\{}$*<>`"} | {"\u2212": "-", "\u2013": "-"})
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")

# One unsigned number: "72", "3.", "0.25", ".5", "1e-05" (format_number's output for tiny
# values). A leading-dot decimal must not follow a letter, so "rs.150" is 150, not 0.15.
_UNSIGNED = r"(?:[0-9]+(?:\.[0-9]*)?|(?<![A-Za-z])\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_NUMBER_RE = re.compile(
    r"(?P<neg>-\s*)?"
    r"(?:(?P<whole>[0-9]+)\s+(?=[0-9]+\s*/))?"  # whole part of a mixed number "1 1/2"
    rf"(?P<num>{_UNSIGNED})"
    rf"(?:\s*/\s*(?P<den>{_UNSIGNED}))?"
)

_DECIMALS = 10  # canonical text keeps this many decimals: short, and far below any tolerance


def clean_answer_text(text: str) -> str:
    """`text` without LaTeX commands, markup characters and thousands commas; \\frac{a}{b} -> a/b."""
    text = _FRAC_RE.sub(r"\1/\2", text)
    text = _LATEX_CMD_RE.sub("", text).translate(_MARKUP)
    return _THOUSANDS_RE.sub("", text).strip()


def parse_number(text: str) -> float | None:
    """The first number in a short answer string, or None (see reftkit.answers). Never raises."""
    match = _NUMBER_RE.search(clean_answer_text(text))
    if match is None:
        return None
    value = float(match["num"])
    if match["den"] is not None:
        den = float(match["den"])
        if den == 0:
            return None
        whole = match["whole"]
        if whole is not None and not (match["num"].isdigit() and match["den"].isdigit() and value < den):
            value = float(whole)  # "10 20/4" is not a mixed number: keep the first number only
        else:
            value = value / den + (float(whole) if whole is not None else 0.0)
    if match["neg"] is not None:
        value = -value
    return value if math.isfinite(value) else None


def format_number(x: float) -> str:
    """Canonical text of a finite number: "72", "0.75", "-3", "0.00001" (no exponent)."""
    text = f"{x:.{_DECIMALS}f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text
