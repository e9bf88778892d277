"""Readers for the math-problem formats reftkit trains on, all producing `Example`s.

Design: one small pure converter per format (`row -> Example`) that raises `_RowError` naming the
offending field, and one loop (`_convert_rows`) that adds the location (file + line/item) and
either raises `DataError` or records a `Skipped`. Rows are never dropped silently.

Locations: JSONL rows are "line N" (1-based, as editors show them); JSON list rows are "item N"
(0-based, i.e. data[N]); Hugging Face rows are "row N" (0-based). A directory is read as its
.json/.jsonl files in name order, each row located in its own file.

Reference CoT: training on it (SFT and the self-training baselines) needs it, so by default a row
without one is an error naming its field; evaluation, sampling and ReFT's PPO need only the
question and the gold answer (`require_cot=False`, cot "" where the source has none).
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reftkit.data.numbers import format_number, number_of, parse_number
from reftkit.data.records import Example
from reftkit.modeling.hub import cache_only_note, could_be_hub_id, hub_unreachable, missing_path_message

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

    def summary(self, shown: int = 3) -> str:
        """One line: how many rows were loaded and skipped, and per kind of reason the first `shown`
        locations, e.g. "skipped 4 (2x missing field 'question' [train.jsonl line 2, train.jsonl line 6])"."""
        text = f"loaded {len(self.examples)} examples from {self.source}"
        if self.skipped:
            # Group by the reason without its "(detail)" tail, so 500 bad numbers read as one kind.
            where: dict[str, list[str]] = {}
            for s in self.skipped:
                where.setdefault(s.reason.split(" (")[0], []).append(s.location)
            kinds = Counter({kind: len(locations) for kind, locations in where.items()})
            listed = "; ".join(f"{n}x {kind} [{_first(where[kind], shown)}]" for kind, n in kinds.most_common())
            text += f"; skipped {len(self.skipped)} ({listed})"
        return text


def _first(items: list[str], shown: int) -> str:
    more = len(items) - shown
    return ", ".join(items[:shown]) + (f", and {more} more" if more > 0 else "")


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


# Gold answers are machine-written numbers ("72", "1,200", "203.0", "<203>", "$5", "25%", "1 1/2"), read
# exactly as one number (reftkit.grading.answers' rules) or refused: no letters ("about 5", "3 or 4"), and nothing
# that is two numbers ("3-4", "1 000": thousands are written with commas, "1,000").
_BARE_NUMBER_CHARS = re.compile(r"[\s0-9.,+\-/$%<>eE]+")
_SPACED_THOUSANDS = re.compile(r"[0-9]\s+[0-9]{3}(?![0-9])")


def _gold_number(row: Mapping[str, Any], key: str, value: Any = None) -> str:
    """The canonical text ("203", "0.5", "3/4") of a numeric gold answer; `value` overrides row[key]."""
    value = _get(row, key) if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _RowError(key, f"expected a number, got {_json_type(value)}")
    if isinstance(value, str):
        number = parse_number(value) if _BARE_NUMBER_CHARS.fullmatch(value) else None
    else:
        number = number_of(value)
    if number is None:
        hint = "; thousands are separated by commas, as in 1,000" if _SPACED_THOUSANDS.search(str(value)) else ""
        raise _RowError(key, "not a single number", repr(value) + hint)
    return format_number(number)


def _row_id(row: Mapping[str, Any], key: str | None, fallback: str) -> str:
    if key is None or key not in row or row[key] is None:
        return fallback
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RowError(key, f"expected text or an integer, got {_json_type(value)}")
    if not str(value).strip():
        raise _RowError(key, "empty")
    return str(value)


_NEEDED = "the reference CoT, which training needs"


def _cot_text(row: Mapping[str, Any], key: str, need_cot: bool) -> str:
    """The reference-CoT column: must be there when training needs it; else missing or null is ""."""
    if not need_cot and row.get(key) is None:
        return ""
    if need_cot and key not in row:
        raise _RowError(key, _MISSING, _NEEDED)
    return _text(row, key)


def _require(cot: str, key: str, need_cot: bool) -> str:
    if need_cot and not cot.strip():
        raise _RowError(key, "no reference CoT", "training needs one")
    return cot


# ----------------------------------------------------------------------------- converters
# Each takes one row (a dict), its id and whether the reference CoT is required; returns an
# Example or raises _RowError.

# "Therefore, the answer is <203>." / "The answer is: 72" at the very end of an N-CoT.
_ANSWER_LINE = re.compile(
    r"\s*(?:therefore,?\s*)?the\s+answer\s+is\s*:?\s*<?[^<>\n]*?>?\s*\.?\s*\Z", re.IGNORECASE
)


# A final answer line is looked for in the text's last characters only: far more than any answer
# line takes, and it bounds the regex's work (its backtracking is quadratic in what it scans).
_FINAL_LINE_WINDOW = 1000


def _final_line(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """`pattern` (anchored at the end of `text`) searched in its last _FINAL_LINE_WINDOW characters."""
    return pattern.search(text, max(len(text) - _FINAL_LINE_WINDOW, 0))


def _strip_answer_line(cot: str) -> str:
    if cot.lstrip().startswith("def "):  # P-CoT programs are kept verbatim
        return cot.rstrip()
    line = _final_line(_ANSWER_LINE, cot)
    return (cot if line is None else cot[: line.start()]).rstrip()


def reft_row(row: Mapping[str, Any], row_id: str, need_cot: bool = True) -> Example:
    """ReFT repo format: question, answer_cot (N-CoT text or P-CoT program), answer_value; the
    repo's test sets have no answer_cot. A multiple-choice answer_value is an option letter and the
    question's last line lists the options ("...?\na ) 38 , b ) 27.675 , ...", as in MathQA)."""
    question = _text(row, "question", required=True).strip()
    cot = _require(_strip_answer_line(_cot_text(row, "answer_cot", need_cot)), "answer_cot", need_cot)
    value = _get(row, "answer_value")
    if not (isinstance(value, str) and len(value.strip()) == 1 and value.strip().lower() in "abcde"):
        return Example(row_id, question, cot, _gold_number(row, "answer_value"))
    letter = value.strip().lower()
    head, _, last = question.rpartition("\n")
    try:
        options = _parse_options(last) if head else None
    except _RowError:
        options = None
    if options is None:
        raise _RowError("question", "answer_value is an option letter, but the last line is not 'a ) ... , b ) ...'")
    if letter not in "abcde"[: len(options)]:
        raise _RowError("answer_value", f"not an option letter a-{'abcde'[len(options) - 1]}", repr(value))
    return Example(row_id, head.strip(), cot, letter, options)


