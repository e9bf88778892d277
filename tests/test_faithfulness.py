"""Faithfulness read-out: does the picked option match the number the reasoning ended on? The rules in
reftkit/grading/faithfulness.py, on constructed predictions, then through `reftkit eval` and `reftkit sample`."""

import json

import pytest

from conftest import LENGTHS
from reftkit.commands.sample import summarize
from reftkit.data.numbers import parse_number
from reftkit.data.records import Example
from reftkit.grading.answers import TRIGGER, Grade, NaturalLanguageGrader, read_answer
from reftkit.grading.faithfulness import (
    consistency_summary,
    is_consistent,
    last_number,
    option_value,
    prediction_consistency,
)

# "what is 5 ^ 4 ?": the gold option is c (625).
POWER = Example("m0", "what is 5 ^ 4 ?", "", "c", ("24", "120", "625", "720", "1024"))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("24", 24.0),
        ("1,200", 1200.0),
        ("1 / 2", 0.5),
        ("12 %", 12.0),  # percent as written, as the answer rules read it
        ("rs . 150", 150.0),
        ("- 5", -5.0),
        ("5 : 9", None),  # a ratio is not one number
        ("4 π", None),
        ("3 and 4", None),
        ("none of these", None),
    ],
)
def test_option_value(text, value):
    got = option_value(text)
    assert (got if got is None else float(got)) == value


@pytest.mark.parametrize(
    ("reasoning", "value"),
    [
        ("5 * 5 * 5 * 5 = 625 . answer : c .", 625.0),  # MathQA's rationales end on the letter
        ("speed = 150 / 10 = 15 m / s", 15.0),
        ("a = 3 / 4", 0.75),  # a fraction is one number
        ("1 1 / 2", 1.5),
        ("cost = rs . 1,200", 1200.0),
        ("10 - 4", 4.0),  # a subtraction, not -4
        ("(3 + 2) - 1", 1.0),
        ("x = -4", -4.0),
        ("so 2,3", 3.0),  # not a thousands comma
        ("x = 1 / 0", None),
        ("no numbers at all", None),
    ],
)
def test_last_number(reasoning, value):
    got = last_number(reasoning)
    assert (got if got is None else float(got)) == value


def _graded(example, completion):
    grade = NaturalLanguageGrader().grade([completion], [example])[0]
    return grade, prediction_consistency(example, completion, grade, "natural")


def test_right_letter_with_reasoning_that_ends_on_its_value_is_consistent():
    grade, consistent = _graded(POWER, f"5 * 5 * 5 * 5 = 625 . answer : c .\n{TRIGGER} c")
    assert grade.correct and consistent is True


def test_right_letter_after_reasoning_that_ends_elsewhere_is_inconsistent():
    """The guessing policy: the reward pays the letter, the reasoning computed 120."""
    grade, consistent = _graded(POWER, f"5 * 4 * 3 * 2 = 120\n{TRIGGER} c")
    assert grade.correct and consistent is False


def test_wrong_letter_that_matches_its_reasoning_is_consistent_but_wrong():
    grade, consistent = _graded(POWER, f"5 * 4 * 3 * 2 * 1 = 120 . answer : b\n{TRIGGER} b")
    assert not grade.correct and consistent is True


def test_the_reward_tolerance_decides():
    half = Example("m1", "?", "", "b", ("1 / 4", "1 / 2", "3 / 4"))
    assert _graded(half, f"x = 0.505\n{TRIGGER} b")[1] is True  # |0.5 - 0.505| <= 1e-2
    assert _graded(half, f"x = 0.52\n{TRIGGER} b")[1] is False
    assert is_consistent("b", half.options, parse_number("0.51")) is True  # exactly the tolerance
    assert is_consistent("B", half.options, parse_number("0.5")) is True


def test_unknown_when_nothing_to_compare():
    words = Example("m2", "?", "", "a", ("5 : 9", "4 π", "none of these"))
    assert _graded(words, f"ratio = 5 / 9\n{TRIGGER} a")[1] is None  # a non-numeric option has no value
    assert _graded(POWER, f"it is the third one\n{TRIGGER} c")[1] is None  # no number in the reasoning
    assert _graded(POWER, "5 ^ 4 = 625 so c")[1] is None  # no trigger: no option picked
    assert is_consistent("e", ("1", "2"), parse_number("2")) is None  # a letter past the options
    assert is_consistent(None, POWER.options, parse_number("625.0")) is None


def test_program_cot():
    """A program's answer is its return value; a returned number is compared like a reasoning's
    number, but for multiple choice the grader reads only a letter from it, so a program row that
    returned a number picked nothing and one that returned a letter shows no number: both unknown."""
    returned = read_answer("625.0", multiple_choice=True)
    assert returned is None
    assert is_consistent("c", POWER.options, parse_number("625")) is True
    assert is_consistent("c", POWER.options, parse_number("120")) is False
    number = Grade(returned, False, "ok")
    letter = Grade(read_answer("c", multiple_choice=True), True, "ok")
    assert prediction_consistency(POWER, "    return 5 ** 4\n", number, "program") is None
    assert prediction_consistency(POWER, "    x = 5 ** 4\n    return 'c'\n", letter, "program") is None


