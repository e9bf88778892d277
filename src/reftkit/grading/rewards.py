"""Reward functions: the paper's correctness reward and your own, with TRL's signature.

A reward function is called once per rollout batch as

    f(prompts=..., completions=..., completion_ids=..., grades=..., **columns) -> list[float | None]

`prompts` and `completions` are texts (one row per sampled completion, a question's k samples in a
row), `completion_ids` their token ids, `grades` what the run's grader read off each completion
(reftkit.grading.answers.Grade: the extracted answer, whether it is correct, a program's exit
status), and every dataset column arrives as a keyword argument holding one value per completion
(`answer`, `question`, `id` and the data file's own columns, e.g. `difficulty`). A function that
does not use an argument takes it in `**kwargs`, as TRL's do; TRL's reward functions run unchanged.
`None` means "no reward from this function for this completion". A completion's reward is the
weighted sum of the numbers it got (TRL's rule); one that got none from any function gets 0 and is
counted (`rewards_missing`).

The default is the paper's: `correctness` (1 for a correct final answer, `partial_reward` for an
answer that was read but is wrong, 0 for none). Programs of program CoT are run by the grader, in
the sandbox, before any reward function is called: a reward function sees their results, never
runs them.

A function that raises, returns the wrong number of values, or a value that is not a finite number or
None stops the run with a message naming the function and the completion.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reftkit.data.records import Example
from reftkit.grading.answers import Grade, reward_from_grade

RewardFunction = Callable[..., Sequence[float | None]]
_CALL_ARGUMENTS = ("prompts", "completions", "completion_ids", "grades")  # a data column never shadows these


class RewardError(ValueError):
    """A reward function failed or returned what cannot be a reward; the message names it and the completion."""


def correctness(prompts, completions, grades: Sequence[Grade], correct_reward: float = 1.0,
                partial_reward: float = 0.1, **kwargs) -> list[float]:
    """The paper's reward: correct -> correct_reward, an answer read but wrong -> partial_reward, none -> 0."""
    return [reward_from_grade(g, correct_reward, partial_reward) for g in grades]


BUILT_IN: dict[str, RewardFunction] = {"correctness": correctness}


def resolve_reward(spec: str | RewardFunction) -> RewardFunction:
    """A callable, a built-in name (`correctness`) or `module:function` (the module importable from here)."""
    if callable(spec):
        return spec
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise RewardError(f"reward {spec!r}: expected a built-in name ({', '.join(BUILT_IN)}) or module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RewardError(f"reward {spec!r}: cannot import {module_name!r} ({error})") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {module_name} has no callable {attribute!r}")
    return fn


def reward_name(fn: RewardFunction) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


@dataclass
class RewardBatch:
    """The rewards of one rollout batch: the weighted total per completion, and per function the sum and
    the count of its numbers (for its mean over all processes) and the completions no function rewarded."""

    totals: list[float]
    sums: dict[str, float]
    counts: dict[str, int]
    missing: int


class Rewards:
    """The run's reward functions and their weights (all 1 by default)."""

    def __init__(self, functions: Sequence[str | RewardFunction] = ("correctness",),
                 weights: Sequence[float] | None = None, *, correct_reward: float = 1.0, partial_reward: float = 0.1):
        self.functions = [resolve_reward(f) for f in functions] or [correctness]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.functions)
        if len(self.weights) != len(self.functions):
            raise RewardError(f"reward_weights: {len(self.weights)} weights for {len(self.functions)} reward functions")
        names = [reward_name(f) for f in self.functions]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        self.paper = {"correct_reward": correct_reward, "partial_reward": partial_reward}
        self.custom = self.functions != [correctness] or self.weights != [1.0]  # more than the paper's reward

    def score(self, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
              examples: Sequence[Example], grades: Sequence[Grade]) -> RewardBatch:
        """Every function on the batch (one row per completion; `examples[i]` is completion i's question)."""
        n = len(completions)
        columns = example_columns(examples)
        totals, got = [0.0] * n, [False] * n
        sums, counts = {}, {}
        for fn, name, weight in zip(self.functions, self.names, self.weights, strict=True):
            extra = self.paper if fn is correctness else {}
            kwargs = {"completion_ids": list(completion_ids), "grades": list(grades), **columns, **extra}
            values = _call(fn, name, prompts, completions, kwargs, examples)
            if len(values) != n:
                raise RewardError(f"reward function {name} returned {len(values)} values for {n} completions")
            sums[name], counts[name] = 0.0, 0
            for i, value in enumerate(values):
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                    raise RewardError(f"reward function {name} returned {value!r} for completion {i} (question "
                                      f"{examples[i].id!r}: {_preview(completions[i])}): a reward is a finite number "
                                      "or None")
                totals[i] += weight * float(value)
                got[i] = True
                sums[name] += float(value)
                counts[name] += 1
        return RewardBatch(totals, sums, counts, got.count(False))


def _call(fn, name, prompts, completions, kwargs, examples) -> list:
    """fn's values as a list; when it raises, the first completion it raises on alone is named."""
    try:  # keywords, as TRL calls them: f(prompts=..., completions=..., **kwargs)
        return list(fn(prompts=list(prompts), completions=list(completions), **kwargs))
    except Exception as error:  # noqa: BLE001 -- any failure of user code stops the run, named
        culprit = None
        for i in range(len(completions)):
            one = {k: [v[i]] if isinstance(v, list) and len(v) == len(completions) else v for k, v in kwargs.items()}
            try:
                fn(prompts=[prompts[i]], completions=[completions[i]], **one)
            except Exception:  # noqa: BLE001
                culprit = i
                break
        where = (f"on completion {culprit} (question {examples[culprit].id!r}: {_preview(completions[culprit])})"
                 if culprit is not None else "on the batch (no single completion raises alone)")
        raise RewardError(f"reward function {name} raised {type(error).__name__}: {error} {where}") from error


def example_columns(examples: Sequence[Example]) -> dict[str, list]:
    """One list per column, a value per completion: the record's fields and the data's own columns (None where
    a row lacks one)."""
    names: dict[str, None] = {"id": None, "question": None, "answer": None, "options": None, "cot": None}
    for ex in examples:
        names.update(dict.fromkeys(k for k in ex.columns if k not in _CALL_ARGUMENTS))
    return {name: [_column(ex, name) for ex in examples] for name in names}


def _column(ex: Example, name: str):
    if name in ("id", "question", "answer", "options", "cot"):
        return getattr(ex, name)
    return ex.columns.get(name)


def _preview(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")