_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = re.compile(r"\n?[ \t]*####[ \t]*([^\n]*?)\s*\Z")


def gsm8k_row(row: Mapping[str, Any], row_id: str, need_cot: bool = True) -> Example:
    """GSM8K: answer = reasoning with <<a*b=c>> notes, then a final line '#### N'."""
    question = _text(row, "question", required=True)
    solution = _text(row, "answer")
    final = _final_line(_GSM8K_FINAL, solution)
    if final is None:
        raise _RowError("answer", "no '#### N' final line")
    gold = _gold_number(row, "answer", final.group(1))
    cot = _require(_CALCULATOR_NOTE.sub("", solution[: final.start()]).rstrip(), "answer", need_cot)
    return Example(row_id, question.strip(), cot, gold)


_INTEGRAL_DECIMAL = re.compile(r"(?<![\d.])(\d+)\.0+(?![\d.])")  # "29.0" -> "29"


def _unwrapped(expr: str) -> str:
    """"( ( a + b ) )" -> "a + b", but "( a ) + ( b )" unchanged: drops the parentheses that enclose
    the whole expression, in one pass (`expr` has single spaces)."""
    closes: dict[int, int] = {}  # index of each "(" -> index of its ")"
    opened: list[int] = []
    for i, char in enumerate(expr):
        if char == "(":
            opened.append(i)
        elif char == ")" and opened:
            closes[opened.pop()] = i
    start, end = 0, len(expr) - 1
    while start < end and expr[start] == "(" and closes.get(start) == end:
        start, end = start + 1, end - 1
        while start <= end and expr[start] == " ":
            start += 1
        while end >= start and expr[end] == " ":
            end -= 1
    return expr[start : end + 1]


