"""Answer extraction and grading: odd model outputs, tolerance edges, rewards, properties."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from reftkit.data.numbers import number_of
from reftkit.data.records import Example
from reftkit.grading.answers import (
    TRIGGER,
    Grade,
    Grader,
    NaturalLanguageGrader,
    extract_answer,
    format_number,
    is_correct,
    parse_number,
    read_answer,
    reward_from_grade,
)
from reftkit.grading.cot import ProgramGrader


def numeric(answer: str) -> Example:
    return Example(id="n", question="q?", cot="", answer=answer)


def choice(answer: str) -> Example:
    return Example(id="m", question="q?", cot="", answer=answer, options=("24", "120", "625", "720", "5"))


# ---------------------------------------------------------------- parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("72", 72.0),
        ("  72  ", 72.0),
        ("1,234", 1234.0),
        ("1,234,567", 1234567.0),
        ("$5", 5.0),
        ("$ 5", 5.0),
        ("5 dollars", 5.0),
        ("rs . 150", 150.0),
        ("rs.150", 150.0),  # not 0.15: a leading-dot decimal never follows a letter
        ("Rs. 1,500.75", 1500.75),
        ("5 %", 5.0),  # percent is dropped, not divided by 100
        ("5%", 5.0),
        ("-3", -3.0),
        ("\u2212 3", -3.0),  # unicode minus
        ("\u22123", -3.0),
        ("\u20133", -3.0),  # en dash used as a minus
        ("- 3", -3.0),
        ("+3", 3.0),
        (".5", 0.5),
        ("3.", 3.0),
        ("0.25", 0.25),
        ("72.", 72.0),
        ("3.5.", 3.5),
        ("3/4", 0.75),
        ("3 / 4", 0.75),
        ("-3/4", -0.75),
        ("\u2212 3 / 4", -0.75),
        ("1 1/2", 1.5),  # mixed number
        ("-1 1/2", -1.5),
        ("10 20/4", None),  # improper "fraction part": not a mixed number, so two numbers
        ("1.5/3", 0.5),
        ("<203>", 203.0),
        ("<203>.", 203.0),
        ("**72**", 72.0),
        ("\\boxed{72}", 72.0),
        ("$\\boxed{-3}$", -3.0),
        ("\\frac{3}{4}", 0.75),
        ("\\dfrac{-3}{4}", -0.75),
        ("1{,}234", 1234.0),  # LaTeX thousands separator
        ("\\$1,234.50.", 1234.5),
        ("$1,234.50.", 1234.5),
        ("`42`", 42.0),
        ("x = 7", 7.0),
        ("1e-05", 1e-05),  # a float's repr: format_number never writes exponents
        ("1e+17", 1e17),
        ("1,2345", None),  # not a thousands separator, so two numbers
        ("٣", None),  # only ASCII digits count
    ],
)
def test_parse_number(text: str, expected: float | None) -> None:
    got = parse_number(text)
    if expected is None:
        assert got is None
    else:
        assert float(got) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "no number here", ".", "-", "$", "%", "3/0", "-5 / 0", "1 1/0"]
    + ["1e999", "9" * 400, "inf", "nan", "\\boxed{}"],
)
def test_parse_number_none(text: str) -> None:
    assert parse_number(text) is None


def test_parse_number_is_finite_for_huge_fraction() -> None:
    assert parse_number("1e300/1e-300") is None  # overflows to inf


# ---------------------------------------------------------------- format_number


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (72.0, "72"),
        (-3.0, "-3"),
        (0.75, "0.75"),
        (-0.0, "0"),
        (1e-5, "0.00001"),
        (1 / 3, "0.3333333333"),
        (1e20, "100000000000000000000"),
        (-1e-12, "0"),
    ],
)
def test_format_number(x: float, expected: str) -> None:
    assert format_number(number_of(x)) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(10**17 + 1, "100000000000000001"), (-(10**20), "-100000000000000000000"), (Fraction(6, 8), "3/4"),
     (Fraction(-1, 3), "-1/3"), (Fraction(4, 2), "2")],
)
def test_format_number_keeps_exact_values_exact(value, expected: str) -> None:
    assert format_number(number_of(value)) == expected
    assert parse_number(expected) == number_of(value)  # the canonical text reads back as the same number


# ---------------------------------------------------------------- extract_answer (numeric)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (f"Step 1...\n{TRIGGER} 72", "72"),
        (f"{TRIGGER} 72", "72"),
        ("So 2 + 3.\nTherefore, the answer is <203>.", "203"),  # ReFT data file format
        ("therefore, the answer is: 5", "5"),
        ("THEREFORE, THE ANSWER IS: 5", "5"),
        ("Therefore the answer is 5", "5"),  # comma and colon optional
        ("Therefore,  the   answer  is :  5", "5"),
        (f"{TRIGGER} $1,234.50.", "1234.5"),
        (f"{TRIGGER} 72.", "72"),  # sentence-final period
        (f"{TRIGGER} 0.5.", "0.5"),
        (f"{TRIGGER} -3/4", "-3/4"),
        (f"{TRIGGER} \u2212 3 / 4.", "-3/4"),
        (f"{TRIGGER} -0.75", "-0.75"),
        (f"{TRIGGER} 5%", "5"),
        (f"{TRIGGER} rs . 150", "150"),
        (f"{TRIGGER} **\\boxed{{72}}**", "72"),
        (f"{TRIGGER} 1 1/2 cups", "3/2"),
        (f"{TRIGGER} 3/0", None),
        # multiple triggers: the last one wins
        (f"{TRIGGER} 1\n{TRIGGER} 2\n{TRIGGER} 3", "3"),
        (f"{TRIGGER} 1\nwait, recompute\n{TRIGGER} 2", "2"),
        (f"{TRIGGER} 1\n{TRIGGER} nothing", None),  # last trigger decides, even when empty
        # garbage after the trigger
        (f"{TRIGGER} 12 apples and 99 pears\ngarbage 77 Therefore, the answer", None),  # not one number
        (f"{TRIGGER} 12 apples\n\n\nmore garbage 99 <eos>", "12"),
        (f"blah\n{TRIGGER} 42 blah {TRIGGER} 43", "43"),  # two triggers on one line
        # the answer must be on the trigger's line
        (f"{TRIGGER}", None),
        (f"blah {TRIGGER}   ", None),
        (f"{TRIGGER}\n72", None),
        (f"{TRIGGER} twelve apples", None),
        (f"{TRIGGER} unknown.", None),
        # no trigger, no fallback to the last number
        ("The answer is 5", None),
        ("The answer is: 5", None),
        ("5 + 5 = 10. So 10", None),
        ("", None),
        ("Therefore 5", None),
        ("Thereforethe answeris 5", None),
        # unicode around the answer
        (f"Größe: 3 × 4 = 12 🎉\n{TRIGGER} 12 🍎", "12"),
        (f"{TRIGGER} \u00a012\u00a0", "12"),  # non-breaking spaces
        (f"{TRIGGER} ٣", None),
        ("72Therefore, the answer is: 7", "7"),  # no word boundary needed before the trigger
    ],
)
def test_extract_numeric(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


def test_extract_very_long_completion() -> None:
    body = "Let me think. 12345 apples. " * 20_000
    assert extract_answer(body + f"\n{TRIGGER} 1,000,000.") == "1000000"
    assert extract_answer(body) is None
    assert extract_answer(f"{TRIGGER} " + "9" * 100_000) is None  # overflows to inf
    assert extract_answer(f"{TRIGGER} " + " " * 100_000 + "7") == "7"


def test_extract_handles_windows_newlines() -> None:
    assert extract_answer(f"x\r\n{TRIGGER} 8\r\nmore 9") == "8"


# ---------------------------------------------------------------- extract_answer (multiple choice)


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        ("c", "c"),
        ("C", "c"),
        ("(c)", "c"),
        ("(C)", "c"),
        ("c)", "c"),
        ("c .", "c"),
        ("c.", "c"),
        ("option c", "c"),
        ("Option (C)", "c"),
        ("choice: d", "d"),
        ("c) 625", "c"),
        ("(e) 5 hours.", "e"),
        ("[b]", "b"),
        ("**a**", "a"),
        ("<d>", "d"),
        ("\\boxed{B}", "b"),
        ("  a  ", "a"),
        ("f", None),  # only a-e exist
        ("(f)", None),
        ("625", None),  # option text alone is not matched back to a letter
        ("a total of 5", None),  # a letter must stand alone
        ("cats", None),
        ("", None),
    ],
)
def test_extract_multiple_choice(after: str, expected: str | None) -> None:
    assert extract_answer(f"reasoning\n{TRIGGER} {after}", multiple_choice=True) == expected


def test_extract_multiple_choice_needs_trigger_and_takes_last() -> None:
    assert extract_answer("The answer is c", multiple_choice=True) is None
    assert extract_answer(f"{TRIGGER} a\n{TRIGGER} (d)", multiple_choice=True) == "d"
    assert extract_answer("Therefore, the answer is <c>.", multiple_choice=True) == "c"


# ---------------------------------------------------------------- is_correct


@pytest.mark.parametrize(
    ("extracted", "gold", "expected"),
    [
        ("72", "72", True),
        ("72", "72.0", True),
        ("5.009", "5", True),  # 0.009 off
        ("4.991", "5", True),
        ("5.011", "5", False),  # 0.011 off
        ("4.989", "5", False),
        ("1.01", "1", True),  # exactly tol off counts, despite float rounding
        ("-3", "3", False),
        ("0.75", "3/4", True),
        ("1234", "1,234", True),
        (None, "72", False),
        ("abc", "72", False),
    ],
)
def test_is_correct_numeric(extracted: str | None, gold: str, expected: bool) -> None:
    assert is_correct(extracted, numeric(gold)) is expected


# Not one number: each is no answer (reward 0), never its first number ("1 000" once read as 1, "3-4" as 3).
NOT_ONE_NUMBER = [
    "3 or 4", "3-4", "3 - 4", "3\u20134", "3 to 4", "1 000", "1\u00a0000", "1,5", "1,00,000", "1,0000", "2 + 3", "2*3",
    "5, 6", "5 or six", "12 apples and 99 pears", "3/4/5", "1.5.2", "10 20/4", "3:4", "√3", "4π", "4 pi", "2^3",
    "5!", "5²", "5½", "5 million", "5k", "3 thousand", "minus 5", "negative 5", "about 5", "more than 5",
    "at least 5", "5 / x", "x/5", "5 and a half", "5 ± 1", "~5",
]


@pytest.mark.parametrize("text", NOT_ONE_NUMBER)
def test_text_that_is_not_one_number_reads_as_no_number(text: str) -> None:
    assert parse_number(text) is None
    assert extract_answer(f"reasoning\n{TRIGGER} {text}") is None
    assert read_answer(text) is None  # a program that returns this string has no answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5 more apples", "5"), ("5 times", "5"), ("5 quarters", "5"), ("5 km/h", "5"), ("50 km / hr", "50"),
     ("the total is 5 apples.", "5"), ("(5)", "5"), ("5th", "5"), ("$ 1,000", "1000")],
)
def test_one_number_among_words_is_read(text: str, expected: str) -> None:
    assert extract_answer(f"reasoning\n{TRIGGER} {text}") == expected


def test_exact_values_compare_exactly_and_floats_within_the_tolerance() -> None:
    big = numeric("100000000000000000")
    assert not is_correct("100000000000000001", big)  # integers: exact, whatever their size
    assert is_correct("100000000000000000", big)
    assert not is_correct("1000001/1000000", numeric("1"))  # fractions: exact
    assert is_correct("2/4", numeric("1/2")) and is_correct("1/3", numeric("0.33"))  # a decimal: within 1e-2
    assert is_correct("0.3333333333", numeric("1/3")) and not is_correct("0.32", numeric("1/3"))
    assert not is_correct("100000000000000000.5", big)  # a float's digits: still exactly 0.5 off, > 1e-2


class _Returns:
    """A stand-in executor whose programs all return the given answer texts (as the sandbox reports them)."""

    def __init__(self, *values: str) -> None:
        self.values = values

    def run(self, programs):
        from reftkit.executor import ExecResult, Status

        return [ExecResult(Status.OK, value) for value in self.values]


def test_program_answers_are_read_as_one_number_and_compared_exactly() -> None:
    examples = [numeric("5"), numeric("100000000000000000"), numeric("5"), numeric("0.5"), numeric("3/4")]
    returned = _Returns("5 or 6", repr(10**17 + 1), "5", repr(0.1 + 0.4), "Fraction(3, 4)")
    grades = ProgramGrader(returned).grade(["    return x\n"] * len(examples), examples)
    assert [(g.extracted, g.correct) for g in grades] == [
        (None, False), ("100000000000000001", False), ("5", True), ("0.5", True), (None, False)]


def test_is_correct_custom_tol() -> None:
    assert is_correct("5.4", numeric("5"), tol=0.5)
    assert not is_correct("5.009", numeric("5"), tol=1e-3)


@pytest.mark.parametrize(
    ("extracted", "gold", "expected"),
    [
        ("c", "c", True),
        ("C", "c", True),
        ("c", "C", True),
        ("d", "c", False),
        (None, "c", False),
        ("625", "c", False),
    ],
)
def test_is_correct_multiple_choice(extracted: str | None, gold: str, expected: bool) -> None:
    assert is_correct(extracted, choice(gold)) is expected


# ---------------------------------------------------------------- graders and rewards


def test_natural_language_grader() -> None:
    grader: Grader = NaturalLanguageGrader()
    examples = [numeric("72"), numeric("72"), numeric("72"), choice("c"), choice("c")]
    completions = [
        f"... {TRIGGER} 72",
        f"... {TRIGGER} 71",
        "... so 72",
        f"... {TRIGGER} (C) 625",
        f"... {TRIGGER} 625",
    ]
    assert grader.grade(completions, examples) == [
        Grade("72", True),
        Grade("71", False),
        Grade(None, False),
        Grade("c", True),
        Grade(None, False),
    ]


def test_natural_language_grader_tol_and_length_check() -> None:
    assert NaturalLanguageGrader(tol=2.0).grade([f"{TRIGGER} 71.5"], [numeric("72")]) == [Grade("71.5", True)]
    assert NaturalLanguageGrader(tol=2.0).grade([f"{TRIGGER} 71"], [numeric("72")]) == [Grade("71", False)]  # exact
    assert NaturalLanguageGrader().grade([], []) == []
    with pytest.raises(ValueError):
        NaturalLanguageGrader().grade(["a", "b"], [numeric("1")])


def test_reward_from_grade() -> None:
    assert reward_from_grade(Grade("72", True)) == 1.0
    assert reward_from_grade(Grade("71", False)) == 0.1
    assert reward_from_grade(Grade(None, False)) == 0.0
    # partial credit off
    assert reward_from_grade(Grade("71", False), partial_reward=0.0) == 0.0
    assert reward_from_grade(Grade("72", True), partial_reward=0.0) == 1.0
    assert reward_from_grade(Grade("72", True), correct_reward=2.0) == 2.0


# ---------------------------------------------------------------- properties

sane_floats = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False).map(
    lambda x: round(x, 4)
).filter(lambda x: abs(x) < 1e9)

FORMATS = [
    lambda x: f"{x}",
    lambda x: f"{x:.4f}",
    lambda x: f"{x:,.4f}",
    lambda x: f"${x}",
    lambda x: f"{x}.",
    lambda x: f"<{x}>.",
    lambda x: f"**{x}** dollars",
]


@given(sane_floats, st.sampled_from(FORMATS))
def test_roundtrip_floats(x: float, fmt) -> None:
    got = extract_answer(f"blah\n{TRIGGER} {fmt(x)}")
    assert got is not None
    assert float(got) == pytest.approx(x, abs=1e-6)


@given(st.integers(min_value=-(10**9) + 1, max_value=10**9 - 1))
def test_roundtrip_ints_with_commas(n: int) -> None:
    assert extract_answer(f"blah\n{TRIGGER} {n:,}") == str(n)
    assert extract_answer(f"blah\n{TRIGGER} ${n:,}.") == str(n)


@given(st.text())
def test_never_raises(text: str) -> None:
    value = parse_number(text)
    assert value is None or math.isfinite(float(value))
    for multiple_choice in (False, True):
        got = extract_answer(text, multiple_choice)
        got_with_trigger = extract_answer(f"{TRIGGER} {text}", multiple_choice)
        if multiple_choice:
            assert got_with_trigger is None or got_with_trigger in "abcde"
        else:
            assert got_with_trigger is None or parse_number(got_with_trigger) is not None
        assert got is None or isinstance(got, str)


# Prefixes mix arbitrary text with near-misses of the trigger, so the property is not vacuous.
NEAR_MISSES = ["Therefore,", "Therefore, the answer", "the answer is: 9", "The answer is 5", "answer is:"]
NEAR_MISSES += ["\n", " 12 ", "<eos>"]
prefixes = st.lists(st.text() | st.sampled_from(NEAR_MISSES), max_size=8).map("".join)


ANSWERS = ["72", "-0.75", "$1,234.50.", "<203>.", "nothing", "", "(c) 625", "f"]


@given(prefixes, st.sampled_from(ANSWERS), st.booleans())
def test_prefix_does_not_matter(prefix: str, answer: str, multiple_choice: bool) -> None:
    # The prefix holds no trigger: any trigger in it would read the appended "1" once lines are joined.
    assume(extract_answer(" ".join(prefix.splitlines()) + " 1") is None)
    tail = f"{TRIGGER} {answer}\nsome trailing text 99"
    assert extract_answer(prefix + "\n" + tail, multiple_choice) == extract_answer(tail, multiple_choice)
    assert extract_answer(prefix + tail, multiple_choice) == extract_answer(tail, multiple_choice)


@settings(max_examples=50)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1000, max_size=5000))
def test_never_raises_long_text(text: str) -> None:
    parse_number(text)
    extract_answer(text + TRIGGER + text)
