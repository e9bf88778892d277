"""Majority voting, pass@k and reranking over k samples: the rules in reftkit/grading/voting.py."""

from reftkit.commands.sample import summarize
from reftkit.data.records import Example
from reftkit.grading.voting import answer_groups, majority_vote, pass_at_k, rerank


def test_majority_wins():
    assert majority_vote(["3", "5", "5", "3", "5"]) == 1  # "5" (3 votes); its first sample is #1


def test_tie_goes_to_the_answer_seen_first():
    assert majority_vote(["7", "4", "4", "7"]) == 0
    assert majority_vote(["4", "7", "7", "4"]) == 0
    assert majority_vote([None, "9", "8"]) == 1


def test_numeric_answers_group_within_the_reward_tolerance():
    assert answer_groups(["2", "2.005", "3", "1.999"]) == [[0, 1, 3], [2]]
    assert majority_vote(["3", "2", "2.004", "3.5"]) == 1  # 2 and 2.004 are one answer with two votes
    # Groups compare with their first member, so a chain does not drift into one group.
    assert answer_groups(["1.00", "1.01", "1.02"]) == [[0, 1], [2]]
    assert answer_groups(["1", "1.5"], tol=1.0) == [[0, 1]]


def test_missing_answers_do_not_vote():
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    assert majority_vote([None, "2", None, "3", "3"]) == 3


def test_option_letters_group_by_letter_ignoring_case():
    assert answer_groups(["a", "B", "b", "A", "a"], multiple_choice=True) == [[0, 3, 4], [1, 2]]


def test_pass_at_k_and_rerank():
    assert pass_at_k([False, True]) and not pass_at_k([False, False]) and not pass_at_k([])
    assert rerank([0.1, 0.9, -2.0]) == 1
    assert rerank([0.5, 0.5, 0.2]) == 0  # tie: earliest
    assert rerank([]) is None


def _rows(index, answers, gold, scores=None):
    rows = []
    for j, a in enumerate(answers):
        row = {"index": index, "sample": j, "extracted": a, "correct": a is not None and float(a) == float(gold)}
        rows.append(row | ({"score": scores[j]} if scores else {}))
    return rows


def test_summarize_counts_vote_pass_and_rerank_per_question():
    examples = [Example("q0", "?", "", "5"), Example("q1", "?", "", "2"), Example("q2", "?", "", "1")]
    rows = (_rows(0, ["5", "5", "4"], "5", [0.0, 0.1, 0.9])  # vote right, rerank wrong
            + _rows(1, ["3", "3", "2"], "2", [0.0, 0.1, 0.9])  # vote wrong, rerank right, pass
            + _rows(2, [None, None, None], "1", [0.0, 0.0, 0.0]))  # nothing extracted: all wrong
    s = summarize(rows, examples)
    assert s["k"] == 3 and s["questions"] == 3
    assert s["vote_accuracy"] == 1 / 3 and s["rerank_accuracy"] == 1 / 3 and s["pass_accuracy"] == 2 / 3
    assert s["sample_accuracy"] == 3 / 9
    assert "rerank_accuracy" not in summarize([{k: v for k, v in r.items() if k != "score"} for r in rows], examples)


def _grouped_by_scanning(answers, tol=1e-2, multiple_choice=False):
    """The rule as the module states it: join the first group whose first member is the same answer."""
    from reftkit.grading.answers import same_answer

    groups = []
    for i, answer in enumerate(answers):
        if answer is not None:
            home = next((g for g in groups if same_answer(answers[g[0]], answer, tol, multiple_choice)), None)
            groups.append([i]) if home is None else home.append(i)
    return groups


def test_grouping_many_answers_follows_the_rule_without_comparing_each_to_every_group(monkeypatch):
    """k samples with many distinct answers were once compared each with every group (k x groups);
    the groups are the rule's, and the comparisons stay a few per sample."""
    import random

    from reftkit.grading import voting

    rng = random.Random(0)
    pool = ["2", "2.005", "1.999", "2.01", "-3", "0", "1e-05", "0.00001", "abc", "1000000", "999999.995", "7/2"]
    for tol in (1e-2, 0.0, 1.0):
        answers = [rng.choice(pool + [None, str(round(rng.uniform(-5, 5), 3))]) for _ in range(400)]
        assert answer_groups(answers, tol) == _grouped_by_scanning(answers, tol)
    calls = []
    real = voting.same_answer
    monkeypatch.setattr(voting, "same_answer", lambda *a: calls.append(1) or real(*a))
    distinct = [str(i) for i in range(5000)]
    assert answer_groups(distinct) == [[i] for i in range(5000)]
    assert len(calls) <= 3 * len(distinct)  # scanning: 5000 * 4999 / 2 comparisons
