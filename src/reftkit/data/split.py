"""A dev split that does not leak: whole clusters of near-duplicate questions on one side.

Math training files hold many variants of one question (SVAMP: the same story with other numbers or
one changed clause). A random dev split then has a near-copy of most dev questions in training, and
rewards memorising the annotated CoTs (what continued SFT does) over reasoning (what RL trains).
Here questions are compared as sets of words with every number masked; two questions at Jaccard
similarity >= `threshold` are near-duplicates, and near-duplicates chained together form one cluster
that goes to dev or to train whole. So every dev question's nearest training question is below the
threshold, and `similarity_profile` reports how far below.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reftkit.data.records import Example

_NUMBER = re.compile(r"\b\d+(?:[.,]\d+)*\b")
_BLOCK = 1024  # rows of the similarity matrix in memory at once: memory grows with n, not n^2


def question_words(question: str) -> frozenset[str]:
    """The question's words, lower-cased, every number replaced by one mask word."""
    return frozenset(_NUMBER.sub(" <num> ", question.lower()).split())


def _incidence(word_sets: Sequence[frozenset[str]], vocab: dict[str, int]) -> np.ndarray:
    """[n, |vocab|] 0/1 matrix of which words each question has (words outside vocab ignored)."""
    out = np.zeros((len(word_sets), len(vocab)), dtype=np.float32)
    for row, words in enumerate(word_sets):
        out[row, [vocab[w] for w in words if w in vocab]] = 1.0
    return out


def _jaccard_blocks(a: Sequence[frozenset[str]], b: Sequence[frozenset[str]]):
    """Yields (first row, [rows, len(b)] Jaccard similarities) of every question of `a` to every one of `b`."""
    vocab = {w: i for i, w in enumerate(sorted(set().union(*a, *b)))}
    left, right = _incidence(a, vocab), _incidence(b, vocab)
    right_sizes = right.sum(1)
    for start in range(0, len(a), _BLOCK):
        block = left[start : start + _BLOCK]
        inter = block @ right.T  # exact: counts of shared words, small integers in float32
        union = block.sum(1)[:, None] + right_sizes[None, :] - inter
        yield start, np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def near_duplicate_clusters(questions: Sequence[str], threshold: float) -> list[list[int]]:
    """Indices of `questions` grouped into clusters: connected components of the pairs at Jaccard
    similarity >= threshold. Clusters in order of their first member; members ascending."""
    words = [question_words(q) for q in questions]
    parent = list(range(len(words)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start, sims in _jaccard_blocks(words, words):
        for i, j in zip(*np.nonzero(sims >= threshold), strict=True):
            a, b = root(start + int(i)), root(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    clusters: dict[int, list[int]] = {}
    for i in range(len(words)):
        clusters.setdefault(root(i), []).append(i)
    return list(clusters.values())


@dataclass(frozen=True)
class SplitProfile:
    """How close each dev question comes to training: the Jaccard similarity to its nearest
    training question (words, numbers masked), summarised."""

    threshold: float
    clusters: int
    largest_cluster: int
    median_nearest: float
    p90_nearest: float
    max_nearest: float
    share_at_or_above_0_8: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def nearness(nearest: np.ndarray) -> dict[str, float]:
    """The summary of `nearest_similarity`'s values that a split's profile reports."""
    return {"median_nearest": float(np.median(nearest)), "p90_nearest": float(np.quantile(nearest, 0.9)),
            "max_nearest": float(nearest.max()), "share_at_or_above_0_8": float((nearest >= 0.8).mean())}


def nearest_similarity(dev: Sequence[str], train: Sequence[str]) -> np.ndarray:
    """[len(dev)] the Jaccard similarity of each dev question to its nearest training question."""
    dev_words, train_words = [question_words(q) for q in dev], [question_words(q) for q in train]
    out = np.zeros(len(dev_words), dtype=np.float32)
    for start, sims in _jaccard_blocks(dev_words, train_words):
        out[start : start + len(sims)] = sims.max(1)
    return out


def cluster_split(examples: Sequence[Example], n_dev: int, seed: int, threshold: float = 0.8,
                  ) -> tuple[list[Example], list[Example], SplitProfile]:
    """(train, dev, profile): whole near-duplicate clusters drawn at random (seeded) into dev until it
    holds at least `n_dev` questions; every other example trains, in file order."""
    if not 0 < n_dev < len(examples):
        raise ValueError(f"n_dev must be between 1 and the {len(examples)} examples, got {n_dev}")
    clusters = near_duplicate_clusters([e.question for e in examples], threshold)
    order = list(range(len(clusters)))
    random.Random(seed).shuffle(order)
    dev_rows: set[int] = set()
    for c in order:
        if len(dev_rows) >= n_dev:
            break
        dev_rows.update(clusters[c])
    dev = [e for i, e in enumerate(examples) if i in dev_rows]
    train = [e for i, e in enumerate(examples) if i not in dev_rows]
    nearest = nearest_similarity([e.question for e in dev], [e.question for e in train])
    profile = SplitProfile(threshold, len(clusters), max(map(len, clusters)), **nearness(nearest))
    return train, dev, profile
