"""reftkit as a library: the Python API, reward functions with TRL's signature, and what a run lets you watch
(entropy, truncation, sampled completions, the model card). Everything on the tiny model, offline."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from conftest import LENGTHS, metrics
from reftkit import ReFTConfig, ReFTTrainer, SFTConfig, SFTTrainer
from reftkit.data.readers import DataError, examples_from_rows
from reftkit.grading.answers import Grade
from reftkit.grading.rewards import RewardError, Rewards, correctness
from reftkit.training.errors import RunError


def rows_of(examples, bonus=None):
    """reft-format rows of `examples`, with a `bonus` column (a value per row) of the data's own."""
    return [{"item_id": e.id, "question": e.question, "answer_cot": e.cot, "answer_value": e.answer,
             "bonus": (bonus or {}).get(e.id, 0.0)} for e in examples]


def column_bonus(prompts, completions, bonus, **kwargs):
    """A reward that reads a dataset column, in TRL's signature."""
    return [float(b) for b in bonus]


def says_therefore(completions, **kwargs):
    """A reward function as TRL's docs write them: only `completions`, everything else in kwargs."""
    return [1.0 if "Therefore" in c else 0.0 for c in completions]


# ----------------------------------------------------------------------------- the notebook path


@pytest.mark.slow
def test_sft_then_reft_through_the_api_with_a_reward_that_reads_a_column(tmp_path, splits):
    train, test = splits
    bonus = {e.id: float(i % 3) for i, e in enumerate(train)}  # 0, 1, 2, 0, 1, 2, ...
    sft = SFTTrainer("tiny", SFTConfig(output_dir=tmp_path / "sft", epochs=30, batch_size=16, lr=1e-2, progress=False,
                                       eval_every_epoch=False, **LENGTHS), train_dataset=rows_of(train))
    warm = sft.train()
    assert (warm.final_dir / "config.json").exists() and warm.last["loss"] < warm.metrics[0]["loss"]

    reft = ReFTTrainer(warm.final_dir, ReFTConfig(output_dir=tmp_path / "reft", batch_size=8, num_samples=2,
                                                  mini_batch_size=8, lr=1e-4, progress=False, log_samples_every=1,
                                                  **LENGTHS),
                       train_dataset=rows_of(train[:16], bonus), eval_dataset=rows_of(test[:8]),
                       reward_funcs=["correctness", column_bonus, says_therefore], reward_weights=[1.0, 0.5, 0.25])
    result = reft.train()
    rows = [r for r in result.metrics if "reward" in r]
    assert len(rows) == 2
    for row in rows:  # each function's mean is logged, and the total is their weighted sum
        assert 0 <= row["reward_column_bonus"] <= 2 and row["rewards_missing"] == 0
        expected = row["reward_correctness"] + 0.5 * row["reward_column_bonus"] + 0.25 * row["reward_says_therefore"]
        assert row["reward"] == pytest.approx(expected, abs=1e-5)
    seen = [b for r in rows for b in [r["reward_column_bonus"]]]
    assert sorted(seen) != [0.0, 0.0]  # the column reached the function
    samples = [json.loads(line) for line in (tmp_path / "reft" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and all("completion" in s and "reward" in s for s in samples)
    accuracy = reft.evaluate()
    assert 0.0 <= accuracy <= 1.0 and (tmp_path / "reft" / "predictions-evaluate.jsonl").exists()
    copy = reft.save_model(tmp_path / "exported")
    assert (copy / "model.safetensors").exists() and (copy / "README.md").exists()


def test_a_loaded_model_and_tokenizer_train_and_the_dataset_class_is_read(tmp_path, splits, tiny_checkpoint):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    data = Dataset.from_list(rows_of(splits[0][:16]))
    trainer = SFTTrainer(model, SFTConfig(output_dir=tmp_path, epochs=1, batch_size=8, progress=False,
                                          eval_every_epoch=False, **LENGTHS), tokenizer=tokenizer, train_dataset=data)
    result = trainer.train()
    assert len(result.metrics) == 2 and (result.final_dir / "model.safetensors").exists()
    assert json.loads((tmp_path / "reftkit_run.json").read_text())["config"]["model"] == str(tiny_checkpoint)


def test_rows_in_memory_are_read_by_the_file_rules_and_named_in_errors():
    rows = [{"question": "2 + 2?", "answer": "Add them. #### 4"}, {"question": "3 + 3?", "answer": "no final line"}]
    with pytest.raises(DataError, match="train_dataset row 1: field 'answer': no '#### N' final line"):
        examples_from_rows(rows, label="train_dataset")
    (example,) = examples_from_rows(rows[:1], fields=None, label="train_dataset")
    assert example.answer == "4" and example.columns["question"] == "2 + 2?"
    mapped = examples_from_rows([{"q": "2 + 2?", "a": "#### 4"}], "gsm8k", fields={"question": "q", "answer": "a"},
                                require_cot=False)
    assert mapped[0].question == "2 + 2?"


# ----------------------------------------------------------------------------- reward functions


def batch(n=4):
    from reftkit.data.records import Example

    examples = [Example(f"q{i}", f"question {i}", "", str(i), columns={"level": i}) for i in range(n)]
    grades = [Grade(str(i) if i % 2 == 0 else "7", i % 2 == 0) for i in range(n)]
    return [f"prompt {i}" for i in range(n)], [f"completion {i}" for i in range(n)], [[1, 2]] * n, examples, grades


def test_the_paper_reward_is_a_reward_function_and_the_default():
    prompts, completions, ids, examples, grades = batch()
    assert correctness(prompts=prompts, completions=completions, grades=grades) == [1.0, 0.1, 1.0, 0.1]
    scored = Rewards().score(prompts, completions, ids, examples, grades)
    assert scored.totals == [1.0, 0.1, 1.0, 0.1] and not Rewards().custom


def test_columns_reach_reward_functions_and_none_means_no_reward():
    prompts, completions, ids, examples, grades = batch()

    def by_level(prompts, completions, level, completion_ids, **kwargs):
        assert completion_ids == [[1, 2]] * 4 and kwargs["id"] == ["q0", "q1", "q2", "q3"]
        return [None if lv == 3 else lv / 10 for lv in level]

    def nothing_for_the_last(completions, **kwargs):
        return [1.0, 1.0, 1.0, None]

    scored = Rewards([by_level, nothing_for_the_last], [2.0, 1.0]).score(prompts, completions, ids, examples, grades)
    assert scored.totals == pytest.approx([1.0, 1.2, 1.4, 0.0])
    assert scored.counts == {"by_level": 3, "nothing_for_the_last": 3} and scored.missing == 1


@pytest.mark.parametrize("returned, message", [
    ([1.0, 2.0], "returned 2 values for 4 completions"),
    ([1.0, math.nan, 1.0, 1.0], r"returned nan for completion 1 \(question 'q1'"),
    ([1.0, 1.0, "high", 1.0], r"returned 'high' for completion 2"),
    ([1.0, 1.0, 1.0, math.inf], "returned inf for completion 3"),
])
def test_a_reward_that_is_not_a_list_of_finite_numbers_stops_the_run_naming_it(returned, message):
    def hostile(completions, **kwargs):
        return returned

    with pytest.raises(RewardError, match=f"reward function hostile {message}"):
        Rewards([hostile]).score(*batch())


def test_a_reward_that_raises_names_the_function_and_the_completion():
    def picky(completions, **kwargs):
        if any(c.endswith("2") for c in completions):
            raise KeyError("no such key")
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"reward function picky raised KeyError: 'no such key' on completion 2 "
                                          r"\(question 'q2': 'completion 2'\)"):
        Rewards([picky]).score(*batch())


def test_reward_specs_and_weights_are_checked_before_a_run():
    with pytest.raises(RewardError, match="cannot import 'no_such_module'"):
        Rewards(["no_such_module:f"])
    with pytest.raises(RewardError, match="has no callable 'nothing_here'"):
        Rewards(["math:nothing_here"])
    with pytest.raises(RewardError, match="2 weights for 1 reward functions"):
        Rewards(["correctness"], [1.0, 2.0])
    with pytest.raises(ValueError, match="reward_weights: 1 weights for 2 reward functions"):
        ReFTConfig(reward=["correctness", "math:sqrt"], reward_weights=[1.0])
    assert Rewards(["test_library:column_bonus"]).names == ["column_bonus"]


# ----------------------------------------------------------------------------- watching a run


@pytest.mark.slow
def test_a_reft_run_logs_entropy_truncation_lengths_and_writes_a_model_card(tmp_path, splits, warm_checkpoint,
                                                                           monkeypatch):
    from transformers import AutoTokenizer

    from reftkit.trainers import reft as reft_module

    batches = []
    real_update = reft_module.ppo_update
    monkeypatch.setattr(reft_module, "ppo_update", lambda acc, policy, opt, sched, batch, *a, **k:
                        batches.append(batch) or real_update(acc, policy, opt, sched, batch, *a, **k))
    cfg = ReFTConfig(model=str(warm_checkpoint), output_dir=tmp_path / "short", batch_size=8, num_samples=2,
                     mini_batch_size=16, lr=1e-4, progress=False, max_prompt_tokens=64, max_length=68,
                     mask_truncated=True)
    final = reft_module.train_reft(cfg, splits[0][:8])
    (row,) = [r for r in metrics(tmp_path / "short") if "reward" in r]
    # 4 new tokens at most: most of the warm model's answers are cut there; with mask_truncated those have no loss
    (batch,) = batches
    responses = batch.sequences[:, batch.prompt_len:]
    eos = AutoTokenizer.from_pretrained(warm_checkpoint).eos_token_id
    ended = (responses == eos).any(dim=1)
    assert row["truncated"] == pytest.approx(1 - ended.float().mean().item()) and row["truncated"] >= 0.5
    assert (batch.mask.sum(dim=1) > 0).tolist() == ended.tolist()
    assert row["response_tokens_max"] == 4 and row["entropy"] > 0
    assert "reward_correctness" not in row  # the paper's reward alone: no per-function rows
    card = ModelCard.load(final / "README.md")
    assert "reftkit" in card.data.tags and card.data.base_model == str(warm_checkpoint)
    assert "ReFT" in card.text and "| `lr` | `0.0001` |" in card.text


# ----------------------------------------------------------------------------- the Hub


def test_push_to_hub_uploads_the_final_model_with_its_card(tmp_path, monkeypatch, splits, tiny_checkpoint):
    import huggingface_hub

    from conftest import sft_config
    from reftkit.trainers.sft import train_sft
    from reftkit.training import preflight

    calls = []

    class FakeHub:  # stands for huggingface_hub.HfApi: the network part cannot run here
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id))

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs["repo_id"], sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())))
            return SimpleNamespace(commit_url="https://huggingface.co/me/model/commit/1")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(preflight, "hub_unreachable", lambda: None)
    final = train_sft(sft_config(tmp_path / "run", tiny_checkpoint, epochs=1, push_to_hub="me/model"), splits[0][:16])
    assert calls[0] == ("create", "me/model") and calls[1][:2] == ("upload", "me/model")
    assert {"README.md", "config.json", "model.safetensors"} <= set(calls[1][2]) and final.exists()

    class BrokenHub(FakeHub):
        def upload_folder(self, **kwargs):
            raise OSError("401 Client Error: Unauthorized\nmore lines")

    monkeypatch.setattr(huggingface_hub, "HfApi", BrokenHub)
    with pytest.raises(RunError, match=r"push_to_hub 'me/model': the upload failed \(OSError: 401 Client Error: "
                                       r"Unauthorized\); the model is saved in .*final"):
        train_sft(sft_config(tmp_path / "again", tiny_checkpoint, epochs=1, push_to_hub="me/model"), splits[0][:16])
    assert (tmp_path / "again" / "final" / "model.safetensors").exists()


def test_push_to_hub_offline_is_refused_before_training(tmp_path, monkeypatch, splits, tiny_checkpoint):
    from conftest import sft_config
    from reftkit.trainers.sft import train_sft
    from reftkit.training import preflight

    monkeypatch.setattr(preflight, "hub_unreachable", lambda: "HF_HUB_OFFLINE is set")
    with pytest.raises(ValueError, match="push_to_hub 'me/model': the Hugging Face Hub cannot be reached "
                                         r"\(HF_HUB_OFFLINE is set\)"):
        train_sft(sft_config(tmp_path / "run", tiny_checkpoint, push_to_hub="me/model"), splits[0][:16])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