def equation_cot(equation: str, answer: str) -> str:
    """SVAMP has no rationale: "( 29.0 * 7.0 )" with answer "203" -> "29 * 7 = 203"."""
    expr = _INTEGRAL_DECIMAL.sub(r"\1", _unwrapped(" ".join(equation.split())))
    return f"{expr} = {answer}"


def svamp_row(row: Mapping[str, Any], row_id: str, need_cot: bool = True) -> Example:
    """Original SVAMP: Body + Question, Equation (the CoT is made from it), Answer (a number)."""
    body = _text(row, "Body")
    ask = _text(row, "Question", required=True)
    equation = _require(_cot_text(row, "Equation", need_cot), "Equation", need_cot)
    answer = _gold_number(row, "Answer")
    question = " ".join(f"{body} {ask}".split())
    return Example(row_id, question, equation_cot(equation, answer) if equation.strip() else "", answer)


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


def _mathqa_parts(row: Mapping[str, Any], need_cot: bool) -> tuple[str, str, tuple[str, ...], int]:
    question = _text(row, "Problem", required=True)
    rationale = _cot_text(row, "Rationale", need_cot).strip()
    if len(rationale) >= 2 and rationale[0] == rationale[-1] == '"':
        rationale = rationale[1:-1].strip()
    _require(rationale, "Rationale", need_cot)
    options = _parse_options(_get(row, "options"))
    letter = _text(row, "correct").strip().lower()
    if len(letter) != 1 or letter not in "abcde"[: len(options)]:
        raise _RowError("correct", f"not an option letter a-{'abcde'[len(options) - 1]}", repr(letter))
    return question.strip(), rationale, options, "abcde".index(letter)


def mathqa_row(row: Mapping[str, Any], row_id: str, need_cot: bool = True) -> Example:
    """Official MathQA, multiple choice: answer is the letter, options kept in letter order."""
    question, rationale, options, index = _mathqa_parts(row, need_cot)
    return Example(row_id, question, rationale, "abcde"[index], options)


def mathqa_numeric_row(row: Mapping[str, Any], row_id: str, need_cot: bool = True) -> Example:
    """MathQA as a numeric problem: answer = the value of the correct option's text, read as one number
    ("5 : 9", "4 π", "3 and 4", "3 hr 20 min" are not one)."""
    question, rationale, options, index = _mathqa_parts(row, need_cot)
    text = options[index]
    value = parse_number(text)
    if value is None:
        raise _RowError("options", "correct option is not a single number", f"{'abcde'[index]}: {text!r}")
    return Example(row_id, question, rationale, format_number(value))


_Converter = Callable[[Mapping[str, Any], str, bool], Example]

# Per format: converter, id column, the column the CoT is read from, and our field keys -> that
# format's column names (the target of the `fields` mapping). svamp's question is two columns, so
# it takes no mapping.
_MATHQA_COLUMNS = {"question": "Problem", "cot": "Rationale", "options": "options", "answer": "correct"}
_FORMAT_SPECS: dict[str, tuple[_Converter, str | None, str, dict[str, str]]] = {
    "reft": (reft_row, "item_id", "answer_cot",
             {"question": "question", "cot": "answer_cot", "answer": "answer_value"}),
    "gsm8k": (gsm8k_row, None, "answer", {"question": "question", "answer": "answer"}),
    "svamp": (svamp_row, "ID", "Equation", {}),
    "mathqa": (mathqa_row, None, "Rationale", _MATHQA_COLUMNS),
    "mathqa-numeric": (mathqa_numeric_row, None, "Rationale", _MATHQA_COLUMNS),
}


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Origin:
    """The file (or dataset) a row came from."""

    label: str  # the path as given: in errors
    name: str  # the file name: in skip reports
    stem: str  # fallback ids are "{stem}-{N}"


