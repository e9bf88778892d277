"""Synthetic multi-step arithmetic word problems for the built-in demo.

Each problem follows one person's count of one item through 2-3 events (gains, losses,
doubling/tripling). The reference chain of thought is one equation per event, so what a tiny
model must learn is reading the events and doing the arithmetic, as in GSM8K. Annotators vary:
the generator picks the operand order of + and * at random, so a question's single reference
CoT is only one of several valid reasoning paths.
"""

from __future__ import annotations

import random

from reftkit.data.records import Example

NAMES = ["Ava", "Ben", "Mia", "Leo", "Zoe", "Sam", "Ivy", "Max", "Lily", "Omar", "Nina", "Ravi"]
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells", "stamps", "cookies"]
GAINS = ["Then buys", "Then finds", "Then gets", "Then wins"]
LOSSES = ["Then gives away", "Then loses", "Then sells", "Then eats"]
TIMES = {2: "Then doubles", 3: "Then triples"}


def _step(rng: random.Random, total: int) -> tuple[str, str, int]:
    """One event: (question sentence, reasoning line, new total)."""
    kind = rng.choice(["gain", "loss", "times"] if total <= 20 else ["gain", "loss", "loss"])
    if kind == "loss" and total < 3:
        kind = "gain"
    if kind == "gain":
        n = rng.randint(2, 19)
        eq = f"{total} + {n}" if rng.random() < 0.5 else f"{n} + {total}"
        return f"{rng.choice(GAINS)} {n} more.", f"{eq} = {total + n}", total + n
    if kind == "loss":
        n = rng.randint(1, min(total - 1, 19))
        return f"{rng.choice(LOSSES)} {n}.", f"{total} - {n} = {total - n}", total - n
    k = rng.randint(2, 3)
    eq = f"{total} * {k}" if rng.random() < 0.5 else f"{k} * {total}"
    return f"{TIMES[k]} them.", f"{eq} = {total * k}", total * k


def make_problem(rng: random.Random, index: int, prefix: str = "synth") -> Example:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, 30)
    question, reasoning = [f"{name} has {total} {item}."], []
    for _ in range(rng.randint(2, 3)):
        q, r, total = _step(rng, total)
        question.append(q)
        reasoning.append(r)
    question.append(f"How many {item} now?")
    return Example(id=f"{prefix}-{index}", question=" ".join(question), cot="\n".join(reasoning), answer=str(total))


def make_splits(n_train: int, n_test: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """A training set and a test set with no question in common (deterministic in seed)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[Example]] = []
    for name, size in (("train", n_train), ("test", n_test)):
        split: list[Example] = []
        while len(split) < size:
            ex = make_problem(rng, len(split), prefix=f"synth-{name}")
            if ex.question not in seen:
                seen.add(ex.question)
                split.append(ex)
        splits.append(split)
    return splits[0], splits[1]
