"""Typed, validated configs. Every hyperparameter is named here once, with its default and meaning.

Defaults follow the paper (GUIDE.md) where it gives a value. An unknown or ill-typed key is an
error that names it (pydantic, extra="forbid").
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CommonConfig(_Config):
    """Options every command shares: model, data, run directory, lengths."""

    model: str = Field("tiny", description="HF model name or directory; 'tiny' builds a small Llama and tokenizer in code from the training data")
    train_file: str | None = Field(None, description="training data (file, directory or HF dataset name)")
    eval_file: str | None = Field(None, description="evaluation data, read each epoch and by `eval`")
    data_format: Literal["auto", "reft", "gsm8k", "svamp", "mathqa", "mathqa-numeric", "hf"] = Field(
        "auto", description="input format of the data files")
    skip_invalid: bool = Field(False, description="skip malformed rows (reported with reasons) instead of stopping")
    output_dir: Path = Field(Path("runs/run"), description="run directory: checkpoints, metrics.jsonl, predictions")
    seed: int = Field(42, description="seed for data order, sampling and initialisation")
    max_prompt_tokens: int = Field(300, gt=0, description="prompt tokens kept (the paper: 300)")
    max_length: int = Field(700, gt=0, description="prompt + response tokens (the paper: 700)")
    eval_batch_size: int = Field(64, gt=0, description="prompts per greedy-decoding batch")
    max_eval_examples: int | None = Field(None, gt=0, description="evaluate on the first N examples only")
    bf16: Literal["auto", "yes", "no"] = Field("auto", description="bf16 autocast: auto = on for CUDA, off on CPU")
    log_with: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list, description="extra trackers (metrics.jsonl is always written)")
    progress: bool = Field(True, description="show progress bars")
    resume: bool = Field(False, description="continue from the newest checkpoint in output_dir")

    @model_validator(mode="after")
    def _lengths(self):
        if self.max_prompt_tokens >= self.max_length:
            raise ValueError(f"max_prompt_tokens ({self.max_prompt_tokens}) must be < max_length ({self.max_length})")
        return self


class OptimConfig(_Config):
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of steps for linear warm-up")
    lr_schedule: Literal["linear", "constant"] = Field("linear", description="after warm-up: linear decay to 0, or constant")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    grad_accum: int = Field(1, gt=0, description="gradient accumulation steps")


class SFTConfig(CommonConfig, OptimConfig):
    """Supervised fine-tuning on (question, reference CoT); loss on response tokens only."""

    epochs: int = Field(3, gt=0)
    batch_size: int = Field(16, gt=0, description="examples per process per micro-batch")
    eval_every_epoch: bool = Field(True, description="greedy accuracy on eval_file after each epoch")


class ReFTConfig(CommonConfig, OptimConfig):
    """ReFT: PPO from a warm-up SFT checkpoint (`model`), rewarded by answer correctness."""

    lr: float = Field(3e-6, gt=0, description="the paper: 3e-7 (7B), 3e-6 (small models)")
    lr_schedule: Literal["linear", "constant"] = "constant"
    ref_model: str | None = Field(None, description="frozen KL reference; default: the warm-up checkpoint (`model`)")
    epochs: int = Field(1, gt=0, description="passes over the training questions")
    batch_size: int = Field(8, gt=0, description="questions per process per rollout batch")
    num_samples: int = Field(1, gt=0, description="sampled responses per question")
    mini_batch_size: int = Field(8, gt=0, description="responses per process per PPO update")
    ppo_epochs: int = Field(2, gt=0, description="optimisation passes over each rollout batch")
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1)
    kl_coef: float = Field(0.05, ge=0, description="beta: 0.05 N-CoT, 0.01 P-CoT; 0 collapses training")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip")
    value_clip_range: float = Field(0.2, gt=0)
    vf_coef: float = Field(5.0, ge=0, description="value loss coefficient")
    whiten_advantages: bool = Field(True, description="whiten over the global batch (all processes)")
    correct_reward: float = 1.0
    partial_reward: float = Field(0.1, description="answer extracted but wrong; 0 turns partial credit off")
    eval_every: int = Field(0, ge=0, description="greedy eval every N rollout batches (0: each epoch only)")
    save_every: int = Field(0, ge=0, description="checkpoint every N rollout batches (0: each epoch only)")


class EvalConfig(CommonConfig):
    """Greedy decoding and top-1 accuracy of a checkpoint (`model`) on eval_file."""


class DemoConfig(_Config):
    """The built-in demo: synthetic problems, tiny model, SFT warm-up then ReFT vs continued SFT."""

    output_dir: Path = Field(Path("runs/demo"), description="where the demo writes its runs")
    seed: int = 0
    n_train: int = Field(2000, gt=0)
    n_test: int = Field(500, gt=0)
    progress: bool = True