@dataclass(frozen=True)
class _BadJson:
    message: str


_Rows = list[tuple[_Origin, str, Any]]  # (origin, "line N" / "item N" / "row N", row)
_SET_FORMAT = f"set --data_format to one of {FORMATS}"


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not data
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - data.rfind(b"\n", 0, error.start)
        raise DataError(f"{path} line {line}: not UTF-8 text (byte {data[error.start]:#04x} at byte column "
                        f"{column}); save the file as UTF-8") from None


def _read_file_rows(path: Path) -> _Rows:
    """Rows of one JSON/JSONL file; a JSONL line that is not JSON becomes a _BadJson row (skippable)."""
    try:
        text = _decode(path, path.read_bytes())
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    origin = _Origin(str(path), path.name, path.stem)
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
            return [(origin, f"item {i}", row) for i, row in enumerate(data)]
    rows: _Rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines are not rows
        try:
            rows.append((origin, f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            rows.append((origin, f"line {number}", _BadJson(f"invalid JSON at column {error.colno}: {error.msg}")))
    return rows


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.suffix.lower() in _FILE_SUFFIXES and p.is_file() and not p.name.startswith("."))


def _read_dir_rows(directory: Path) -> _Rows:
    """The rows of every .json/.jsonl file in `directory` (not its subdirectories), in name order."""
    files = _data_files(directory)
    if not files:
        raise DataError(f"{directory}: a directory without .json/.jsonl files, and not a saved Hugging Face "
                        "dataset (datasets' save_to_disk)")
    return [row for file in files for row in _read_file_rows(file)]


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_hf_rows(source: str | Path, split: str) -> _Rows:
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
            loaded = _load_hub_dataset(datasets, str(source), split)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFound, ConnectionError, ...)
        offline = None if path.exists() else hub_unreachable()
        how = ("" if path.exists() else f" ({cache_only_note(offline)})" if offline else
               " (no such local path, so it was looked up on the Hugging Face Hub)")
        raise DataError(f"{source}: cannot load Hugging Face dataset{how} (split {split!r}): {error}") from None
    if len(loaded) == 0:
        raise DataError(f"{source}: dataset split {split!r} is empty")
    name = path.name or str(source)
    origin = _Origin(str(source), name, name)
    return [(origin, f"row {i}", row) for i, row in enumerate(loaded)]


def _load_hub_dataset(datasets, name: str, split: str):
    """load_dataset of a Hub name; from the local cache only when the Hub cannot be reached (datasets' offline
    mode, switched on for this call alone: its local_files_only option still retries the network)."""
    if hub_unreachable() is None:
        return datasets.load_dataset(name, split=split)
    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, split=split)
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _read_rows(source: str | Path, fmt: str, split: str) -> _Rows:
    """The rows of a file, a directory of files, a saved dataset or (a name with the shape of an
    `owner/name` Hub id, or any name with fmt "hf") a Hugging Face Hub dataset."""
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return _read_hf_rows(path, split)
        if fmt == "hf" and _data_files(path):
            raise DataError(f"{source}: a directory of JSON/JSONL files, not a saved Hugging Face dataset: "
                            "set --data_format to auto or to the rows' format")
        return _read_hf_rows(path, split) if fmt == "hf" else _read_dir_rows(path)
    if path.exists():
        if fmt == "hf":
            raise DataError(f"{source}: a file; --data_format hf reads a saved dataset directory or a Hub name")
        return _read_file_rows(path)
    if is_hub_dataset(source, fmt):
        return _read_hf_rows(str(source), split)
    hint = "; a Hugging Face Hub dataset is named owner/name" if _named_like_a_dataset(path, fmt) else ""
    raise DataError(missing_path_message("data", str(source)) + hint)


