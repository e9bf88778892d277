"""Shared fixtures: a tiny synthetic dataset and tiny checkpoints, built in code (no download)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from reftkit.config import ReFTConfig, SFTConfig
from reftkit.data.prompts import prompt_text, response_text
from reftkit.data.synthetic import make_splits
from reftkit.modeling.tiny import build_model, build_tokenizer
from reftkit.training import device

LENGTHS = {"max_prompt_tokens": 64, "max_length": 112}

# `--bf16 auto` turns bf16 on where the CPU has bf16 matrix units (AMX, AVX-512 BF16). The suite must
# mean the same on every CPU, so auto means float32 here (this module is also imported by the
# multi-process script); tests/test_precision.py checks the detection and asks for bf16 itself.
REAL_CPU_BF16_UNITS, device.cpu_bf16_units = device.cpu_bf16_units, lambda: None

# The test models are tiny: one intra-op thread is as fast as two on an idle machine and several
# times faster on a busy one, where OpenMP threads spin waiting for each other.
torch.set_num_threads(1)


def tiny_model_dir(path, train):
    """A small random Llama + tokenizer saved as a plain HF directory."""
    tokenizer = build_tokenizer(prompt_text(e) + response_text(e) for e in train)
    model = build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def warmup_config(model, output_dir, **kw):
    """SFT long enough that the model writes the answer trigger, so PPO rewards vary."""
    return SFTConfig(model=str(model), output_dir=output_dir, epochs=40, batch_size=16, lr=1e-2,
                     eval_every_epoch=False, progress=False, **LENGTHS, **kw)


def sft_config(out, model, **kw) -> SFTConfig:
    """A short SFT run on a tiny model; a test overrides what it examines."""
    base = dict(model=str(model), output_dir=out, epochs=2, batch_size=16, lr=1e-3, progress=False,
                eval_every_epoch=False, eval_batch_size=16, **LENGTHS)
    return SFTConfig(**{**base, **kw})


def reft_config(out, model, **kw) -> ReFTConfig:
    """A short ReFT run (2 samples per question, one minibatch per rollout batch) on a tiny checkpoint."""
    base = dict(model=str(model), output_dir=out, epochs=1, batch_size=8, num_samples=2, mini_batch_size=8,
                lr=1e-4, progress=False, eval_batch_size=16, **LENGTHS)
    return ReFTConfig(**{**base, **kw})


def weights(path) -> dict:
    """The tensors of a run directory's model.safetensors."""
    return load_file(str(path / "model.safetensors"))


def metrics(run_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def splits():
    return make_splits(48, 16, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, splits):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", splits[0])


@pytest.fixture(scope="session")
def warm_checkpoint(tmp_path_factory, splits, tiny_checkpoint):
    from reftkit.trainers.sft import train_sft

    return train_sft(warmup_config(tiny_checkpoint, tmp_path_factory.mktemp("warm")), splits[0])
