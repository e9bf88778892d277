"""Readers for the math-problem formats reftkit trains on, all producing `Example`s.

Design: one small pure converter per format (`row -> Example`) that raises `_RowError` naming the
offending field, and one loop (`_convert_rows`) that adds the location (file + line/item) and
either raises `DataError` or records a `Skipped`. Rows are never dropped silently.

Locations: JSONL rows are "line N" (1-based, as editors show them); JSON list rows are "item N"
(0-based, i.e. data[N]); Hugging Face rows are "row N" (0-based).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Module import, not `from ... import`: reftkit.answers imports reftkit.data.records, so importing
# reftkit.answers first reaches this module while answers is still half-initialised.
from reftkit import answers
from reftkit.data.records import Example

FORMATS = ("reft", "gsm8k", "svamp", "mathqa", "mathqa-numeric", "hf")
FIELD_KEYS = ("question", "cot", "answer", "id", "options")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_FILE_SUFFIXES = (".json", *_JSONL_SUFFIXES)


class DataError(ValueError):
    """The data cannot be read; the message names the file, the line/item and the field."""


@dataclass(frozen=True)
class Skipped:
    location: str  # "train.jsonl line 17", "dev.json item 3"
    reason: str  # "field 'answer': no '#### N' final line"


@dataclass(frozen=True)
class LoadResult:
    examples: list[Example]
    skipped: list[Skipped]
    source: str = ""

    def summary(self) -> str:
        text = f"loaded {len(self.examples)} examples from {self.source}"
        if self.skipped:
            # Group by the reason without its "(detail)" tail, so 500 bad numbers read as one kind.
            kinds = Counter(s.reason.split(" (")[0] for s in self.skipped)
            listed = ", ".join(f"{n}x {kind}" for kind, n in kinds.most_common())
            text += f"; skipped {len(self.skipped)} ({listed})"
        return text


# ----------------------------------------------------------------------------- field helpers

_MISSING = "missing"


class _RowError(Exception):
    """A bad row; `field` is None for problems of the row as a whole (not an object, bad JSON)."""

    def __init__(self, field: str | None, problem: str, detail: str = "") -> None:
        super().__init__(problem)
        self.field, self.problem, self.detail = field, problem, detail

    def reason(self, names: Mapping[str, str]) -> str:
        field = names.get(self.field, self.field) if self.field is not None else None
        if field is None:
            head = self.problem
        elif self.problem == _MISSING:
            head = f"missing field '{field}'"
        else:
            head = f"field '{field}': {self.problem}"
        return f"{head} ({self.detail})" if self.detail else head


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "text", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _get(row: Mapping[str, Any], key: str) -> Any:
    if key not in row:
        raise _RowError(key, _MISSING)
    return row[key]


def _text(row: Mapping[str, Any], key: str, *, required: bool = False) -> str:
    value = _get(row, key)
    if not isinstance(value, str):
        raise _RowError(key, f"expected text, got {_json_type(value)}")
    if required and not value.strip():
        raise _RowError(key, "empty")
    return value


# Gold answers are machine-written numbers ("72", "1,200", "203.0", "<203>", "$5", "25%"). Prose
# such as "about 5" or "3 or 4" is rejected rather than silently read as its first number.
_BARE_NUMBER_CHARS = re.compile(r"[\s0-9.,+\-/$%<>eE]+")


def _gold_number(row: Mapping[str, Any], key: str, value: Any = None) -> str:
    """The canonical text ("203", "0.5") of a numeric gold answer; `value` overrides row[key]."""
    value = _get(row, key) if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _RowError(key, f"expected a number, got {_json_type(value)}")
    if isinstance(value, str):
        number = answers.parse_number(value) if _BARE_NUMBER_CHARS.fullmatch(value) else None
    else:
        number = float(value)
    if number is None or not math.isfinite(number):
        raise _RowError(key, "not a number", repr(value))
    return answers.format_number(number)


def _row_id(row: Mapping[str, Any], key: str | None, fallback: str) -> str:
    if key is None or key not in row or row[key] is None:
        return fallback
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RowError(key, f"expected text or an integer, got {_json_type(value)}")
    if not str(value).strip():
        raise _RowError(key, "empty")
    return str(value)


# ----------------------------------------------------------------------------- converters
# Each takes one row (a dict) and its id, returns an Example or raises _RowError.

# "Therefore, the answer is <203>." / "The answer is: 72" at the very end of an N-CoT.
_ANSWER_LINE = re.compile(
    r"\s*(?:therefore,?\s*)?the\s+answer\s+is\s*:?\s*<?[^<>\n]*?>?\s*\.?\s*\Z", re.IGNORECASE
)


def _strip_answer_line(cot: str) -> str:
    if cot.lstrip().startswith("def "):  # P-CoT programs are kept verbatim
        return cot.rstrip()
    return _ANSWER_LINE.sub("", cot).rstrip()


def reft_row(row: Mapping[str, Any], row_id: str) -> Example:
    """ReFT repo format: question, answer_cot (N-CoT text or P-CoT program), answer_value."""
    question = _text(row, "question", required=True)
    cot = _strip_answer_line(_text(row, "answer_cot"))
    return Example(row_id, question.strip(), cot, _gold_number(row, "answer_value"))


_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = re.compile(r"\n?[ \t]*####[ \t]*([^\n]*?)\s*\Z")


def gsm8k_row(row: Mapping[str, Any], row_id: str) -> Example:
    """GSM8K: answer = reasoning with <<a*b=c>> notes, then a final line '#### N'."""
    question = _text(row, "question", required=True)
    solution = _text(row, "answer")
    final = _GSM8K_FINAL.search(solution)
    if final is None:
        raise _RowError("answer", "no '#### N' final line")
    gold = _gold_number(row, "answer", final.group(1))
    cot = _CALCULATOR_NOTE.sub("", solution[: final.start()]).rstrip()
    return Example(row_id, question.strip(), cot, gold)


_INTEGRAL_DECIMAL = re.compile(r"(?<![\d.])(\d+)\.0+(?![\d.])")  # "29.0" -> "29"


def _wrapped_in_parens(expr: str) -> bool:
    """True for "(a + b)" but not "(a) + (b)": the first "(" closes at the very end."""
    if not (expr.startswith("(") and expr.endswith(")")):
        return False
    depth = 0
    for i, char in enumerate(expr):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and i < len(expr) - 1:
            return False
    return depth == 0


def equation_cot(equation: str, answer: str) -> str:
    """SVAMP has no rationale: "( 29.0 * 7.0 )" with answer "203" -> "29 * 7 = 203"."""
    expr = " ".join(equation.split())
    while _wrapped_in_parens(expr):
        expr = expr[1:-1].strip()
    expr = _INTEGRAL_DECIMAL.sub(r"\1", expr)
    return f"{expr} = {answer}"


def svamp_row(row: Mapping[str, Any], row_id: str) -> Example:
    """Original SVAMP: Body + Question, Equation, Answer (a number)."""
    body = _text(row, "Body")
    ask = _text(row, "Question", required=True)
    equation = _text(row, "Equation", required=True)
    answer = _gold_number(row, "Answer")
    question = " ".join(f"{body} {ask}".split())
    return Example(row_id, question, equation_cot(equation, answer), answer)


def _parse_options(value: Any) -> tuple[str, ...]:
    """MathQA options "a ) 24 , b ) 1,200 , ..." (or a list of "a ) 24") -> ("24", "1,200", ...).

    Splits on the letter markers in order, never on bare commas: texts contain "1,200" or "5 , 6".
    """
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:  # some MathQA rows hold the repr of a Python list
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise _RowError("options", "not a valid list", value[:60]) from None
    if isinstance(value, (list, tuple)):
        if not all(isinstance(item, str) for item in value):
            raise _RowError("options", "expected a list of text")
        value = " , ".join(value)
    if not isinstance(value, str):
        raise _RowError("options", f"expected text or a list of text, got {_json_type(value)}")
    marks: list[re.Match[str]] = []
    for letter in "abcde":
        mark = re.compile(rf"(?:^|,)\s*{letter}\s*\)").search(value, marks[-1].end() if marks else 0)
        if mark is None:
            break
        marks.append(mark)
    if len(marks) < 2 or marks[0].start() != 0:
        raise _RowError("options", "expected 'a ) ... , b ) ...'", value[:60])
    ends = [mark.start() for mark in marks[1:]] + [len(value)]
    texts = []
    for letter, mark, end in zip("abcde"[: len(marks)], marks, ends, strict=True):
        # Some rows repeat the marker: "a ) a ) 3 , b ) 2".
        text = re.sub(rf"^{letter}\s*\)\s*", "", value[mark.end() : end].strip())
        if not text:
            raise _RowError("options", f"option '{letter}' is empty")
        texts.append(text)
    return tuple(texts)


def _mathqa_parts(row: Mapping[str, Any]) -> tuple[str, str, tuple[str, ...], int]:
    question = _text(row, "Problem", required=True)
    rationale = _text(row, "Rationale").strip()
    if len(rationale) >= 2 and rationale[0] == rationale[-1] == '"':
        rationale = rationale[1:-1].strip()
    options = _parse_options(_get(row, "options"))
    letter = _text(row, "correct").strip().lower()
    if len(letter) != 1 or letter not in "abcde"[: len(options)]:
        raise _RowError("correct", f"not an option letter a-{'abcde'[len(options) - 1]}", repr(letter))
    return question.strip(), rationale, options, "abcde".index(letter)


def mathqa_row(row: Mapping[str, Any], row_id: str) -> Example:
    """Official MathQA, multiple choice: answer is the letter, options kept in letter order."""
    question, rationale, options, index = _mathqa_parts(row)
    return Example(row_id, question, rationale, "abcde"[index], options)


# Options whose first number is not their value: ratios "5 : 9", "4 π", "2 ^ 3", "√ 3",
# pairs "3 and 4" / "5 , 6", durations "3 hr 20 min".
_NOT_ONE_NUMBER = re.compile(r"[:π√^]|\bpi\b|\bsqrt\b|\band\b|\d\s+,\s+\d|\d\s*(?:h|hrs?|hours?)\s+\d")


def mathqa_numeric_row(row: Mapping[str, Any], row_id: str) -> Example:
    """MathQA as a numeric problem: answer = the value of the correct option's text."""
    question, rationale, options, index = _mathqa_parts(row)
    text = options[index]
    value = None if _NOT_ONE_NUMBER.search(text) else answers.parse_number(text)
    if value is None:
        raise _RowError("options", "correct option is not a single number", f"{'abcde'[index]}: {text!r}")
    return Example(row_id, question, rationale, answers.format_number(value))


