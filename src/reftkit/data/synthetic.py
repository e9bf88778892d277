"""Synthetic multi-step arithmetic word problems for the built-in demo.

Each problem follows one person's count of one item through 2-4 events (gains, losses,
multiplications, bulk purchases). The reference chain of thought states one equation per
event, so the difficulty is the arithmetic a tiny model must learn, as in GSM8K.
Annotators vary: the generator picks one of several phrasings and operand orders per step,
so one question's single reference CoT is only one of several valid reasoning paths.
"""

from __future__ import annotations

import random

from reftkit.data.records import Example

NAMES = ["Ava", "Ben", "Mia", "Leo", "Zoe", "Sam", "Ivy", "Max", "Lily", "Omar", "Nina", "Ravi"]
PRONOUN = {n: ("she" if n in {"Ava", "Mia", "Zoe", "Ivy", "Lily", "Nina"} else "he") for n in NAMES}
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells", "stamps", "cookies"]
CONTAINERS = ["bags", "boxes", "packs", "jars"]


def _step(rng: random.Random, name: str, item: str, total: int) -> tuple[str, str, int]:
    """One event: (question sentence, reasoning sentence, new total)."""
    he = PRONOUN[name]
    kind = rng.choice(["gain", "gain", "loss", "loss", "times", "bulk"])
    if kind == "loss" and total < 4:
        kind = "gain"
    if kind == "times" and total > 60:
        kind = "loss"
    if kind == "gain":
        n = rng.randint(2, 49)
        verb = rng.choice(["buys", "finds", "gets", "wins"])
        eq = f"{total} + {n}" if rng.random() < 0.5 else f"{n} + {total}"
        new = total + n
        q = f"{he.capitalize()} {verb} {n} more {item}."
        r = rng.choice([f"{eq} = {new}", f"{he.capitalize()} {verb} {n}, so {eq} = {new}"])
        return q, r, new
    if kind == "loss":
        n = rng.randint(1, total - 1)
        verb = rng.choice(["gives away", "loses", "sells", "uses"])
        q = f"{he.capitalize()} {verb} {n} {item}."
        r = rng.choice([f"{total} - {n} = {total - n}", f"After that {total} - {n} = {total - n} are left"])
        return q, r, total - n
    if kind == "times":
        k = rng.randint(2, 4)
        word = {2: "doubles", 3: "triples", 4: "quadruples"}[k]
        eq = f"{total} * {k}" if rng.random() < 0.5 else f"{k} * {total}"
        q = f"Then {he} {word} {he == 'she' and 'her' or 'his'} {item}."
        return q, f"{eq} = {total * k}", total * k
    bags, per = rng.randint(2, 9), rng.randint(2, 12)
    box = rng.choice(CONTAINERS)
    q = f"{he.capitalize()} buys {bags} {box} with {per} {item} in each."
    r = f"{bags} * {per} = {bags * per} {item} in the {box}, and {total} + {bags * per} = {total + bags * per}"
    return q, r, total + bags * per


def make_problem(rng: random.Random, index: int, prefix: str = "synth") -> Example:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(5, 60)
    question = [f"{name} has {total} {item}."]
    reasoning = [f"{name} starts with {total} {item}."]
    for _ in range(rng.randint(2, 4)):
        q, r, total = _step(rng, name, item, total)
        question.append(q)
        reasoning.append(r + ".")
    question.append(f"How many {item} does {name} have now?")
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