def is_hub_dataset(source: str | Path, fmt: str = "auto") -> bool:
    """Whether `source` is read as a Hugging Face Hub dataset: it is not on disk and has a Hub name's shape
    (with fmt "auto" `owner/name`, not ending in .json/.jsonl; with fmt "hf" any Hub id)."""
    path = Path(source).expanduser()
    return _named_like_a_dataset(path, fmt) and not path.exists() and could_be_hub_id(str(source),
                                                                                       need_owner=fmt != "hf")


def _named_like_a_dataset(path: Path, fmt: str) -> bool:
    return fmt == "hf" or (fmt == "auto" and path.suffix.lower() not in _FILE_SUFFIXES)


def _detect_format(rows: _Rows, fields: Mapping[str, str] | None, label: str) -> str:
    """Infer the row format from the first recognisable JSON object (and `fields`, when given).

    Scanning past unrecognisable objects lets a broken first row be reported as a bad row (or
    skipped) instead of making the whole file undetectable.
    """
    objects = [(origin, where, row) for origin, where, row in rows if isinstance(row, dict)]
    if not objects:
        raise DataError(f"{label}: no JSON object to infer the format from; {_SET_FORMAT}")
    if fields:
        if "options" in fields:
            return "mathqa"
        if "cot" in fields:
            return "reft"
        golds = (row.get(fields.get("answer", "answer")) for _, _, row in objects)
        return "gsm8k" if any(isinstance(gold, str) and "####" in gold for gold in golds) else "reft"
    for _, _, row in objects:
        keys = set(row)
        if {"question", "answer_value"} <= keys or {"answer_cot", "answer_value"} <= keys:
            return "reft"  # the ReFT repo's test sets have no answer_cot
        if {"Body", "Equation"} <= keys:
            return "svamp"
        if {"Problem", "options"} <= keys:
            return "mathqa"
        if {"question", "answer"} <= keys:
            return "gsm8k"
    origin, where, first = objects[0]
    raise DataError(f"{origin.label} {where}: cannot infer the format from its fields {sorted(first)}; {_SET_FORMAT}")


# ----------------------------------------------------------------------------- the loop


def _rename(row: Mapping[str, Any], mapped: Mapping[str, str]) -> dict[str, Any]:
    """Rename the user's columns to the format's; a missing user column stays missing (no
    silent fallback to a column that happens to carry the format's own name)."""
    out = {key: value for key, value in row.items() if key not in mapped}
    out.update({target: row[column] for target, column in mapped.items() if column in row})
    return out