_Converter = Callable[[Mapping[str, Any], str], Example]

# Per format: converter, id column, and our field keys -> that format's column names
# (the target of the `fields` mapping). svamp's question is two columns, so it takes no mapping.
_MATHQA_COLUMNS = {"question": "Problem", "cot": "Rationale", "options": "options", "answer": "correct"}
_FORMAT_SPECS: dict[str, tuple[_Converter, str | None, dict[str, str]]] = {
    "reft": (reft_row, "item_id", {"question": "question", "cot": "answer_cot", "answer": "answer_value"}),
    "gsm8k": (gsm8k_row, None, {"question": "question", "answer": "answer"}),
    "svamp": (svamp_row, "ID", {}),
    "mathqa": (mathqa_row, None, _MATHQA_COLUMNS),
    "mathqa-numeric": (mathqa_numeric_row, None, _MATHQA_COLUMNS),
}


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _BadJson:
    message: str


def _read_file_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) pairs; a JSONL line that is not JSON becomes a _BadJson row (skippable)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a JSON/JSONL file (use fmt='hf' for a saved dataset)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if path.suffix.lower() not in _JSONL_SUFFIXES:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            # "Extra data" after a first object: a JSON-lines file with a .json name.
            if not (error.msg == "Extra data" and text.lstrip().startswith("{")):
                raise DataError(
                    f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
                ) from None
        else:
            if not isinstance(data, list):
                raise DataError(f"{path}: top level is a JSON {_json_type(data)}, expected a list of objects")
            if not data:
                raise DataError(f"{path}: empty list, no examples")
            return [(f"item {i}", row) for i, row in enumerate(data)]
    rows: list[tuple[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines are not rows
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            rows.append((f"line {number}", _BadJson(f"invalid JSON at column {error.colno}: {error.msg}")))
    return rows


def _read_hf_rows(source: str | Path, split: str) -> list[tuple[str, Any]]:
    try:
        import datasets  # optional dependency, imported only when asked for
    except ImportError:
        raise DataError(
            f"{source}: reading Hugging Face datasets needs the 'datasets' package: "
            "pip install 'reftkit[datasets]'"
        ) from None
    path = Path(source)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{source}: no split {split!r}; available: {sorted(loaded)}")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(str(source), split=split)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFound, ConnectionError, ...)
        raise DataError(f"{source}: cannot load Hugging Face dataset (split {split!r}): {error}") from None
    if len(loaded) == 0:
        raise DataError(f"{source}: dataset split {split!r} is empty")
    return [(f"row {i}", row) for i, row in enumerate(loaded)]


def _detect_format(rows: list[tuple[str, Any]], fields: Mapping[str, str] | None, label: str) -> str:
    """Infer the row format from the first recognisable JSON object (and `fields`, when given).

    Scanning past unrecognisable objects lets a broken first row be reported as a bad row (or
    skipped) instead of making the whole file undetectable.
    """
    objects = [row for _, row in rows if isinstance(row, dict)]
    if not objects:
        raise DataError(f"{label}: no JSON object to infer the format from; pass fmt= one of {FORMATS}")
    if fields:
        if "options" in fields:
            return "mathqa"
        if "cot" in fields:
            return "reft"
        golds = (row.get(fields.get("answer", "answer")) for row in objects)
        return "gsm8k" if any(isinstance(gold, str) and "####" in gold for gold in golds) else "reft"
    for row in objects:
        keys = set(row)
        if {"answer_cot", "answer_value"} <= keys:
            return "reft"
        if {"Body", "Equation"} <= keys:
            return "svamp"
        if {"Problem", "options"} <= keys:
            return "mathqa"
        if {"question", "answer"} <= keys:
            return "gsm8k"
    raise DataError(
        f"{label}: cannot infer the format from fields {sorted(objects[0])}; pass fmt= one of {FORMATS}"
    )


# ----------------------------------------------------------------------------- the loop


def _rename(row: Mapping[str, Any], mapped: Mapping[str, str]) -> dict[str, Any]:
    """Rename the user's columns to the format's; a missing user column stays missing (no
    silent fallback to a column that happens to carry the format's own name)."""
    out = {key: value for key, value in row.items() if key not in mapped}
    out.update({target: row[column] for target, column in mapped.items() if column in row})
    return out


def _convert_rows(
    rows: list[tuple[str, Any]],
    fmt: str,
    fields: Mapping[str, str] | None,
    *,
    label: str,
    name: str,
    stem: str,
    skip_invalid: bool,
) -> LoadResult:
    convert, id_key, native = _FORMAT_SPECS[fmt]
    fields = dict(fields or {})
    if "id" in fields:
        id_key = None  # read below from the user's column
    mapped = {native[key]: column for key, column in fields.items() if key in native}
    # With a mapping but no cot column the data is evaluation-only: cot "" (see Example).
    fill_empty_cot = bool(fields) and "cot" in native and "cot" not in fields
    examples: list[Example] = []
    skipped: list[Skipped] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        try:
            if isinstance(row, _BadJson):
                raise _RowError(None, row.message)
            if not isinstance(row, dict):
                raise _RowError(None, f"expected a JSON object, got {_json_type(row)}")
            row_id = _row_id(row, fields.get("id", id_key), f"{stem}-{where.split()[-1]}")
            if fields:
                row = _rename(row, mapped)
                if fill_empty_cot:
                    row[native["cot"]] = ""
            example = convert(row, row_id)
            if example.id in seen:
                detail = f"{example.id!r}, first at {seen[example.id]}"
                raise _RowError(fields.get("id", id_key), "duplicate id", detail)
        except _RowError as error:
            reason = error.reason(mapped)
            if not skip_invalid:
                raise DataError(f"{label} {where}: {reason}") from None
            skipped.append(Skipped(f"{name} {where}", reason))
            continue
        seen[example.id] = where
        examples.append(example)
    if not examples:  # rows is never empty, so everything was skipped
        first = skipped[0]
        raise DataError(f"{label}: all {len(rows)} rows are invalid; first: {first.location}: {first.reason}")
    return LoadResult(examples, skipped, label)


def load_examples(
    source: str | Path,
    fmt: str = "auto",
    *,
    skip_invalid: bool = False,
    split: str = "train",
    fields: dict[str, str] | None = None,
) -> LoadResult:
    """Read math problems from a file or a Hugging Face dataset into `Example`s.

    fmt: one of FORMATS or "auto" (from the extension and the first record's fields; a directory
        or a path that is neither a file nor a .json/.jsonl name means a Hugging Face dataset).
    skip_invalid: bad rows go to `LoadResult.skipped` with location and reason instead of raising
        (file-level problems always raise, and so does a file whose every row is bad).
    split: the split of a Hugging Face dataset.
    fields: our keys (question, cot, answer, id, options) -> the source's column names, for data
        whose columns are named differently. Not supported for svamp (two-column question).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected 'auto' or one of {FORMATS}")
    unknown = set(fields or {}) - set(FIELD_KEYS)
    if unknown:
        raise DataError(f"fields: unknown keys {sorted(unknown)}; expected some of {FIELD_KEYS}")
    path = Path(source)
    is_hf = fmt == "hf" or (
        fmt == "auto" and (path.is_dir() or (not path.exists() and path.suffix.lower() not in _FILE_SUFFIXES))
    )
    if is_hf:
        label, name, stem = str(source), path.name or str(source), path.name or str(source)
        rows = _read_hf_rows(source, split)
    else:
        label, name, stem = str(path), path.name, path.stem
        rows = _read_file_rows(path)
    row_fmt = _detect_format(rows, fields, label) if fmt in ("auto", "hf") else fmt
    if fields:
        usable = {"id", *_FORMAT_SPECS[row_fmt][2]}
        unusable = sorted(set(fields) - usable)
        if unusable:  # e.g. options= for gsm8k: refuse rather than ignore the user's mapping
            raise DataError(f"{label}: fields {unusable} do not apply to the {row_fmt} format")
    return _convert_rows(rows, row_fmt, fields, label=label, name=name, stem=stem, skip_invalid=skip_invalid)
