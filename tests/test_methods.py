"""The RL family on ReFT's loop: GRPO, Dr. GRPO, RLOO without a critic, KL in the loss,
no reference when kl_coef is 0, CHORD's SFT term, DAPO's dropped groups. The estimators' maths is
hand-checked in test_ppo.py; here each runs through the real trainer on a tiny model."""

import json
import typing
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from conftest import LENGTHS
from reftkit.config import ReFTConfig, ReproduceConfig
from reftkit.data.prompts import encode_sft_examples
from reftkit.modeling import loading as model_loading
from reftkit.modeling.model import PolicyWithValueHead, load_causal_lm
from reftkit.rl.methods import ESTIMATORS, RL_METHODS, methods_table
from reftkit.trainers import reft as reft_module
from reftkit.trainers.reft import train_reft


def config(out, model, **kw):
    base = dict(model=str(model), output_dir=out, epochs=1, batch_size=4, num_samples=4, mini_batch_size=8,
                lr=1e-4, progress=False, **LENGTHS)
    return ReFTConfig(**{**base, **kw})


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reft", *RL_METHODS])
def test_every_registered_method_trains_one_step(tmp_path, splits, warm_checkpoint, method):
    options = RL_METHODS[method].options if method in RL_METHODS else {}
    cfg = config(tmp_path, warm_checkpoint, **options)
    final = train_reft(cfg, splits[0][:4])
    assert (final / "value_head.safetensors").exists() == cfg.critic
    logged = [r for r in rows(tmp_path) if "reward" in r]
    assert len(logged) == 1 and logged[0]["updates"] > 0 and "policy_loss" in logged[0]
    assert ("value_loss" in logged[0]) == cfg.critic
    before, after = load_file(str(warm_checkpoint / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_the_method_table_in_the_docs_is_the_registry():
    """docs/methods.md shows what `--advantage` offers: its table is `methods_table()` verbatim."""
    assert methods_table() in (Path(__file__).parents[1] / "docs" / "methods.md").read_text()


def test_config_choices_and_reproduce_sections_come_from_the_registry():
    assert typing.get_args(ReFTConfig.model_fields["advantage"].annotation) == tuple(ESTIMATORS)
    assert set(RL_METHODS) <= set(ReproduceConfig.model_fields)
    for name, method in RL_METHODS.items():
        stage = ReproduceConfig(demo=True, methods=["reft", name]).stage(name)
        assert {k: getattr(stage, k) for k in method.options} == method.options
        assert stage.critic == method.estimator.critic
    assert ReFTConfig(advantage="drgrpo", num_samples=2, max_length=300, max_prompt_tokens=100).loss_norm_length == 200
    assert ReFTConfig(advantage="grpo", num_samples=2).loss_norm_length is None


@pytest.mark.slow
def test_kl_in_the_loss_is_logged_and_kl_coef_zero_skips_the_reference(tmp_path, splits, warm_checkpoint,
                                                                     monkeypatch):
    train_reft(config(tmp_path / "loss", warm_checkpoint, advantage="grpo", kl_in="loss"), splits[0][:4])
    assert all(r["kl_loss"] >= 0 for r in rows(tmp_path / "loss") if "reward" in r)

    loaded = []
    real_load = reft_module.load_causal_lm
    for module in (reft_module, model_loading):  # the reference's load, and the policy's
        monkeypatch.setattr(module, "load_causal_lm", lambda name: loaded.append(name) or real_load(name))
    monkeypatch.setattr(reft_module, "lm_response_logprobs", lambda *a, **k: pytest.fail("reference forward"))
    train_reft(config(tmp_path / "nokl", warm_checkpoint, kl_coef=0.0), splits[0][:4])
    assert loaded == [str(warm_checkpoint)]  # the policy only: no reference model is loaded
    assert all(r["kl"] == 0.0 for r in rows(tmp_path / "nokl") if "reward" in r)


def test_drop_uniform_groups_skips_questions_with_one_reward(tmp_path, splits, tiny_checkpoint, caplog):
    # An untrained model never writes an answer: every reward is 0, every group is uniform,
    # so nothing is left to learn from and the weights must not move.
    with caplog.at_level("WARNING", logger="reftkit"):
        final = train_reft(config(tmp_path, tiny_checkpoint, advantage="grpo", drop_uniform_groups=True),
                           splits[0][:8])
    logged = [r for r in rows(tmp_path) if "reward" in r]
    assert [r["dropped_groups"] for r in logged] == [4, 4] and all(r["reward"] == 0.0 for r in logged)
    before, after = load_file(str(tiny_checkpoint / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Said in the metrics and the log, not only seen in unchanged weights.
    assert [(r["groups"], r["updates"]) for r in logged] == [(4, 0), (4, 0)]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w for w in warnings if "groups dropped" in w] == [
        f"rollout batch {step}: all 4 groups dropped (--drop_uniform_groups: each question's 4 samples got one "
        "reward, mean reward 0.000): no update" for step in (1, 2)]
    (summary,) = [w for w in warnings if w.startswith("no PPO update")]
    assert summary.startswith("no PPO update in any of the 2 rollout batches of this run (steps 1-2): every group "
                              "was dropped") and "the model saved is the one it started from" in summary


def test_a_batch_with_groups_left_reports_its_updates_and_no_warning(tmp_path, splits, tiny_checkpoint, caplog,
                                                                    monkeypatch):
    """The warnings are for batches with nothing left: a batch that keeps a group trains and says nothing."""
    from reftkit.grading.answers import Grade

    class Alternating:  # a question's samples alternate right and wrong: no group is uniform
        def grade(self, completions, examples):
            return [Grade("1", i % 2 == 0) for i in range(len(completions))]

    monkeypatch.setattr(reft_module, "open_grader", lambda cfg: __import__("contextlib").nullcontext(Alternating()))
    with caplog.at_level("WARNING", logger="reftkit"):
        train_reft(config(tmp_path, tiny_checkpoint, advantage="grpo", drop_uniform_groups=True), splits[0][:8])
    logged = [r for r in rows(tmp_path) if "reward" in r]
    # 2 PPO epochs x (16 rows / minibatches of 8) optimiser steps per batch
    assert [(r["dropped_groups"], r["groups"], r["updates"]) for r in logged] == [(0, 4, 4), (0, 4, 4)]
    assert "no update" not in caplog.text and "no PPO update" not in caplog.text


@pytest.mark.slow
def test_sft_term_decays_and_its_forward_matches_the_separate_passes(tmp_path, splits, warm_checkpoint):
    train_reft(config(tmp_path, warm_checkpoint, sft_coef=0.5, sft_coef_schedule="linear"), splits[0][:8])
    logged = [r for r in rows(tmp_path) if "reward" in r]
    assert [r["sft_coef"] for r in logged] == [0.5, 0.25] and all(r["sft_loss"] > 0 for r in logged)

    # One forward over rollout rows and references gives what two separate forwards give.
    from reftkit.modeling.model import load_tokenizer

    lm, tokenizer = load_causal_lm(str(warm_checkpoint)), load_tokenizer(str(warm_checkpoint))
    policy = PolicyWithValueHead(lm).eval()
    examples = splits[0][:2]
    references = encode_sft_examples(tokenizer, examples, LENGTHS["max_prompt_tokens"], LENGTHS["max_length"])
    prompt = torch.tensor([[tokenizer.pad_token_id, 5, 6, 7], [8, 9, 10, 11]])
    sequences = torch.cat([prompt, torch.tensor([[12, 13], [14, tokenizer.pad_token_id]])], dim=1)
    attention = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    batch = reft_module.RolloutBatch(sequences, attention, 4, mask, torch.zeros(2, 2), torch.zeros(2, 2),
                                     torch.tensor([0, 1]))
    with torch.no_grad():
        logprobs, values, nll = reft_module.outputs_with_references(policy, batch, references, tokenizer.pad_token_id,
                                                                    1.0)
        plain_logprobs, plain_values = reft_module.policy_outputs(policy, sequences, attention, 4, 1.0)
        ref_loss = torch.stack([lm(input_ids=torch.tensor([f.input_ids]), labels=torch.tensor([f.labels])).loss
                                * (sum(t != -100 for t in f.labels) - 1) for f in references]).sum()
        n_tokens = sum(sum(t != -100 for t in f.labels) - 1 for f in references)
    assert torch.allclose(logprobs * mask, plain_logprobs * mask, atol=1e-5)
    assert torch.allclose(values * mask, plain_values * mask, atol=1e-5)
    assert nll.item() == pytest.approx((ref_loss / n_tokens).item(), rel=1e-4)


def test_options_an_estimator_cannot_honour_are_rejected():
    with pytest.raises(ValidationError, match="vf_coef: options of the value head"):
        ReFTConfig(advantage="grpo", num_samples=4, vf_coef=1.0)
    with pytest.raises(ValidationError, match="num_samples must be >= 2"):
        ReFTConfig(advantage="rloo", num_samples=1)
    with pytest.raises(ValidationError, match="set sft_coef > 0"):
        ReFTConfig(sft_coef_schedule="linear")
