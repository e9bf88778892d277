"""The memory options: LoRA (adapter-free reference, merged checkpoints) and gradient checkpointing."""

import copy
import itertools
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from conftest import LENGTHS
from reftkit.config import ReFTConfig, SFTConfig
from reftkit.data.prompts import encode_prompt
from reftkit.grading.rewards import Rewards
from reftkit.modeling import loading as model_loading
from reftkit.modeling.lora import add_lora, lora_layers, merged_state_dict, reference_lm
from reftkit.modeling.model import (
    PolicyWithValueHead,
    checkpointing_in_eval_mode,
    enable_gradient_checkpointing,
    load_tokenizer,
)
from reftkit.modeling.scoring import lm_response_logprobs, token_logprobs
from reftkit.rollout.generation import Sampling, generate
from reftkit.trainers import reft as reft_module
from reftkit.trainers import sft as sft_module
from reftkit.training.checkpoints import ACCELERATE_DIR, latest_checkpoint
from reftkit.training.metrics import Metrics

PROMPT_LEN = 8


def load(path):
    return AutoModelForCausalLM.from_pretrained(path)


def lora(lm, r=4):
    return add_lora(lm, r=r, alpha=8.0, dropout=0.0, target_modules=["all-linear"])


def token_batch(vocab_size, rows=4, length=20, seed=0):
    """Random tokens with some left padding, as a rollout has."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(range(0, 2 * rows, 2)):
        mask[row, :pad] = 0
    return ids, mask


def sequence_loss(policy, ids, mask):
    logits, values = policy.position_logits(ids, mask)
    logp = token_logprobs(logits[:, PROMPT_LEN - 1 : -1], ids[:, PROMPT_LEN:])
    return -logp.mean() + values.pow(2).mean()


def test_only_adapters_and_value_head_train(tiny_checkpoint):
    policy = PolicyWithValueHead(lora(load(tiny_checkpoint)))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n or n.startswith("value_head.") for n in trainable)
    adapted = {n.rsplit(".", 1)[-1] for n in lora_layers(policy.lm)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head


def test_adapters_off_give_the_base_model_after_training(tiny_checkpoint):
    base = load(tiny_checkpoint).eval()
    policy = PolicyWithValueHead(lora(load(tiny_checkpoint))).eval()
    ids, mask = token_batch(base.config.vocab_size)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        sequence_loss(policy, ids, mask).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(policy.lm.get_submodule(n).lora_B["default"].weight.abs().sum() > 0 for n in lora_layers(policy.lm))

    with torch.no_grad():
        expected = lm_response_logprobs(base, ids, mask, PROMPT_LEN)
        with reference_lm(policy.lm, None) as ref:
            reference = lm_response_logprobs(ref, ids, mask, PROMPT_LEN)
        adapted = lm_response_logprobs(policy.lm, ids, mask, PROMPT_LEN)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-6)
    assert (adapted - expected).abs().max() > 1e-2  # and the context restored the adapters


def test_reference_without_lora_needs_a_loaded_model(tiny_checkpoint):
    lm = load(tiny_checkpoint)
    with reference_lm(lm, lm) as ref:
        assert ref is lm
    with pytest.raises(ValueError, match="without LoRA"), reference_lm(lm, None):
        pass


def tiny_gpt2():
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # GPT-2: Conv1D weights are stored transposed
def test_merged_state_dict_matches_peft_merge_without_touching_the_model(tiny_checkpoint, arch):
    model = random_lora(load(tiny_checkpoint) if arch == "llama" else tiny_gpt2())
    merged = merged_state_dict(model.state_dict(), lora_layers(model))
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6)
    assert isinstance(model, PeftModel) and not any(model.get_submodule(n).merged for n in lora_layers(model))


def test_merging_an_unsupported_adapter_is_an_error(tiny_checkpoint):
    model = add_lora(load(tiny_checkpoint), 4, 8.0, 0.0, ["embed_tokens"])  # an embedding adapter
    with pytest.raises(ValueError, match="only plain linear LoRA"):
        merged_state_dict(model.state_dict(), lora_layers(model))


def test_reft_with_lora_loads_no_second_model_and_saves_merged_weights(tmp_path, splits, tiny_checkpoint,
                                                                       monkeypatch):
    loads = []
    real_load = reft_module.load_causal_lm
    for module in (reft_module, model_loading):  # the reference's load, and the policy's
        monkeypatch.setattr(module, "load_causal_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    # An untrained model earns no reward; alternating rewards give PPO something to learn.
    rewards = itertools.cycle([0.0, 1.0, 1.0])

    def alternating(completions, **kwargs):
        return [next(rewards) for _ in completions]

    cfg = ReFTConfig(model=str(tiny_checkpoint), output_dir=tmp_path, epochs=1, batch_size=8, num_samples=2,
                     mini_batch_size=8, lr=1e-2, progress=False, lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
                     gradient_checkpointing=True, **LENGTHS)
    final = reft_module.train_reft(cfg, splits[0][:16], rewards=Rewards([alternating]))
    assert len(loads) == 1  # the policy; the reference is the same model with adapters off
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # fresh adapters (B = 0): policy == reference

    # The final directory is a plain checkpoint: no peft keys, loads with from_pretrained alone.
    saved = load_file(str(final / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in saved)
    assert isinstance(load(final), LlamaForCausalLM)
    # Its weights are the peft merge of the trained adapters (kept in the resumable state) into the base.
    trained = load_file(str(latest_checkpoint(tmp_path) / ACCELERATE_DIR / "model.safetensors"))
    peft_model = lora(load(tiny_checkpoint))
    result = peft_model.load_state_dict({k.removeprefix("lm."): v for k, v in trained.items() if k.startswith("lm.")},
                                        strict=False)
    assert result.missing_keys == ["base_model.model.lm_head.weight"] and not result.unexpected_keys  # tied
    expected = peft_model.merge_and_unload().state_dict()
    base = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert any(not torch.equal(saved[k], base[k]) for k in saved)  # the adapters learned something
    for key in saved:
        torch.testing.assert_close(saved[key], expected[key], rtol=1e-5, atol=1e-6)
    assert torch.equal(saved["model.norm.weight"], base["model.norm.weight"])  # non-adapted weights frozen


def random_lora(lm):
    """Seeded adapters with non-zero B, so the A matrices get gradients too."""
    torch.manual_seed(1)
    model = lora(lm)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.1)
    return model


def loss_and_grads(model, ids, mask, labels):
    model.zero_grad()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_lora", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(tiny_checkpoint, use_lora):
    plain, checkpointed = load(tiny_checkpoint).train(), load(tiny_checkpoint).train()
    enable_gradient_checkpointing(checkpointed)
    if use_lora:
        plain, checkpointed = random_lora(plain), random_lora(checkpointed)
    ids, mask = token_batch(plain.config.vocab_size)
    labels = ids.masked_fill(mask == 0, -100)
    (loss_a, grads_a), (loss_b, grads_b) = (loss_and_grads(m, ids, mask, labels) for m in (plain, checkpointed))
    torch.testing.assert_close(loss_a, loss_b)
    trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys() == trainable  # every trainable weight gets a gradient
    assert all(".lora_" in n for n in grads_a) == use_lora
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)


def test_checkpointing_in_eval_mode_recomputes_and_keeps_generation(tiny_checkpoint, splits):
    """ReFT keeps the policy in eval mode; its update must still checkpoint, and sampling still use the cache."""
    plain = PolicyWithValueHead(load(tiny_checkpoint)).eval()
    checkpointed = PolicyWithValueHead(load(tiny_checkpoint)).eval()
    enable_gradient_checkpointing(checkpointed.lm)
    ids, mask = token_batch(plain.lm.config.vocab_size)
    calls = []
    checkpointed.lm.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))

    sequence_loss(plain, ids, mask).backward()
    with checkpointing_in_eval_mode(checkpointed):
        loss = sequence_loss(checkpointed, ids, mask)
    loss.backward()
    assert len(calls) == 2  # forward, then the recomputation in backward
    assert not any(m.training for m in checkpointed.modules())
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)

    tokenizer = load_tokenizer(str(tiny_checkpoint))
    prompts = [encode_prompt(tokenizer, ex, LENGTHS["max_prompt_tokens"]) for ex in splits[1][:4]]
    greedy = Sampling(do_sample=False, max_new_tokens=12)
    a, b = (generate(p.lm, tokenizer, prompts, greedy) for p in (plain, checkpointed))
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.slow
def test_sft_with_lora_resumes_exactly(tmp_path, splits, tiny_checkpoint, monkeypatch):
    """The resumable state holds the whole PeftModel (frozen base + adapters) and the adapters' optimiser."""
    def cfg(out, **kw):
        return SFTConfig(model=str(tiny_checkpoint), output_dir=out, epochs=2, batch_size=16, lr=1e-2,
                         progress=False, eval_every_epoch=False, save_every=1, lora_r=4, lora_dropout=0.0,
                         gradient_checkpointing=True, **LENGTHS, **kw)

    full = sft_module.train_sft(cfg(tmp_path / "full"), splits[0])
    real_log, count = Metrics.log, {"n": 0}

    def dying_log(self, record, step):
        if count["n"] == 4:  # 3 steps per epoch: dies in epoch 2
            raise KeyboardInterrupt
        count["n"] += 1
        real_log(self, record, step)

    monkeypatch.setattr(Metrics, "log", dying_log)
    with pytest.raises(KeyboardInterrupt):
        sft_module.train_sft(cfg(tmp_path / "cut"), splits[0])
    monkeypatch.undo()
    resumed = sft_module.train_sft(cfg(tmp_path / "cut", resume=True), splits[0])
    a, b = (load_file(str(d / "model.safetensors")) for d in (full, resumed))
    base = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
