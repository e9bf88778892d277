"""The prompt-shared, length-bucketed scoring of responses equals the padded forward it replaces."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from reftkit.modeling.kvcache import supports_shared_prefix
from reftkit.modeling.lora import add_lora
from reftkit.modeling.model import PolicyWithValueHead, checkpointing_in_eval_mode, enable_gradient_checkpointing
from reftkit.modeling.scoring import length_buckets, score_responses
from reftkit.rl import ppo

PAD, EOS, VOCAB, K = 0, 1, 48, 3


def model(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=PAD, eos_token_id=EOS)
        return LlamaForCausalLM(config)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=EOS,
                        pad_token_id=PAD, eos_token_id=EOS)  # absolute positions: a wrong position id shows
    return GPT2LMHeadModel(config)


def rollout(seed=0, prompt_lengths=(5, 9, 3), response_lengths=(1, 7, 12, 2, 12, 4, 9, 3, 5), width=12):
    """A rollout as `generate` lays it out: K rows per question, [left-padded prompt | response up to
    and including EOS, then padding], responses of very different lengths."""
    g = torch.Generator().manual_seed(seed)
    plen = max(prompt_lengths)
    rows, masks = [], []
    for q, p in enumerate(prompt_lengths):
        prompt = torch.randint(2, VOCAB, (p,), generator=g)
        for j in range(K):
            n = response_lengths[q * K + j]
            response = torch.randint(2, VOCAB, (width,), generator=g)
            response[n - 1] = EOS
            response[n:] = PAD
            rows.append(torch.cat([torch.full((plen - p,), PAD), prompt, response]))
            masks.append(torch.cat([torch.zeros(plen - p), torch.ones(p), torch.ones(n), torch.zeros(width - n)]))
    question = torch.arange(len(prompt_lengths)).repeat_interleave(K)
    return torch.stack(rows), torch.stack(masks).long(), plen, question


def policy_for(arch: str, use_lora: bool, checkpointing: bool) -> PolicyWithValueHead:
    lm = model(arch)
    if checkpointing:
        enable_gradient_checkpointing(lm)
    if use_lora:
        lm = add_lora(lm, r=4, alpha=8.0, dropout=0.0, target_modules=["all-linear"])
        torch.manual_seed(1)
        with torch.no_grad():  # non-zero B: the adapters change the outputs and get gradients
            for name, param in lm.named_parameters():
                if ".lora_B." in name:
                    param.normal_(std=0.1)
    policy = PolicyWithValueHead(lm)
    torch.nn.init.normal_(policy.value_head.weight, std=0.1)  # a zero head would hide value errors
    return policy.eval()


def loss_and_grads(policy, share: bool):
    """The PPO objective of one update on the rollout, its log-probs, values and gradients."""
    sequences, attention, plen, question = rollout()
    mask = attention[:, plen:].float()
    policy.zero_grad()
    with checkpointing_in_eval_mode(policy):
        logprobs, values = policy.response_scores(sequences, attention, plen, question, 1.0, share)
        old = logprobs.detach() - 0.05 * torch.arange(mask.shape[1]) / mask.shape[1]  # ratio != 1: clipping active
        advantages = torch.linspace(-1, 1, mask.numel()).view_as(mask)
        loss, _ = ppo.ppo_objective(logprobs, values, old, values.detach() + 0.1, advantages * mask,
                                    torch.ones_like(mask), mask, 0.2, 0.2, 5.0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return loss.detach(), logprobs.detach() * mask, values.detach() * mask, grads


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("use_lora, checkpointing", [(False, False), (True, False), (False, True), (True, True)])
def test_shared_prompts_give_the_padded_log_probs_values_loss_and_gradients(arch, use_lora, checkpointing):
    policy = policy_for(arch, use_lora, checkpointing)
    # transformers < 5.1x drops any cache in a checkpointed layer: then the padded way runs (and is compared)
    assert supports_shared_prefix(policy.lm) == (not checkpointing or hasattr(GradientCheckpointingLayer,
                                                                              "_can_checkpoint_with_cache"))
    loss_a, logp_a, values_a, grads_a = loss_and_grads(policy, share=False)
    loss_b, logp_b, values_b, grads_b = loss_and_grads(policy, share=True)
    torch.testing.assert_close(logp_b, logp_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values_b, values_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys() == trainable  # the prompt pass's weights get their gradient too
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5)


def test_the_reference_scoring_without_a_value_head_matches_too():
    lm = model("gpt2").eval()
    sequences, attention, plen, question = rollout(seed=3)
    mask = attention[:, plen:].float()
    with torch.no_grad():
        padded, none = score_responses(lm, sequences, attention, plen, question, 0.7, share=False)
        shared, _ = score_responses(lm, sequences, attention, plen, question, 0.7, share=True)
    assert none is None
    torch.testing.assert_close(shared * mask, padded * mask, rtol=1e-5, atol=1e-5)


def test_each_prompt_runs_once_and_no_response_pads_to_the_longest(monkeypatch):
    """What the shared way computes: one prompt row per question, then each response's tokens but
    its last (only a target), in buckets; with no cost per forward call, no padding at all."""
    from reftkit.modeling import scoring

    monkeypatch.setattr(scoring, "BUCKET_OVERHEAD_TOKENS", 0)
    lm = model("llama").eval()
    sequences, attention, plen, question = rollout()
    shapes = []
    lm.register_forward_pre_hook(lambda module, args, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    with torch.no_grad():
        score_responses(lm, sequences, attention, plen, question, share=True)
    assert shapes[0] == (3, plen)  # the prompts, once each
    lengths = attention[:, plen:].sum(1).tolist()
    assert sum(rows * columns for rows, columns in shapes[1:]) == sum(n - 1 for n in lengths)
    assert sum(rows * columns for rows, columns in shapes) < 0.4 * sequences.numel()  # vs the padded rows


def test_rows_of_one_question_need_not_be_adjacent_nor_complete():
    """A minibatch may hold a question's rows in any order, some of them only, or a padding row."""
    lm = model("llama").eval()
    sequences, attention, plen, question = rollout()
    pick = torch.tensor([7, 0, 5, 2, 0, 4])
    mask = attention[pick, plen:].float()
    with torch.no_grad():
        padded, _ = score_responses(lm, sequences[pick], attention[pick], plen, question[pick], share=False)
        shared, _ = score_responses(lm, sequences[pick], attention[pick], plen, question[pick], share=True)
    torch.testing.assert_close(shared * mask, padded * mask, rtol=1e-5, atol=1e-5)