def _convert_rows(rows: _Rows, fmt: str, fields: Mapping[str, str] | None, *, label: str, skip_invalid: bool,
                  require_cot: bool) -> LoadResult:
    convert, id_key, cot_key, native = _FORMAT_SPECS[fmt]
    fields = dict(fields or {})
    if "id" in fields:
        id_key = None  # read below from the user's column
    mapped = {native[key]: column for key, column in fields.items() if key in native}
    # With a mapping but no cot column the data has no reference CoT: the format's own cot column
    # is dropped, never read in its place.
    no_cot_column = bool(fields) and "cot" in native and "cot" not in fields
    if no_cot_column and require_cot:
        raise DataError(f"{label}: fields maps no 'cot' column, and training needs the reference CoT of each row")
    cot_column = mapped.get(cot_key, cot_key)
    examples: list[Example] = []
    skipped: list[Skipped] = []
    seen: dict[str, str] = {}
    for origin, where, row in rows:
        try:
            if isinstance(row, _BadJson):
                raise _RowError(None, row.message)
            if not isinstance(row, dict):
                raise _RowError(None, f"expected a JSON object, got {_json_type(row)}")
            row_id = _row_id(row, fields.get("id", id_key), f"{origin.stem}-{where.split()[-1]}")
            if fields:
                row = _rename(row, mapped)
                if no_cot_column:
                    row.pop(native["cot"], None)
            example = convert(row, row_id, require_cot)
            if example.id in seen:
                detail = f"{example.id!r}, first at {seen[example.id]}"
                raise _RowError(fields.get("id", id_key), "duplicate id", detail)
        except _RowError as error:
            reason = error.reason(mapped)
            if not skip_invalid:
                raise DataError(f"{origin.label} {where}: {reason}") from None
            skipped.append(Skipped(f"{origin.name} {where}", reason))
            continue
        seen[example.id] = where if origin.label == label else f"{origin.name} {where}"
        source = f"{origin.label} {where}, field '{cot_column}'" if example.cot else ""
        examples.append(replace(example, cot_source=source, columns=row))
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
    require_cot: bool = True,
) -> LoadResult:
    """Read math problems from a file, a directory of files or a Hugging Face dataset into `Example`s.

    fmt: one of FORMATS or "auto" (from the first record's fields). A directory is a saved Hugging
        Face dataset if datasets wrote it, else its .json/.jsonl files in name order; a name that
        exists nowhere is a Hub dataset only if it reads `owner/name` (any name with fmt "hf").
    skip_invalid: bad rows go to `LoadResult.skipped` with location and reason instead of raising
        (file-level problems always raise, and so does a file whose every row is bad).
    split: the split of a Hugging Face dataset.
    fields: our keys (question, cot, answer, id, options) -> the source's column names, for data
        whose columns are named differently. Not supported for svamp (two-column question).
    require_cot: every row must have a reference CoT (training on it: SFT, self-training). False
        for data that needs only the question and the gold answer (evaluation, sampling, ReFT's
        questions); a row without one then has cot "".
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected 'auto' or one of {FORMATS}")
    _check_field_keys(fields)
    label = str(source)
    rows = _read_rows(source, fmt, split)
    row_fmt = _detect_format(rows, fields, label) if fmt in ("auto", "hf") else fmt
    _check_fields_apply(fields, row_fmt, label)
    return _convert_rows(rows, row_fmt, fields, label=label, skip_invalid=skip_invalid, require_cot=require_cot)


def examples_from_rows(rows, fmt: str = "auto", *, fields: dict[str, str] | None = None, require_cot: bool = True,
                       label: str = "dataset") -> list[Example]:
    """`load_examples` of rows held in memory: a list of dicts or a `datasets.Dataset` (its rows), read by the
    same rules and with the same messages, `label` naming them ("dataset row 3: ...")."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected 'auto' or one of {FORMATS}")
    _check_field_keys(fields)
    origin = _Origin(label, label, label)
    listed: _Rows = [(origin, f"row {i}", dict(row) if isinstance(row, Mapping) else row) for i, row in enumerate(rows)]
    if not listed:
        raise DataError(f"{label}: no rows")
    row_fmt = _detect_format(listed, fields, label) if fmt == "auto" else fmt
    _check_fields_apply(fields, row_fmt, label)
    return _convert_rows(listed, row_fmt, fields, label=label, skip_invalid=False, require_cot=require_cot).examples


def _check_field_keys(fields: Mapping[str, str] | None) -> None:
    unknown = set(fields or {}) - set(FIELD_KEYS)
    if unknown:
        raise DataError(f"fields: unknown keys {sorted(unknown)}; expected some of {FIELD_KEYS}")


def _check_fields_apply(fields: Mapping[str, str] | None, fmt: str, label: str) -> None:
    if fields:
        unusable = sorted(set(fields) - {"id", *_FORMAT_SPECS[fmt][3]})
        if unusable:  # e.g. options= for gsm8k: refuse rather than ignore the user's mapping
            raise DataError(f"{label}: fields {unusable} do not apply to the {fmt} format")
