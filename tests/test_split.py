"""The leak-free dev split: near-duplicate questions (numbers masked) stay on one side."""

import numpy as np
import pytest

from reftkit.data.records import Example
from reftkit.data.split import cluster_split, near_duplicate_clusters, nearest_similarity, question_words


def test_numbers_are_masked_and_case_ignored():
    assert question_words("Tom has 3 apples and 1,250.5 pears") == question_words("tom has 12 apples and 7 pears")
    assert question_words("a b") != question_words("a c")


def test_jaccard_by_hand():
    # {a b c d} vs {a b c e}: 3 shared of 5 -> 0.6; identical after masking -> 1; disjoint -> 0
    sims = nearest_similarity(["a b c d", "x 1 y", "q"], ["a b c e", "x 22 y", "z"])
    assert np.allclose(sims, [0.6, 1.0, 0.0])


def test_clusters_are_connected_components_of_near_duplicates():
    questions = [
        "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10",  # 0
        "w1 w2 w3 w4 w5 w6 w7 w8 w9 x10",  # 1: 9/11 = 0.82 to 0
        "w1 w2 w3 w4 w5 w6 w7 w8 y9 x10",  # 2: 0.82 to 1, 8/12 = 0.67 to 0: joins through 1
        "completely different words here",  # 3
        "Tom has 5 apples",  # 4
        "tom has 9 apples",  # 5: the same question with another number
    ]
    clusters = near_duplicate_clusters(questions, threshold=0.8)
    assert sorted(clusters) == [[0, 1, 2], [3], [4, 5]]
    assert sorted(near_duplicate_clusters(questions, threshold=0.85)) == [[0], [1], [2], [3], [4, 5]]


def _examples(n_stories: int, variants: int) -> list[Example]:
    rng = np.random.default_rng(0)
    out = []
    for s in range(n_stories):
        words = [f"s{s}w{i}" for i in range(12)]
        for v in range(variants):
            q = " ".join(words) + f" with {rng.integers(1, 99)} items"
            out.append(Example(f"{s}-{v}", q, "cot", "1"))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_split_keeps_every_variant_on_one_side(seed):
    examples = _examples(40, 3)
    train, dev, profile = cluster_split(examples, n_dev=20, seed=seed)
    assert 20 <= len(dev) <= 22 and len(train) + len(dev) == len(examples)
    assert {e.id for e in train}.isdisjoint(e.id for e in dev)
    dev_stories, train_stories = {e.id.split("-")[0] for e in dev}, {e.id.split("-")[0] for e in train}
    assert dev_stories.isdisjoint(train_stories)  # a random split would put variants on both sides
    assert profile.clusters == 40 and profile.largest_cluster == 3
    assert profile.max_nearest < 0.8 and profile.share_at_or_above_0_8 == 0.0
    assert [e.id for e in train] == [e.id for e in examples if e in train]  # file order
    again = cluster_split(examples, n_dev=20, seed=seed)
    assert again[1] == dev  # seeded
    assert cluster_split(examples, n_dev=20, seed=seed + 7)[1] != dev


def test_split_refuses_an_impossible_size():
    with pytest.raises(ValueError, match="n_dev"):
        cluster_split(_examples(2, 1), n_dev=2, seed=0)
