"""The reproduce table's read-outs as pure functions: the paired test and sampled tokens."""

import json
from dataclasses import asdict

import pytest

from reftkit.commands.report import Paired, mcnemar_p, paired_counts, results_table, sampled_tokens


def test_mcnemar_exact_hand_computed():
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)  # 5 discordant questions all one way: 2 * 0.5^5
    assert mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(1, 4) == pytest.approx(2 * (1 + 5) / 32)
    assert mcnemar_p(0, 0) == 1.0


def test_paired_counts_and_the_table():
    a = {"q1": {"correct": True}, "q2": {"correct": True}, "q3": {"correct": False}}
    b = {"q1": {"correct": True}, "q2": {"correct": False}, "q3": {"correct": False}}
    assert paired_counts(a, b) == Paired(only_a_right=1, only_b_right=0, both_right=1, mcnemar_p=1.0)
    with pytest.raises(ValueError, match="same questions"):
        paired_counts(a, {"q1": {"correct": True}})
    table = results_table({"GRPO": {"top1": 0.5, "train_seconds": 3.0, "sampled_tokens": 1234,
                                     "vs_reft": asdict(paired_counts(a, b))}}, k=4)
    assert "| GRPO | 50.0% | - | - | - | 3 | 1,234 | 1 / 0, p = 1.00 |" in table


def test_the_table_prints_the_p_that_results_json_holds():
    """reproduce stores asdict(paired_counts(...)) in results.json and prints results.md from it: the p in
    the table is the McNemar p, not the both-right count or another of the numbers beside it."""
    method = {f"q{i}": {"correct": i < 9} for i in range(20)}  # 9 right
    reft = {f"q{i}": {"correct": 2 <= i < 7} for i in range(20)}  # 5 right, all of them method's too
    paired = paired_counts(method, reft)
    assert (paired.only_a_right, paired.only_b_right, paired.both_right) == (4, 0, 5)
    saved = json.loads(json.dumps({"GRPO": {"top1": 0.45, "vs_reft": asdict(paired)}}))  # as results.json
    cell = results_table(saved, k=4).splitlines()[-1].split(" | ")[-1]
    assert cell == f"4 / 0, p = {saved['GRPO']['vs_reft']['mcnemar_p']:.2f} |"
    assert saved["GRPO"]["vs_reft"]["mcnemar_p"] == pytest.approx(mcnemar_p(4, 0)) == pytest.approx(0.125)


def test_sampled_tokens_sums_the_rollout_batches(tmp_path):
    rows = [{"step": 1, "sampled_tokens": 100}, {"step": 2, "sampled_tokens": 50}, {"step": 2, "eval_accuracy": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sampled_tokens(tmp_path) == 150
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert sampled_tokens(tmp_path) is None