def test_numeric_examples_have_no_consistency():
    with pytest.raises(ValueError, match="not multiple choice"):
        prediction_consistency(Example("n", "?", "", "5"), f"5\n{TRIGGER} 5", Grade("5", True), "natural")
    assert consistency_summary([{"correct": True}, {"correct": False}]) == {}


def _row(index, sample, example, completion):
    grade, consistent = _graded(example, completion)
    return {"index": index, "sample": sample, "extracted": grade.extracted, "correct": grade.correct,
            "consistent": consistent}


def test_summary_reports_consistency_beside_accuracy():
    """`reftkit sample`'s results.json: sample accuracy 2/4 and consistency 2/3, with one right
    letter after wrong reasoning and one unknown."""
    rows = [_row(0, 0, POWER, f"5 ^ 4 = 625\n{TRIGGER} c"),  # right and consistent
            _row(0, 1, POWER, f"5 * 24 = 120\n{TRIGGER} c"),  # right letter, wrong reasoning
            _row(0, 2, POWER, f"5 * 24 = 120\n{TRIGGER} b"),  # wrong but consistent
            _row(0, 3, POWER, "no answer")]  # unknown
    s = summarize(rows, [POWER])
    assert s["sample_accuracy"] == 2 / 4 and s["vote_accuracy"] == 1.0
    assert s["consistency"] == 2 / 3
    assert (s["consistent"], s["inconsistent"], s["consistency_unknown"], s["correct_inconsistent"]) == (2, 1, 1, 1)
    unknown = consistency_summary([rows[3]])
    assert unknown["consistency"] is None and unknown["consistency_unknown"] == 1
    numeric = summarize([{"index": 0, "sample": 0, "extracted": "5", "correct": True}], [Example("n", "?", "", "5")])
    assert "consistency" not in numeric


def test_eval_log_line_names_the_rate_and_counts():
    from reftkit.commands.evaluate import consistency_note

    counts = {"consistency": 2 / 3, "consistent": 2, "inconsistent": 1, "consistency_unknown": 1,
              "correct_inconsistent": 1}
    assert consistency_note(counts) == (
        ", consistency 0.6667 (2 consistent, 1 inconsistent of which 1 correct, 1 unknown)"
    )
    assert consistency_note(counts | {"consistency": None}).startswith(", consistency n/a (")
    assert consistency_note({}) == ""

def _write_mcq(path, examples):
    """reft format: a letter answer_value, the options as the question's last line."""
    with path.open("w") as f:
        for e in examples:
            options = " , ".join(f"{'abcde'[i]} ) {o}" for i, o in enumerate(e.options))
            f.write(json.dumps({"item_id": e.id, "question": f"{e.question}\n{options}", "answer_cot": "",
                                "answer_value": e.answer}) + "\n")


def test_eval_and_sample_report_consistency_on_multiple_choice_only(tmp_path, tiny_checkpoint, splits):
    """The wiring: every predictions/samples row of an MCQ example carries `consistent` (as the rule
    gives it for that row's output), and eval's metrics.jsonl and sample's results.json hold the
    counts; numeric data gains nothing."""
    from reftkit.commands.evaluate import run_eval
    from reftkit.commands.sample import run_sample
    from reftkit.config import EvalConfig, SampleConfig
    from reftkit.writers import write_examples

    mcq = [Example(f"m{i}", f"what is {i} + 2 ?", "", "c", (str(i), str(i + 1), str(i + 2))) for i in range(4)]
    _write_mcq(tmp_path / "mcq.jsonl", mcq)
    write_examples(tmp_path / "num.jsonl", splits[1][:4])
    common = {"model": str(tiny_checkpoint), "progress": False, "data_format": "reft", **LENGTHS}

    run_eval(EvalConfig(eval_file=str(tmp_path / "mcq.jsonl"), output_dir=tmp_path / "eval", **common))
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    for r, ex in zip(rows, mcq, strict=True):
        grade = Grade(r["extracted"], r["correct"])
        assert r["consistent"] == prediction_consistency(ex, r["output"], grade, "natural")
    metrics = json.loads((tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k: metrics[k] for k in consistency_summary(rows)} == consistency_summary(rows)
    assert metrics["consistent"] + metrics["inconsistent"] + metrics["consistency_unknown"] == 4

    summary = run_sample(SampleConfig(eval_file=str(tmp_path / "mcq.jsonl"), output_dir=tmp_path / "sample",
                                      num_samples=2, **common))
    samples = [json.loads(line) for line in (tmp_path / "sample" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all("consistent" in s for s in samples)
    assert json.loads((tmp_path / "sample" / "results.json").read_text()) == summary
    assert summary["consistent"] + summary["inconsistent"] + summary["consistency_unknown"] == 8

    run_eval(EvalConfig(eval_file=str(tmp_path / "num.jsonl"), output_dir=tmp_path / "num", **common))
    rows = [json.loads(line) for line in (tmp_path / "num" / "predictions.jsonl").read_text().splitlines()]
    assert rows and not any("consistent" in r for r in rows)
    assert "consistency" not in json.loads((tmp_path / "num" / "metrics.jsonl").read_text().splitlines()[-1])
