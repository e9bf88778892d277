"""The one record every reader produces and every trainer consumes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One math problem.

    answer: the gold answer as text. For numeric problems it parses as a float ("72", "0.5");
        for multiple choice it is the option letter ("a".."e").
    options: option texts in letter order for multiple choice (("24", "120", ...)), else None.
    cot: the reference chain of thought without the final "Therefore, the answer is" line;
        empty when the source has none (evaluation-only data).
    cot_source: where the cot was read, as messages name it ("train.jsonl line 3, field 'answer'");
        empty for examples made in code. Not part of equality.
    columns: the source row as read (every column, the data's own included), for reward functions
        (reftkit.grading.rewards); empty for examples made in code. Not part of equality.
    """

    id: str
    question: str
    cot: str
    answer: str
    options: tuple[str, ...] | None = None
    cot_source: str = field(default="", compare=False, repr=False)
    columns: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_multiple_choice(self) -> bool:
        return self.options is not None
