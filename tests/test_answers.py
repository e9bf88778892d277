"""Answer extraction and grading: odd model outputs, tolerance edges, rewards, properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from reftkit.answers import (
    TRIGGER,
    Grade,
    Grader,
    NaturalLanguageGrader,
    extract_answer,
    format_number,
    is_correct,
    parse_number,
    reward_from_grade,
)
from reftkit.data.records import Example


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
        ("10 20/4", 10.0),  # improper "fraction part": not a mixed number, first number wins
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
        ("3 or 4", 3.0),  # ambiguous: the first number wins
        ("x = 7", 7.0),
        ("1e-05", 1e-05),  # format_number never writes exponents, but parsing them is harmless
        ("1,2345", 1.0),  # not a thousands separator: the comma ends the number
        ("٣", None),  # only ASCII digits count
    ],
)
def test_parse_number(text: str, expected: float | None) -> None:
    got = parse_number(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


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
    assert format_number(x) == expected


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
        (f"{TRIGGER} -3/4", "-0.75"),
        (f"{TRIGGER} \u2212 3 / 4.", "-0.75"),
        (f"{TRIGGER} 5%", "5"),
        (f"{TRIGGER} rs . 150", "150"),
        (f"{TRIGGER} **\\boxed{{72}}**", "72"),
        (f"{TRIGGER} 1 1/2 cups", "1.5"),
        (f"{TRIGGER} 3/0", None),
        # multiple triggers: the last one wins
        (f"{TRIGGER} 1\n{TRIGGER} 2\n{TRIGGER} 3", "3"),
        (f"{TRIGGER} 1\nwait, recompute\n{TRIGGER} 2", "2"),
        (f"{TRIGGER} 1\n{TRIGGER} nothing", None),  # last trigger decides, even when empty
        # garbage after the trigger
        (f"{TRIGGER} 12 apples and 99 pears\ngarbage 77 Therefore, the answer", "12"),
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
    assert NaturalLanguageGrader(tol=2.0).grade([f"{TRIGGER} 71"], [numeric("72")]) == [Grade("71", True)]
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
    assert value is None or math.isfinite(value)
    for multiple_choice in (False, True):
        got = extract_answer(text, multiple_choice)
        got_with_trigger = extract_answer(f"{TRIGGER} {text}", multiple_choice)
        if multiple_choice:
            assert got_with_trigger is None or got_with_trigger in "abcde"
        else:
            assert got_with_trigger is None or math.isfinite(float(got_with_trigger))
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
