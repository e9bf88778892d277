"""The demo's problem generator: deterministic, disjoint splits, reference CoTs that add up."""

import re

from reftkit.data.synthetic import MAX_TOTAL, make_splits


def cot_result(cot: str) -> int:
    """Checks every equation of a reference CoT and returns the last result."""
    result = None
    for line in cot.splitlines():
        expr, value = line.split(" = ")
        assert re.fullmatch(r"[\d\s()+\-*]+", expr), line
        tokens = re.findall(r"\d+|[()+\-*]", expr)
        assert eval_tokens(tokens) == int(value), line
        result = int(value)
    return result


def eval_tokens(tokens):
    """Left-to-right + and -, * binding tighter, parentheses: enough for the generator's grammar."""
    def term(i):
        val, i = atom(i)
        while i < len(tokens) and tokens[i] == "*":
            rhs, i = atom(i + 1)
            val *= rhs
        return val, i

    def atom(i):
        if tokens[i] == "(":
            val, i = expr(i + 1)
            return val, i + 1
        return int(tokens[i]), i + 1

    def expr(i):
        val, i = term(i)
        while i < len(tokens) and tokens[i] in "+-":
            rhs, j = term(i + 1)
            val = val + rhs if tokens[i] == "+" else val - rhs
            i = j
        return val, i

    return expr(0)[0]


def test_splits_are_deterministic_and_disjoint():
    train, test = make_splits(300, 100, seed=5)
    again, _ = make_splits(300, 100, seed=5)
    assert train == again
    assert len(train) == 300 and len(test) == 100
    assert not {e.question for e in train} & {e.question for e in test}
    assert len({e.id for e in train + test}) == 400
    assert make_splits(300, 100, seed=6)[0] != train


def test_reference_cots_are_correct_and_both_styles_occur():
    train, test = make_splits(500, 100, seed=0)
    for ex in train + test:
        assert cot_result(ex.cot) == int(ex.answer), ex
        assert 1 <= int(ex.answer) <= MAX_TOTAL  # every count stays in 1..MAX_TOTAL
    one_line = sum("\n" not in e.cot for e in train)
    assert 0.4 < one_line / len(train) < 0.6  # includes 1-event-per-line CoTs only in stepwise
    only_stepwise, _ = make_splits(200, 10, seed=0, one_line_fraction=0.0)
    assert all(len(e.cot.splitlines()) >= 2 for e in only_stepwise)
