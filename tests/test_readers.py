"""Readers: each format on small hand-written files, and every kind of bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from reftkit.data import DataError, Example, LoadResult, Skipped, load_examples
from reftkit.data.readers import FORMATS, equation_cot


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def reft_item(item_id: str = "svamp_0", **overrides: object) -> dict:
    item = {
        "item_id": item_id,
        "question": "Tyler has 29 species with 7 pairs each. How many pairs?",
        "answer_cot": "29 * 7 = 203 pairs.\n\nTherefore, the answer is <203>.",
        "answer_value": "203.0",
    }
    return {**item, **overrides}


GSM8K_ROW = {
    "question": "Natalia sold clips to 48 friends in April and half as many in May. How many in total?",
    "answer": "In May: 48/2 = <<48/2=24>>24 clips.\nTotal: 48+24 = <<48+24=72>>72 clips.\n#### 72",
}

MATHQA_ROW = {
    "Problem": "what is 5 ^ 4 ?",
    "Rationale": '"5 * 5 * 5 * 5 = 625 . answer : c ."',
    "options": "a ) 24 , b ) 120 , c ) 625 , d ) 720 , e ) 1024",
    "correct": "c",
    "annotated_formula": "power(5, 4)",
}

SVAMP_ROW = {
    "ID": "chal-1",
    "Body": "Each pack of dvds costs 76 dollars.  If there is a discount of 25 dollars on each pack",
    "Question": "How much do you have to pay to buy each pack?",
    "Equation": "( 76.0 - 25.0 )",
    "Answer": 51.0,
    "Type": "Subtraction",
}


# ----------------------------------------------------------------------------- formats


def test_reft_json_strips_answer_line_and_canonicalises_answer(tmp_path):
    items = [
        reft_item("svamp_0"),
        reft_item("svamp_1", answer_cot="Half of 1 is 0.5\nTherefore, the answer is: 0.5", answer_value="0.5"),
        reft_item("svamp_2", answer_cot="6 / 100 = 6%\n\nTherefore, the answer is <6%>.", answer_value="6.0"),
        reft_item("svamp_3", answer_cot="Already answered. The answer is <4>.", answer_value="4"),
        reft_item("svamp_4", answer_cot="def solution():\n    result = 29 * 7\n    return result"),
    ]
    result = load_examples(write_json(tmp_path / "train_nl.json", items), "reft")
    q = items[0]["question"]
    assert result.examples == [
        Example("svamp_0", q, "29 * 7 = 203 pairs.", "203"),
        Example("svamp_1", q, "Half of 1 is 0.5", "0.5"),
        Example("svamp_2", q, "6 / 100 = 6%", "6"),
        Example("svamp_3", q, "Already answered.", "4"),
        Example("svamp_4", q, "def solution():\n    result = 29 * 7\n    return result", "203"),
    ]
    assert result.skipped == []


def test_reft_jsonl_is_accepted(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [reft_item("a"), reft_item("b", answer_value=7)])
    result = load_examples(path)  # auto: answer_cot/answer_value -> reft
    assert [(e.id, e.answer) for e in result.examples] == [("a", "203"), ("b", "7")]


def test_gsm8k_removes_calculator_notes_and_final_line(tmp_path):
    second = {"question": " Big? ", "answer": "It is 1,000 + 200.\n#### 1,200\n"}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GSM8K_ROW) + "\n\n" + json.dumps(second) + "\n", encoding="utf-8")
    result = load_examples(path, "gsm8k")
    assert result.examples == [
        Example(
            "train-1",
            GSM8K_ROW["question"],
            "In May: 48/2 = 24 clips.\nTotal: 48+24 = 72 clips.",
            "72",
        ),
        Example("train-3", "Big?", "It is 1,000 + 200.", "1200"),  # ids count physical lines
    ]


def test_svamp_question_and_equation_cot(tmp_path):
    no_id = {**SVAMP_ROW, "Equation": "( ( 3.0 + 4.0 ) * 2.5 )", "Answer": 17.5}
    no_id.pop("ID")
    path = write_json(tmp_path / "svamp.json", [SVAMP_ROW, no_id])
    result = load_examples(path, "svamp")
    question = (
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
        "How much do you have to pay to buy each pack?"
    )
    assert result.examples == [
        Example("chal-1", question, "76 - 25 = 51", "51"),
        Example("svamp-1", question, "( 3 + 4 ) * 2.5 = 17.5", "17.5"),
    ]


def test_equation_cot_keeps_parens_that_do_not_wrap_everything():
    assert equation_cot("( 1.0 + 2.0 ) * ( 3.0 + 4.0 )", "21") == "( 1 + 2 ) * ( 3 + 4 ) = 21"
    assert equation_cot(" 10.50 / 2.0 ", "5.25") == "10.50 / 2 = 5.25"


def test_mathqa_multiple_choice(tmp_path):
    commas = {
        **MATHQA_ROW,
        "Rationale": "plain rationale",
        "options": "a ) rs . 1,200 , b ) 5 , 6 , c ) 3 / 4 , d ) none , e ) 7",
        "correct": "A",
    }
    as_list = {**MATHQA_ROW, "options": ["a ) 1", "b ) 2", "c ) 3", "d ) 4", "e ) 5"]}
    list_repr = {**MATHQA_ROW, "options": "['a ) 4', 'b ) 4 π', 'c ) 16', 'd ) 8', 'e ) 2']"}
    doubled = {**MATHQA_ROW, "options": "a ) a ) 3 , b ) 2 , c ) c ) 5 , d ) d ) 21 , e ) e ) 28"}
    path = write_json(tmp_path / "dev.json", [MATHQA_ROW, commas, as_list, list_repr, doubled])
    result = load_examples(path, "mathqa")
    q = MATHQA_ROW["Problem"]
    cot = "5 * 5 * 5 * 5 = 625 . answer : c ."
    assert result.examples == [
        Example("dev-0", q, cot, "c", ("24", "120", "625", "720", "1024")),
        Example("dev-1", q, "plain rationale", "a", ("rs . 1,200", "5 , 6", "3 / 4", "none", "7")),
        Example("dev-2", q, cot, "c", ("1", "2", "3", "4", "5")),
        Example("dev-3", q, cot, "c", ("4", "4 π", "16", "8", "2")),
        Example("dev-4", q, cot, "c", ("3", "2", "5", "21", "28")),
    ]


def test_mathqa_numeric_uses_value_of_correct_option(tmp_path):
    money = {**MATHQA_ROW, "options": "a ) rs . 1,200 , b ) 5 , c ) 6 , d ) 7 , e ) 8", "correct": "a"}
    fraction = {**MATHQA_ROW, "options": "a ) 1 , b ) 1 / 2 , c ) 6 , d ) 7 , e ) 8", "correct": "b"}
    path = write_json(tmp_path / "dev.json", [MATHQA_ROW, money, fraction])
    result = load_examples(path, "mathqa-numeric")
    cot = "5 * 5 * 5 * 5 = 625 . answer : c ."
    q = MATHQA_ROW["Problem"]
    assert result.examples == [
        Example("dev-0", q, cot, "625"),
        Example("dev-1", q, cot, "1200"),
        Example("dev-2", q, cot, "1/2"),  # the option "1 / 2", exactly
    ]


def test_json_lines_file_named_json(tmp_path):
    path = tmp_path / "gsm.json"
    path.write_text(json.dumps(GSM8K_ROW) + "\n" + json.dumps(GSM8K_ROW) + "\n", encoding="utf-8")
    assert [e.id for e in load_examples(path).examples] == ["gsm-1", "gsm-2"]


@pytest.mark.parametrize(
    ("name", "data", "expected_answer"),
    [
        ("a.jsonl", [GSM8K_ROW], "72"),
        ("a.json", [reft_item()], "203"),
        ("a.json", [SVAMP_ROW], "51"),
        ("a.json", [MATHQA_ROW], "c"),
    ],
)
def test_auto_detection(tmp_path, name, data, expected_answer):
    path = tmp_path / name
    write_jsonl(path, data) if name.endswith(".jsonl") else write_json(path, data)
    assert load_examples(path).examples[0].answer == expected_answer


def test_fields_map_other_column_names(tmp_path):
    rows = [{"uid": "x1", "problem": "2+2?", "solution": "2+2=<<2+2=4>>4\n#### 4"}]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    fields = {"question": "problem", "answer": "solution", "id": "uid"}
    assert load_examples(path, fields=fields).examples == [Example("x1", "2+2?", "2+2=4", "4")]
    # numeric answers without a cot column: evaluation-only data, cot "" (its own answer_cot unread)
    path = write_jsonl(tmp_path / "eval.jsonl", [{"problem": "2+2?", "target": "4", "answer_cot": "2+2=4"}])
    got = load_examples(path, fields={"question": "problem", "answer": "target"}, require_cot=False).examples
    assert got == [Example("eval-1", "2+2?", "", "4")]
    with pytest.raises(DataError, match=r"eval\.jsonl: fields maps no 'cot' column, and training needs"):
        load_examples(path, fields={"question": "problem", "answer": "target"})
    # a missing mapped column is reported under the user's name
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "2+2?", "target": "4"}])
    with pytest.raises(DataError, match=r"bad\.jsonl line 1: missing field 'problem'"):
        load_examples(path, fields={"question": "problem", "answer": "target"}, require_cot=False)
    with pytest.raises(DataError, match=r"fields \['cot'\] do not apply to the gsm8k format"):
        load_examples(path, "gsm8k", fields={"cot": "target"})
    with pytest.raises(DataError, match="unknown keys"):
        load_examples(path, fields={"solution": "target"})


# ----------------------------------------------------------------------------- bad input


def _raises(path: Path, *fragments: str, **kwargs: object) -> str:
    with pytest.raises(DataError) as info:
        load_examples(path, **kwargs)
    message = str(info.value)
    for fragment in (path.name, *fragments):
        assert fragment in message, (fragment, message)
    return message


def test_bad_json_in_json_file_reports_line_and_column(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"question": "q",\n   "answer": }\n]', encoding="utf-8")
    _raises(path, "invalid JSON at line 3 column 14")


def test_bad_json_line_in_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GSM8K_ROW) + "\n{not json\n", encoding="utf-8")
    _raises(path, "line 2", "invalid JSON", fmt="gsm8k")


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ({"answer": GSM8K_ROW["answer"]}, ("line 1", "missing field 'question'")),
        ({**GSM8K_ROW, "question": 5}, ("line 1", "field 'question': expected text, got number")),
        ({**GSM8K_ROW, "question": None}, ("line 1", "field 'question': expected text, got null")),
        ({**GSM8K_ROW, "question": "   "}, ("line 1", "field 'question': empty")),
        ({**GSM8K_ROW, "answer": "so 72"}, ("line 1", "field 'answer': no '#### N' final line")),
        ({**GSM8K_ROW, "answer": "x\n#### seventy"}, ("line 1", "field 'answer': not a single number")),
        ({**GSM8K_ROW, "answer": "#### 7\nmore"}, ("line 1", "field 'answer': no '#### N'")),
        ([1, 2], ("line 1", "expected a JSON object, got list")),
    ],
)
def test_bad_gsm8k_rows(tmp_path, row, fragments):
    _raises(write_jsonl(tmp_path / "train.jsonl", [row]), *fragments, fmt="gsm8k")


@pytest.mark.parametrize(
    ("item", "fragments"),
    [
        (reft_item(answer_value="abc"), ("item 1", "field 'answer_value': not a single number ('abc')")),
        (reft_item(answer_value="about 5"), ("item 1", "field 'answer_value': not a single number")),
        (reft_item(answer_value=None), ("item 1", "field 'answer_value': expected a number, got null")),
        (reft_item(answer_cot=["x"]), ("item 1", "field 'answer_cot': expected text, got list")),
        ({"question": "q", "answer_cot": "c"}, ("item 1", "missing field 'answer_value'")),
        (reft_item("svamp_0"), ("item 1", "field 'item_id': duplicate id ('svamp_0', first at item 0)")),
        ("just text", ("item 1", "expected a JSON object, got text")),
    ],
)
def test_bad_reft_items(tmp_path, item, fragments):
    _raises(write_json(tmp_path / "train_nl.json", [reft_item("svamp_0"), item]), *fragments, fmt="reft")


# Gold answers that are not one number were once read as their first ("1 000" -> 1, "3-4" -> 3).
@pytest.mark.parametrize("gold", ["1 000", "3-4", "3 - 4", "3\u20134", "1,5", "1,00,000", "1,0000", "2 3", "3/4/5",
                                  "1.5.2", "10 20/4", "5, 6", "$5 $6", "1e5e5"])
def test_a_gold_answer_that_is_not_one_number_is_refused_naming_file_item_and_field(tmp_path, gold):
    _raises(write_json(tmp_path / "train_nl.json", [reft_item("svamp_0"), reft_item("svamp_1", answer_value=gold)]),
            "item 1", f"field 'answer_value': not a single number ({gold!r}", fmt="reft")
    row = {**GSM8K_ROW, "answer": f"x\n#### {gold}"}
    _raises(write_jsonl(tmp_path / "train.jsonl", [GSM8K_ROW, row]), "line 2", "field 'answer': not a single number",
            fmt="gsm8k")
    if gold == "1 000":
        _raises(write_json(tmp_path / "t.json", [reft_item(answer_value=gold)]), "thousands are separated by commas")
    svamp = {**SVAMP_ROW, "Answer": gold}
    _raises(write_json(tmp_path / "dev.json", [svamp]), "item 0", "field 'Answer': not a single number", fmt="svamp")


@pytest.mark.parametrize(
    ("gold", "canonical"),
    [("1,000", "1000"), ("1,234,567.5", "1234567.5"), ("<203>", "203"), ("203.0", "203"), ("$5", "5"), ("25%", "25"),
     ("-3", "-3"), ("1 1/2", "3/2"), ("3 / 4", "3/4"), ("0.75", "0.75"), ("1e3", "1000"), (" 72 ", "72"),
     ("100000000000000001", "100000000000000001"), (100000000000000001, "100000000000000001"), (0.1, "0.1"),
     (7, "7"), (2.5, "2.5")],
)
def test_a_gold_answer_is_read_exactly(tmp_path, gold, canonical):
    path = write_json(tmp_path / "train_nl.json", [reft_item("svamp_0", answer_value=gold)])
    assert load_examples(path, "reft").examples[0].answer == canonical


@pytest.mark.parametrize(
    ("fmt", "overrides", "fragments"),
    [
        ("mathqa", {"correct": "f"}, ("item 0", "field 'correct': not an option letter a-e ('f')")),
        ("mathqa", {"correct": ""}, ("item 0", "field 'correct': not an option letter")),
        ("mathqa", {"options": "24 , 120 , 625"}, ("item 0", "field 'options': expected 'a ) ... , b ) ...'")),
        ("mathqa", {"options": 5}, ("item 0", "field 'options': expected text or a list of text, got number")),
        ("mathqa", {"options": "a ) 1 , b ) , c ) 3"}, ("item 0", "field 'options': option 'b' is empty")),
        ("mathqa", {"options": "a ) 1 , b ) 2 , c ) 3", "correct": "d"}, ("field 'correct'", "a-c")),
        ("mathqa", {"Problem": None}, ("item 0", "field 'Problem': expected text, got null")),
        (
            "mathqa-numeric",
            {"options": "a ) 1 , b ) 2 , c ) none , d ) 4 , e ) 5"},
            ("item 0", "field 'options': correct option is not a single number (c: 'none')"),
        ),
        (
            "mathqa-numeric",
            {"options": "a ) 1 , b ) 2 , c ) 5 : 9 , d ) 4 , e ) 5"},
            ("item 0", "correct option is not a single number (c: '5 : 9')"),
        ),
        ("svamp", {"Answer": "many"}, ("item 0", "field 'Answer': not a single number")),
        ("svamp", {"Equation": ""}, ("item 0", "field 'Equation': no reference CoT (training needs one)")),
    ],
)
def test_bad_mathqa_and_svamp_items(tmp_path, fmt, overrides, fragments):
    base = SVAMP_ROW if fmt == "svamp" else MATHQA_ROW
    _raises(write_json(tmp_path / "dev.json", [{**base, **overrides}]), *fragments, fmt=fmt)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "file is empty"),
        ("  \n\n", "file is empty"),
        ("[]", "empty list"),
        ('{"question": "q"}', "top level is a JSON object, expected a list"),
    ],
)
def test_file_level_problems_raise_even_when_skipping(tmp_path, content, fragment):
    path = tmp_path / "train.json"
    path.write_text(content, encoding="utf-8")
    _raises(path, fragment, skip_invalid=True)


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.jsonl", "no such file or directory")
    _raises(tmp_path / "nope.json", "no such file or directory", fmt="gsm8k")


def test_unknown_format_and_undetectable_fields(tmp_path):
    path = write_json(tmp_path / "odd.json", [{"foo": 1}])
    with pytest.raises(DataError, match="unknown format 'csv'"):
        load_examples(path, "csv")
    message = _raises(path, "item 0: cannot infer the format", "foo", "set --data_format to one of")
    assert all(fmt in message for fmt in FORMATS)
    assert "fmt=" not in message


# ----------------------------------------------------------------------------- skipping


def test_skip_invalid_keeps_good_rows_in_order_and_reports_reasons(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [
        json.dumps(GSM8K_ROW),
        json.dumps({"answer": "#### 1"}),
        "{oops",
        json.dumps({**GSM8K_ROW, "answer": "no final line"}),
        json.dumps({"question": "Second good one?", "answer": "1 + 1 = 2\n#### 2"}),
        json.dumps({"answer": "#### 3"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = load_examples(path, skip_invalid=True)
    assert [(e.id, e.answer) for e in result.examples] == [("train-1", "72"), ("train-5", "2")]
    assert result.skipped == [
        Skipped("train.jsonl line 2", "missing field 'question'"),
        Skipped("train.jsonl line 3", "invalid JSON at column 2: Expecting property name enclosed in double quotes"),
        Skipped("train.jsonl line 4", "field 'answer': no '#### N' final line"),
        Skipped("train.jsonl line 6", "missing field 'question'"),
    ]
    summary = result.summary()
    assert summary.startswith(f"loaded 2 examples from {path}; skipped 4 (")
    assert "2x missing field 'question' [train.jsonl line 2, train.jsonl line 6]" in summary
    assert "1x field 'answer': no '#### N' final line [train.jsonl line 4]" in summary


def test_skip_invalid_groups_details_in_summary_with_the_first_locations():
    skipped = [Skipped(f"a.json item {i}", f"field 'x': not a number ('{i}')") for i in range(5)]
    skipped.append(Skipped("a.json item 9", "missing field 'y'"))
    result = LoadResult([Example("1", "q", "", "1")], skipped, "a.json")
    assert result.summary() == (
        "loaded 1 examples from a.json; skipped 6 (5x field 'x': not a number "
        "[a.json item 0, a.json item 1, a.json item 2, and 2 more]; 1x missing field 'y' [a.json item 9])"
    )


def test_all_rows_invalid_raises(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"answer": "#### 1"}, {"question": "q", "answer": "1"}])
    _raises(path, "all 2 rows are invalid", "line 1", "missing field 'question'", skip_invalid=True)


def test_duplicate_ids_can_be_skipped(tmp_path):
    path = write_json(tmp_path / "t.json", [reft_item("a"), reft_item("a"), reft_item("b")])
    result = load_examples(path, skip_invalid=True)
    assert [e.id for e in result.examples] == ["a", "b"]
    assert result.skipped == [
        Skipped("t.json item 1", "field 'item_id': duplicate id ('a', first at item 0)")
    ]


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    gsm = datasets.Dataset.from_dict({"question": [GSM8K_ROW["question"]], "answer": [GSM8K_ROW["answer"]]})
    gsm.save_to_disk(str(tmp_path / "gsm"))
    expected = Example(
        "gsm-0", GSM8K_ROW["question"], "In May: 48/2 = 24 clips.\nTotal: 48+24 = 72 clips.", "72"
    )
    assert load_examples(tmp_path / "gsm", "hf").examples == [expected]
    assert load_examples(str(tmp_path / "gsm")).examples == [expected]  # auto: a directory

    reft = datasets.Dataset.from_dict({key: [value] for key, value in reft_item("s1").items()})
    datasets.DatasetDict({"test": reft}).save_to_disk(str(tmp_path / "reft"))
    got = load_examples(tmp_path / "reft", "hf", split="test").examples
    assert [(e.id, e.cot, e.answer) for e in got] == [("s1", "29 * 7 = 203 pairs.", "203")]
    with pytest.raises(DataError, match="no split 'train'"):
        load_examples(tmp_path / "reft", "hf")

    bad = datasets.Dataset.from_dict({"q": ["x", None], "a": ["#### 1", "#### 2"]})
    bad.save_to_disk(str(tmp_path / "bad"))
    result = load_examples(tmp_path / "bad", "hf", fields={"question": "q", "answer": "a"}, skip_invalid=True,
                           require_cot=False)
    assert [e.answer for e in result.examples] == ["1"]
    assert result.skipped == [Skipped("bad row 1", "field 'q': expected text, got null")]


def test_hf_without_datasets_package_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"pip install 'reftkit\[datasets\]'"):
        load_examples("openai/gsm8k", "hf")
    (tmp_path / "state.json").write_text("{}", encoding="utf-8")  # what save_to_disk writes
    with pytest.raises(DataError, match=r"pip install 'reftkit\[datasets\]'"):
        load_examples(tmp_path)  # auto: a directory datasets saved


# ----------------------------------------------------------------------------- reference CoT


def test_reft_repo_test_sets_have_no_cot_and_are_read_for_evaluation(tmp_path):
    # as the ReFT repository's data/gsm8k_test_set.json and data/mathqa_test_set.json
    numeric = [{"item_id": "gsm8k_0", "question": "Janet has 16 eggs. How many?", "answer_value": 18.0}]
    choices = [
        {"item_id": "mathqa_0", "question": "what is 5 ^ 4 ?\na ) 24 , b ) 120 , c ) 625 , d ) 720 , e ) 1024",
         "answer_value": "c"},
        {"item_id": "mathqa_95", "question": "height ?\n['a ) 12', 'b ) 15', 'c ) 10', 'd ) 8', 'e ) 14']",
         "answer_value": "a"},
    ]
    got = load_examples(write_json(tmp_path / "gsm8k_test_set.json", numeric), require_cot=False).examples
    assert got == [Example("gsm8k_0", "Janet has 16 eggs. How many?", "", "18")]
    got = load_examples(write_json(tmp_path / "mathqa_test_set.json", choices), require_cot=False).examples
    assert got == [
        Example("mathqa_0", "what is 5 ^ 4 ?", "", "c", ("24", "120", "625", "720", "1024")),
        Example("mathqa_95", "height ?", "", "a", ("12", "15", "10", "8", "14")),
    ]
    # --data_format reft asks for no answer_cot either, when no CoT is needed
    assert load_examples(tmp_path / "gsm8k_test_set.json", "reft", require_cot=False).examples == [
        Example("gsm8k_0", "Janet has 16 eggs. How many?", "", "18")]
    # training on it is refused, naming the file, the item and the field
    _raises(tmp_path / "gsm8k_test_set.json", "item 0: missing field 'answer_cot' (the reference CoT", fmt="reft")


def test_letter_answer_needs_an_options_line(tmp_path):
    rows = [{"item_id": "m", "question": "what is 5 ^ 4 ?", "answer_value": "c"}]
    _raises(write_json(tmp_path / "t.json", rows), "item 0: field 'question': answer_value is an option letter",
            require_cot=False)
    rows = [{"item_id": "m", "question": "q ?\na ) 1 , b ) 2 , c ) 3", "answer_value": "e"}]
    _raises(write_json(tmp_path / "t.json", rows), "field 'answer_value': not an option letter a-c", require_cot=False)


@pytest.mark.parametrize(
    ("fmt", "row", "fragment"),
    [
        ("gsm8k", {"question": "q?", "answer": "#### 5"}, "field 'answer': no reference CoT (training needs one)"),
        ("reft", reft_item(answer_cot="Therefore, the answer is <203>."), "field 'answer_cot': no reference CoT"),
        ("reft", reft_item(answer_cot=None), "field 'answer_cot': expected text, got null"),
        ("svamp", {k: v for k, v in SVAMP_ROW.items() if k != "Equation"}, "missing field 'Equation' (the reference"),
        ("mathqa", {**MATHQA_ROW, "Rationale": '""'}, "field 'Rationale': no reference CoT"),
        ("mathqa-numeric", {k: v for k, v in MATHQA_ROW.items() if k != "Rationale"}, "missing field 'Rationale'"),
    ],
)
def test_rows_without_reference_cot_are_refused_for_training_and_read_for_evaluation(tmp_path, fmt, row, fragment):
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    _raises(path, "line 1: " + fragment, fmt=fmt)
    assert [e.cot for e in load_examples(path, fmt, require_cot=False).examples] == [""]


def test_cot_source_names_the_file_line_and_the_formats_field(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GSM8K_ROW, reft_item()])
    assert load_examples(path, "gsm8k", skip_invalid=True).examples[0].cot_source == f"{path} line 1, field 'answer'"
    path = write_json(tmp_path / "train.json", [reft_item()])
    assert load_examples(path).examples[0].cot_source == f"{path} item 0, field 'answer_cot'"


# ----------------------------------------------------------------------------- sources and messages


def test_directory_of_json_files_is_read_in_name_order(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "b.jsonl", [GSM8K_ROW, {"answer": "x\n#### 1"}])
    write_json(data / "a.json", [{"question": "First?", "answer": "1 + 1 = 2\n#### 2"}])
    (data / "notes.txt").write_text("not data", encoding="utf-8")
    (data / "sub").mkdir()
    write_jsonl(data / "sub" / "c.jsonl", [GSM8K_ROW])
    result = load_examples(data, skip_invalid=True)
    assert [(e.id, e.answer) for e in result.examples] == [("a-0", "2"), ("b-1", "72")]
    assert result.skipped == [Skipped("b.jsonl line 2", "missing field 'question'")]
    with pytest.raises(DataError, match=rf"{data / 'b.jsonl'} line 2: missing field 'question'"):
        load_examples(data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="a directory without .json/.jsonl files, and not a saved Hugging Face"):
        load_examples(tmp_path / "empty")
    with pytest.raises(DataError, match="a directory of JSON/JSONL files, not a saved Hugging Face dataset: set"):
        load_examples(data, "hf")


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GSM8K_ROW).encode() + b"\n" + json.dumps(GSM8K_ROW).encode()
                     + b"\n{\"q\": \"caf\xe9\"}\n")
    _raises(path, "line 3: not UTF-8 text (byte 0xe9 at byte column 11)")
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([reft_item()]).encode())  # a byte-order mark is fine
    assert len(load_examples(path.rename(tmp_path / "bom.json")).examples) == 1


@pytest.mark.parametrize("name", ["data/train", "./train", "../nope/train", "train", "a/b/c", "/nonexistent/train"])
def test_missing_local_looking_path_is_an_error_at_once_without_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    hub = []
    fake = type(sys)("datasets")
    fake.load_dataset = lambda *args, **kwargs: hub.append(args)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match=rf"data '{name}': no such file or directory"):
        load_examples(name)
    assert hub == []


def test_owner_slash_name_goes_to_the_hub(tmp_path, monkeypatch):
    import reftkit.data.readers

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reftkit.data.readers, "hub_unreachable", lambda: None)  # reachable or not, asked plainly
    fake = type(sys)("datasets")
    fake.load_dataset = lambda name, split: [{"question": "q?", "answer": f"{name} {split}\n#### 3"}]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_examples("openai/gsm8k").examples[0].cot == "openai/gsm8k train"
    assert load_examples("gsm8k", "hf", split="test").examples[0].cot == "gsm8k test"  # any name with hf


# ----------------------------------------------------------------------------- big rows


def test_long_runs_of_spaces_do_not_make_the_answer_regexes_quadratic(tmp_path):
    import time

    spaces = " " * 200_000  # before: minutes (quadratic backtracking); now milliseconds
    rows = [
        reft_item("a", answer_cot="29 * 7 = 203" + spaces + "pairs.\nTherefore, the answer is <203>."),
        reft_item("b", answer_cot=spaces + "x"),
        {**reft_item("c"), "answer_cot": "the answer is " + spaces + "x\ny"},
    ]
    path = write_json(tmp_path / "t.json", rows)
    start = time.perf_counter()
    cots = [e.cot for e in load_examples(path).examples]
    assert cots == ["29 * 7 = 203" + spaces + "pairs.", spaces + "x", "the answer is " + spaces + "x\ny"]
    gsm = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### " + spaces + "x\nmore"}])
    _raises(gsm, "no '#### N' final line", fmt="gsm8k")
    assert equation_cot("(" * 100_000 + " 1.0 + 2.0 " + ")" * 100_000, "3") == "1 + 2 = 3"
    assert time.perf_counter() - start < 10
