"""Rollout and training forward must agree: PPO's ratio pi/pi_old is 1 only if they do."""

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

from reftkit.data.prompts import collate_prompts, encode_prompt
from reftkit.modeling.model import PolicyWithValueHead, load_causal_lm, load_tokenizer
from reftkit.modeling.scoring import lm_response_logprobs, response_slice, token_logprobs
from reftkit.rollout.generation import Sampling, generate, response_mask


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory, tiny_checkpoint):
    """GPT-2 has absolute position embeddings: left padding breaks it unless positions skip the pads
    (Llama's rotary embeddings only see relative positions, so they cannot catch that)."""
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2") / "model"
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "gpt2_checkpoint"])
def test_training_forward_matches_generate_scores_under_left_padding(checkpoint, splits, request):
    path = str(request.getfixturevalue(checkpoint))
    lm, tok = load_causal_lm(path), load_tokenizer(path)
    prompts = [encode_prompt(tok, ex, 64) for ex in splits[1][:6]]
    assert len({len(p) for p in prompts}) > 1  # different lengths, so rows are left-padded
    batch = collate_prompts(prompts, tok.pad_token_id)
    torch.manual_seed(0)
    out = lm.generate(**batch, generation_config=GenerationConfig(
        do_sample=True, top_k=0, max_new_tokens=20, output_scores=True, return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    plen = batch["input_ids"].shape[1]
    responses = out.sequences[:, plen:]
    mask = response_mask(responses, tok.eos_token_id)
    from_generate = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    attention = torch.cat([batch["attention_mask"], mask.long()], dim=1)

    logits, _ = PolicyWithValueHead(lm).eval().position_logits(out.sequences, attention)
    from_policy = token_logprobs(response_slice(logits, plen), responses)
    from_ref = lm_response_logprobs(lm, out.sequences, attention, plen)
    assert torch.allclose(from_policy * mask, from_generate * mask, atol=1e-4)
    assert torch.allclose(from_ref * mask, from_generate * mask, atol=1e-4)


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "gpt2_checkpoint"])
@pytest.mark.parametrize("do_sample, k", [(False, 1), (True, 3)])
def test_shared_prefill_samples_exactly_what_plain_generate_samples(checkpoint, do_sample, k, splits, request):
    """Each prompt prefilled once and the cache grown in place (reftkit.modeling.kvcache) changes the cost,
    not the tokens: the same seed gives the same responses as transformers' own generate call.
    Responses reach past the cache's first buffer (prompt + max_new_tokens) only if it grows wrong."""
    path = str(request.getfixturevalue(checkpoint))
    lm, tok = load_causal_lm(path), load_tokenizer(path)
    prompts = [encode_prompt(tok, ex, 64) for ex in splits[1][:5]]
    sampling = Sampling(do_sample=do_sample, max_new_tokens=24)
    outs = []
    for share in (False, True):
        torch.manual_seed(0)
        outs.append(generate(lm, tok, prompts, sampling, k, share_prompts=share))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert torch.equal(outs[0].attention_mask, outs[1].attention_mask)
    assert outs[0].texts == outs[1].texts and len(outs[0].texts) == 5 * k


def test_the_growing_cache_doubles_and_keeps_what_it_held():
    from reftkit.modeling.kvcache import GrowingLayer

    keys = torch.arange(2 * 3 * 4, dtype=torch.float).view(1, 2, 3, 4)
    layer = GrowingLayer(keys, -keys, capacity=4)
    for step in range(6):
        new = torch.full((1, 2, 1, 4), 100.0 + step)
        k, v = layer.update(new, -new)
        assert k.shape == v.shape == (1, 2, 4 + step, 4) and layer.get_seq_length() == 4 + step
    assert layer._keys.shape[-2] == 16  # 9 positions: 4 -> 8 -> 16, doubled, not grown per token
    torch.testing.assert_close(k[..., :3, :], keys)
    torch.testing.assert_close(k[..., 3:, 0], 100.0 + torch.arange(6.0).expand(1, 2, 6))
    torch.testing.assert_close(v, -k)


def test_batched_greedy_equals_one_prompt_at_a_time(tiny_checkpoint, splits):
    lm, tok = load_causal_lm(str(tiny_checkpoint)), load_tokenizer(str(tiny_checkpoint))
    prompts = [encode_prompt(tok, ex, 64) for ex in splits[1][:5]]
    greedy = Sampling(do_sample=False, max_new_tokens=16)
    batched = generate(lm, tok, prompts, greedy).texts
    assert batched == [generate(lm, tok, [p], greedy).texts[0] for p in prompts]


@pytest.mark.slow  # needs the warm-up model (a 40-epoch SFT fixture) to write an answer line
def test_generation_ends_before_a_stop_string(warm_checkpoint, splits):
    lm, tok = load_causal_lm(str(warm_checkpoint)), load_tokenizer(str(warm_checkpoint))
    prompt = encode_prompt(tok, splits[1][0], 64)
    free = generate(lm, tok, [prompt], Sampling(do_sample=False, max_new_tokens=24))
    text = free.texts[0]
    stop = "\nTherefore"  # a multi-token stop string, as few-shot prompting's "\nQuestion:"
    assert stop in text.strip(), f"the warm-up model should write its answer line: {text!r}"
    stopped = generate(lm, tok, [prompt], Sampling(do_sample=False, max_new_tokens=24, stop=stop))
    assert stopped.texts[0] == text.split(stop, 1)[0]
    assert stopped.sequences.shape[1] < free.sequences.shape[1]  # decoding stopped there, not just the text
