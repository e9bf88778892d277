"""Inference over k samples per question: majority voting, pass@k and reranking. Pure functions.

Rules (each tested in tests/test_voting.py):

* Only samples with an extracted answer vote; a question where none has one gets no answer (wrong).
* Numeric answers are grouped with the reward's equality (`same_answer`: exact between integers and
  fractions, else within `tol`): a sample joins the first group (in sample order) whose first member
  equals it, else it opens a new group. Grouping against a fixed representative keeps groups
  from drifting (a chain 1.00, 1.01, 1.02 is two groups, not one). Option letters group by equality, ignoring case.
* The largest group wins; a tie goes to the group whose first member came first in sample order.
  Sample order is the order of generation, so the rule is deterministic and needs no RNG.
* The vote's answer is the winning group's first member: its correctness is that sample's.
* pass@k: some sample is correct. rerank@k: the highest-scored sample; ties go to the earliest.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Sequence

from reftkit.data.numbers import parse_number
from reftkit.grading.answers import same_answer


def answer_groups(answers: Sequence[str | None], tol: float = 1e-2, multiple_choice: bool = False) -> list[list[int]]:
    """Indices of the samples in each answer group, groups in order of their first member.

    Numeric answers are looked up among the first members by value (a sorted list), so that k
    samples with many distinct answers cost about k log k, not k times the number of groups; the
    rule is unchanged: `same_answer` decides, and the earliest group it accepts wins."""
    groups: list[list[int]] = []
    firsts: list[tuple[float, int]] = []  # (value of a group's first member, group number), sorted
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        if multiple_choice:  # a handful of letters: few groups to scan
            candidates = range(len(groups))
        else:
            number = parse_number(answer)
            if number is None:  # equal to nothing (same_answer): a group of its own
                groups.append([i])
                continue
            value = float(number)  # only to find candidates: same_answer compares exactly
            # Wider than the tolerance (float rounding), so every group same_answer accepts is among them.
            reach = 2 * tol + 1e-6 + abs(value) * 1e-12
            found = firsts[bisect_left(firsts, (value - reach, -1)): bisect_right(firsts, (value + reach, len(groups)))]
            candidates = sorted(g for _, g in found)
        home = next((g for g in candidates if same_answer(answers[groups[g][0]], answer, tol, multiple_choice)), None)
        if home is None:
            if not multiple_choice:
                insort(firsts, (value, len(groups)))
            groups.append([i])
        else:
            groups[home].append(i)
    return groups


def majority_vote(answers: Sequence[str | None], tol: float = 1e-2, multiple_choice: bool = False) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer."""
    groups = answer_groups(answers, tol, multiple_choice)
    if not groups:
        return None
    # max() keeps the first of equal keys, and groups are ordered by first appearance: the tie rule.
    return max(groups, key=len)[0]


def rerank(scores: Sequence[float]) -> int | None:
    """Index of the highest-scored sample (earliest on ties), or None for no samples."""
    if not scores:
        return None
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def pass_at_k(correct: Sequence[bool]) -> bool:
    return any(correct)