def test_length_buckets_cover_every_row_once_and_split_only_when_it_pays():
    lengths = [128, 20, 127, 19, 126, 21, 18, 125]
    buckets = length_buckets(lengths, overhead=64)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in b) for b in buckets] == [[125, 126, 127, 128], [18, 19, 20, 21]]
    assert len(length_buckets(lengths, overhead=10_000)) == 1  # splitting costs more than the padding
    assert length_buckets([], overhead=1) == []


def test_a_sliding_window_model_falls_back_to_the_padded_way():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    lm = MistralForCausalLM(config).eval()
    assert not supports_shared_prefix(lm)
    sequences, attention, plen, question = rollout()
    with torch.no_grad():
        shared, _ = score_responses(lm, sequences, attention, plen, question, share=True)
        padded, _ = score_responses(lm, sequences, attention, plen, question, share=False)
    assert torch.equal(shared, padded)


@pytest.mark.parametrize("share", [True, False])
def test_the_trainer_honours_share_prompts(tmp_path, splits, tiny_checkpoint, monkeypatch, share):
    """`share_prompts` reaches sampling's prefill, the rollout's scoring and every update (and
    false reaches none of them): counted at the shared paths themselves."""
    from conftest import LENGTHS
    from reftkit.config import ReFTConfig
    from reftkit.modeling import scoring
    from reftkit.rollout import generation
    from reftkit.trainers.reft import train_reft

    calls = {"prefill": 0, "scoring": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(generation, "_prefilled", counting("prefill", generation._prefilled))
    monkeypatch.setattr(scoring, "_shared", counting("scoring", scoring._shared))
    cfg = ReFTConfig(model=str(tiny_checkpoint), output_dir=tmp_path, epochs=1, batch_size=4, num_samples=2,
                     mini_batch_size=4, ppo_epochs=1, lr=1e-4, progress=False, share_prompts=share, **LENGTHS)
    train_reft(cfg, splits[0][:4])
    # one rollout batch: one prefill; scoring = old log-probs + reference + 2 minibatches
    assert calls == ({"prefill": 1, "scoring": 4} if share else {"prefill": 0, "scoring": 0})
