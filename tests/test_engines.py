"""Rollout engines without vLLM: the vLLM engine's pure parts (sampling options, the layout of its
outputs, the weights it is sent) against the HF path, and the trainer's wiring through a recording
engine. The tests that run a real vLLM engine are in test_engines_vllm.py (skipped without vLLM)."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import LENGTHS
from reftkit.config import ReFTConfig
from reftkit.data.prompts import encode_prompt
from reftkit.modeling.lora import add_lora
from reftkit.modeling.model import load_causal_lm, load_tokenizer
from reftkit.rollout.engines import (
    EngineGenerated,
    HFEngine,
    MissingEngineError,
    check_engine,
    export_weights,
    generated_from_tokens,
    logprob_gap,
    request_seed,
    sampling_kwargs,
)
from reftkit.rollout.generation import Sampling, generate


def test_sampling_options_are_the_hf_paths():
    sampled = sampling_kwargs(Sampling(True, 0.7, 0, 0.9, 33), k=4, eos_id=2, seed=11)
    assert sampled["n"] == 4 and sampled["max_tokens"] == 33 and sampled["seed"] == 11
    assert (sampled["temperature"], sampled["top_k"], sampled["top_p"]) == (0.7, 0, 0.9)  # top_k 0 = off in both
    assert sampled["stop_token_ids"] == [2] and sampled["ignore_eos"] is False and sampled["stop"] is None
    assert sampled["logprobs"] == 0  # the sampled token's own log-prob
    assert sampling_kwargs(Sampling(True, 1.0, 5, 1.0, 8), 1, 2, None)["top_k"] == 5
    greedy = sampling_kwargs(Sampling(False, max_new_tokens=8, stop="\nQuestion:"), k=1, eos_id=2, seed=None)
    assert greedy["temperature"] == 0.0 and "top_k" not in greedy
    assert greedy["stop"] == ["\nQuestion:"] and greedy["include_stop_str_in_output"] is False and greedy["detokenize"]


def test_request_seeds_are_reproducible_and_never_shared_within_a_run():
    seeds = [request_seed(42, version, call, i, 4) + j
             for version in range(3) for call in range(2) for i in range(16) for j in range(4)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert request_seed(42, 1, 0, 3, 4) == request_seed(42, 1, 0, 3, 4) != request_seed(43, 1, 0, 3, 4)


def _rows_as_engine_tokens(out, eos_id: int, pad_id: int) -> list[list[int]]:
    """What an engine returns for each row of an HF rollout: its tokens up to and including the
    first EOS, or up to where the row stopped (trailing pads dropped)."""
    rows = []
    for response in out.sequences[:, out.prompt_len:].tolist():
        if eos_id in response:
            rows.append(response[: response.index(eos_id) + 1])
        else:
            while response and response[-1] == pad_id:
                response = response[:-1]
            rows.append(response)
    return rows


def _assert_same_layout(engine_out, hf_out):
    assert torch.equal(engine_out.sequences, hf_out.sequences)
    assert torch.equal(engine_out.attention_mask, hf_out.attention_mask)
    assert torch.equal(engine_out.response_mask, hf_out.response_mask)
    assert engine_out.prompt_len == hf_out.prompt_len and engine_out.texts == hf_out.texts


@pytest.mark.parametrize("k", [1, 3])
def test_engine_tokens_are_laid_out_as_hf_generate_lays_them_out(tiny_checkpoint, splits, k):
    lm, tok = load_causal_lm(str(tiny_checkpoint)), load_tokenizer(str(tiny_checkpoint))
    prompts = [encode_prompt(tok, ex, 64) for ex in splits[1][:4]]
    assert len({len(p) for p in prompts}) > 1  # left padding in play
    sampling = Sampling(True, 1.0, 0, 1.0, 24)
    torch.manual_seed(3)
    free = generate(lm, tok, prompts, sampling, k)
    # A random model says </s> once in ~500 tokens: the (ordinary) token it says most often plays EOS instead.
    counts = free.sequences[:, free.prompt_len:].flatten().bincount(minlength=len(tok))
    counts[tok.all_special_ids] = 0
    tok.eos_token = tok.convert_ids_to_tokens(int(counts.argmax()))
    torch.manual_seed(3)
    hf = generate(lm, tok, prompts, sampling, k)
    tokens = _rows_as_engine_tokens(hf, tok.eos_token_id, tok.pad_token_id)
    lengths = {len(t) for t in tokens}
    assert len(lengths) > 1 and any(t[-1] == tok.eos_token_id for t in tokens)  # rows ended at EOS and ran on
    _assert_same_layout(generated_from_tokens(prompts, tokens, tok, sampling, k), hf)


def test_engine_tokens_that_stopped_at_a_stop_string_are_laid_out_as_hf(tiny_checkpoint, splits):
    lm, tok = load_causal_lm(str(tiny_checkpoint)), load_tokenizer(str(tiny_checkpoint))
    prompts = [encode_prompt(tok, ex, 64) for ex in splits[1][:3]]
    free = generate(lm, tok, prompts, Sampling(False, max_new_tokens=20))
    stop = free.texts[0][6:9]  # text the first row writes in its middle
    assert stop and len(free.texts[0]) > 12
    sampling = Sampling(False, max_new_tokens=20, stop=stop)
    stopped = generate(lm, tok, prompts, sampling)
    assert stopped.sequences.shape[1] < free.sequences.shape[1] or stopped.texts != free.texts
    tokens = _rows_as_engine_tokens(stopped, tok.eos_token_id, tok.pad_token_id)
    _assert_same_layout(generated_from_tokens(prompts, tokens, tok, sampling, 1), stopped)


def test_engine_logprobs_sit_on_the_response_and_their_gap_is_measured(tiny_checkpoint, splits):
    tok = load_tokenizer(str(tiny_checkpoint))
    prompts = [encode_prompt(tok, ex, 64) for ex in splits[1][:2]]
    tokens = [[5, 6, tok.eos_token_id], [7, tok.eos_token_id]]
    out = generated_from_tokens(prompts, tokens, tok, Sampling(max_new_tokens=4), 1,
                                [[-1.0, -2.0, -3.0], [-0.5, -0.25]])
    assert out.engine_logprobs.tolist() == [[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]]
    trainer = torch.tensor([[-1.5, -2.0, -3.0], [-0.5, -0.25, -9.0]])  # padding differs: not counted
    assert logprob_gap(out, trainer) == {"engine_logprob_gap": pytest.approx(0.5 / 5)}
    plain = generate(load_causal_lm(str(tiny_checkpoint)), tok, prompts, Sampling(False, max_new_tokens=4))
    assert logprob_gap(plain, trainer[:, :plain.response_mask.shape[1]]) == {}
    with pytest.raises(ValueError, match="3 completions for 2 prompts x 2"):
        generated_from_tokens(prompts, tokens + [[1]], tok, Sampling(), 2)


def test_exported_weights_are_the_checkpoints_tensors(tiny_checkpoint):
    lm = load_causal_lm(str(tiny_checkpoint))
    saved = load_file(str(tiny_checkpoint / "model.safetensors"))
    exported = dict(export_weights(lm))
    # The checkpoint's names, as vLLM's load_weights reads them; the tied output head is the embedding.
    assert set(saved) <= set(exported) and set(exported) - set(saved) <= {"lm_head.weight"}
    for name, tensor in saved.items():
        assert exported[name].shape == tensor.shape and torch.equal(exported[name], tensor), name
    assert not any(t.requires_grad for t in exported.values())


def test_exported_lora_weights_are_merged(tiny_checkpoint):
    peft_lm = add_lora(load_causal_lm(str(tiny_checkpoint)), 4, 8.0, 0.0, ["all-linear"])
    with torch.no_grad():
        for name, p in peft_lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # fresh adapters are zero: make them change the weights
    exported = dict(export_weights(peft_lm))
    before = load_causal_lm(str(tiny_checkpoint)).state_dict()
    reference = peft_lm.merge_and_unload().state_dict()  # peft's own merge
    assert set(exported) == set(reference) == set(before)  # the plain model's names: no peft prefixes
    for name, tensor in reference.items():
        assert torch.allclose(exported[name], tensor, atol=1e-6), name
    changed = [n for n in before if not torch.equal(exported[n], before[n])]
    assert len(changed) >= 4  # the adapters moved the attention and MLP weights


def test_vllm_engine_without_vllm_is_a_clear_error(monkeypatch, tmp_path, splits, tiny_checkpoint):
    from reftkit.commands.cli import main
    from reftkit.trainers.reft import train_reft

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails as when it is not installed
    with pytest.raises(MissingEngineError, match="needs vLLM.*pip install vllm"):
        check_engine("vllm")
    cfg = ReFTConfig(model=str(tiny_checkpoint), output_dir=tmp_path / "run", rollout_engine="vllm", progress=False,
                     **LENGTHS)
    with pytest.raises(MissingEngineError):
        train_reft(cfg, splits[0][:8])
    assert not (tmp_path / "run").exists()  # refused before the run directory was claimed
    assert main(["reft", "--model", str(tiny_checkpoint), "--output_dir", str(tmp_path / "cli"),
                 "--rollout_engine", "vllm"]) != 0
    check_engine("hf")  # the default needs nothing more
    monkeypatch.setitem(sys.modules, "vllm", type(sys)("vllm"))  # installed, but two processes
    with pytest.raises(ValueError, match="one process"):
        check_engine("vllm", num_processes=2)


class RecordingEngine(HFEngine):
    """The HF path behind the engine interface, recording what the trainer asks of it, and
    returning its own log-probs as a vLLM engine does (the HF scores: a gap near 0)."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.calls: list[tuple] = []

    def sample(self, prompts, sampling, k):
        self.calls.append(("sample", k, sampling.max_new_tokens, sampling.temperature))
        out = super().sample(prompts, sampling, k)
        positions = (out.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = self.lm(input_ids=out.sequences, attention_mask=out.attention_mask, position_ids=positions).logits
        logprobs = (logits[:, out.prompt_len - 1 : -1].float() / sampling.temperature).log_softmax(-1).gather(
            -1, out.sequences[:, out.prompt_len:].unsqueeze(-1)).squeeze(-1) * out.response_mask
        return EngineGenerated(out.sequences, out.attention_mask, out.response_mask, out.prompt_len, out.texts,
                               logprobs + 0.25 * out.response_mask)  # an engine off by 0.25 per token

    def push_weights(self, lm, version):
        weights = {n: t.clone() for n, t in export_weights(lm)}
        self.calls.append(("push", version, weights))
        super().push_weights(lm, version)

    def sleep(self):
        self.calls.append(("sleep",))


def test_trainer_samples_through_the_engine_and_pushes_weights_after_each_update(monkeypatch, tmp_path, splits,
                                                                                  tiny_checkpoint):
    import reftkit.trainers.reft as reft

    engines = []

    def recording(name, lm, tokenizer, **kw):
        engines.append(RecordingEngine(tokenizer))
        return engines[-1]

    monkeypatch.setattr(reft, "make_engine", recording)
    cfg = ReFTConfig(model=str(tiny_checkpoint), output_dir=tmp_path, batch_size=4, num_samples=2,
                     mini_batch_size=8, lr=1e-3, temperature=0.9, progress=False, **LENGTHS)
    reft.train_reft(cfg, splits[0][:8])
    calls = engines[0].calls
    assert [c[0] for c in calls] == ["push", "sample", "sleep", "push", "sample", "sleep", "push"]
    assert [c[1] for c in calls if c[0] == "push"] == [0, 1, 2]  # the weights' version is the step
    assert calls[1][1:] == (2, LENGTHS["max_length"] - LENGTHS["max_prompt_tokens"], 0.9)
    first, second = calls[0][2], calls[3][2]
    assert any(not torch.equal(first[n], second[n]) for n in first)  # the update's weights were pushed
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["engine_logprob_gap"] for r in rows if "engine_logprob_gap" in r]
    assert len(gaps) == 2 and all(g == pytest.approx(0.25, abs=1e-4) for g in gaps)
