"""Synthetic multi-step arithmetic word problems for the built-in demo.

Each problem follows one person's count of one item through 3-4 events (gains, losses,
doubling/tripling; counts stay in 1-20), as in GSM8K's simpler problems. Like real annotations, the reference chains
of thought come from two "annotator" styles, one picked per question:

- stepwise: one equation per event (`3 * 3 = 9`, `9 - 8 = 1`, `2 * 1 = 2`), operand order varying;
- one-line: the whole computation as one expression (`(3 * 3 - 8) * 2 = 2`).

Both are correct, but the one-line style asks a small model to do several operations in a
single step, so it fails far more often. SFT imitates the mixture; ReFT's reward can teach the
policy which of the paths it has seen actually reaches right answers. That is the paper's
premise (one annotated CoT per question is one of many valid paths), made visible at demo scale.

Program CoT (`cot="program"`) has the same two annotators: one writes a line of code per event
(`coins = coins + 4`), the other works all but the last event out by hand and writes the
result as a constant (`coins = 31`), which the model then has to compute in its head.
"""

from __future__ import annotations

import operator
import random

from reftkit.data.records import Example
from reftkit.grading.cot import CotStyle, program_header

NAMES = ["Ava", "Ben", "Mia", "Leo", "Zoe", "Sam", "Ivy", "Max", "Lily", "Omar", "Nina", "Ravi"]
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells", "stamps", "cookies"]
GAINS = ["Then buys", "Then finds", "Then gets", "Then wins"]
LOSSES = ["Then gives away", "Then loses", "Then sells", "Then eats"]
TIMES = {2: "Then doubles", 3: "Then triples"}
APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}
EVENTS = (3, 4)  # events per problem (min, max)
START = (2, 12)  # first count (min, max)
MAX_TOTAL, MAX_OPERAND = 20, 5
Op = tuple[str, int]  # ("+", 5): one event's operator and operand


def _step(rng: random.Random, total: int) -> tuple[str, Op, int]:
    """One event: (question sentence, operator and operand, new total). Totals stay in 1..MAX_TOTAL,
    so the arithmetic a step needs is a small table a tiny model learns completely."""
    kinds = ["gain"] * (total < MAX_TOTAL) + ["loss"] * (total > 1) + ["times"] * (2 * total <= MAX_TOTAL)
    kind = rng.choice(kinds)
    if kind == "gain":
        n = rng.randint(1, min(MAX_OPERAND, MAX_TOTAL - total))
        return f"{rng.choice(GAINS)} {n} more.", ("+", n), total + n
    if kind == "loss":
        n = rng.randint(1, min(MAX_OPERAND, total - 1))
        return f"{rng.choice(LOSSES)} {n}.", ("-", n), total - n
    k = rng.randint(2, 3) if 3 * total <= MAX_TOTAL else 2
    return f"{TIMES[k]} them.", ("*", k), total * k


def stepwise_cot(start: int, ops: list[Op], rng: random.Random) -> str:
    """One equation per event; operand order of + and * varies as between annotators."""
    lines, total = [], start
    for sym, n in ops:
        new = APPLY[sym](total, n)
        swap = sym in "+*" and rng.random() < 0.5
        lines.append(f"{n} {sym} {total} = {new}" if swap else f"{total} {sym} {n} = {new}")
        total = new
    return "\n".join(lines)


def one_line_cot(start: int, ops: list[Op]) -> str:
    """The whole computation as one expression, e.g. `(3 * 3 - 8) * 2 = 2`."""
    expr, total = str(start), start
    for sym, n in ops:
        if sym == "*" and any(c in expr for c in "+-"):
            expr = f"({expr})"
        expr, total = f"{expr} {sym} {n}", APPLY[sym](total, n)
    return f"{expr} = {total}"


def stepwise_program(item: str, start: int, ops: list[Op]) -> str:
    """One line of code per event: the program does the arithmetic."""
    lines = [f"{item} = {start}"] + [f"{item} = {item} {sym} {n}" for sym, n in ops]
    return "\n".join(f"    {line}" for line in [*lines, f"result = {item}", "return result"])


def hand_computed_program(item: str, start: int, ops: list[Op]) -> str:
    """All but the last event worked out by hand: the constant is mental arithmetic."""
    total = start
    for sym, n in ops[:-1]:
        total = APPLY[sym](total, n)
    sym, n = ops[-1]
    return "\n".join(f"    {line}" for line in [f"{item} = {total}", f"result = {item} {sym} {n}", "return result"])


def make_problem(rng: random.Random, index: int, prefix: str = "synth", one_line_fraction: float = 0.5,
                 cot: CotStyle = "natural") -> Example:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = total = rng.randint(*START)
    question, ops = [f"{name} has {total} {item}."], []
    for _ in range(rng.randint(*EVENTS)):
        q, op, total = _step(rng, total)
        question.append(q)
        ops.append(op)
    question.append(f"How many {item} now?")
    one_line = rng.random() < one_line_fraction
    text = " ".join(question)
    if cot == "program":
        body = hand_computed_program(item, start, ops) if one_line else stepwise_program(item, start, ops)
        reference = program_header(text) + body
    else:
        reference = one_line_cot(start, ops) if one_line else stepwise_cot(start, ops, rng)
    return Example(id=f"{prefix}-{index}", question=text, cot=reference, answer=str(total))


def make_splits(
    n_train: int, n_test: int, seed: int = 0, one_line_fraction: float = 0.5, cot: CotStyle = "natural"
) -> tuple[list[Example], list[Example]]:
    """A training set and a test set with no question in common (deterministic in seed)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[Example]] = []
    for name, size in (("train", n_train), ("test", n_test)):
        split: list[Example] = []
        while len(split) < size:
            ex = make_problem(rng, len(split), f"synth-{name}", one_line_fraction, cot)
            if ex.question not in seen:
                seen.add(ex.question)
                split.append(ex)
        splits.append(split)
    return splits[0], splits[1]
