"""Result files, each written whole or not at all (a temporary file, then a rename)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from reftkit.data.records import Example


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON line per row; a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def write_json(path: Path, data: dict) -> None:
    """A JSON document (a stage's marker file, a run's identity): whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def write_examples(path: Path, examples: Iterable[Example]) -> None:
    """Examples as a reft-format JSONL file (what `--data_format reft` reads back)."""
    write_jsonl(path, ({"item_id": e.id, "question": e.question, "answer_cot": e.cot, "answer_value": e.answer}
                       for e in examples))
