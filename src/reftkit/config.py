"""Typed, validated configs. Every hyperparameter is named here once, with its default and meaning.

Defaults follow the paper (GUIDE.md) where it gives a value. An unknown or ill-typed key is an
error that names it (pydantic, extra="forbid").
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from reftkit.cot import CotStyle


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CommonConfig(_Config):
    """Options every command shares: model, data, run directory, lengths."""

    model: str = Field("tiny", description="HF model name or directory; 'tiny' builds a small Llama and tokenizer in code from the training data")
    train_file: str | None = Field(None, description="training data (file, directory or HF dataset name)")
    eval_file: str | None = Field(None, description="evaluation data, read each epoch and by `eval`")
    data_format: Literal["auto", "reft", "gsm8k", "svamp", "mathqa", "mathqa-numeric", "hf"] = Field(
        "auto", description="input format of the data files")
    cot: CotStyle = Field(
        "natural", description="chain of thought: natural-language reasoning, or a Python program run in the sandbox")
    exec_workers: int = Field(2, gt=0, description="program CoT: sandbox worker processes")
    exec_timeout: float = Field(2.0, gt=0, description="program CoT: wall-clock seconds per program")
    exec_memory_mb: int = Field(512, gt=0, description="program CoT: memory limit per program (MiB)")
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
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of steps for linear warm-up")
    lr_schedule: Literal["linear", "constant"] = Field("linear", description="after warm-up: linear decay to 0, or constant")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    grad_accum: int = Field(1, gt=0, description="gradient accumulation steps")


class TrainConfig(CommonConfig, OptimConfig):
    """What both training recipes share: passes over the data, batch size, checkpoint cadence."""

    epochs: int = Field(3, gt=0, description="passes over the training data")
    batch_size: int = Field(16, gt=0, description="examples (SFT) or questions (ReFT) per process per batch")
    save_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: at the end of each epoch only)")


class SFTConfig(TrainConfig):
    """Supervised fine-tuning on (question, reference CoT); loss on response tokens only."""

    eval_every_epoch: bool = Field(True, description="greedy accuracy on eval_file after each epoch")


class ReFTConfig(TrainConfig):
    """ReFT: PPO from a warm-up SFT checkpoint (`model`), rewarded by answer correctness."""

    lr: float = Field(3e-6, gt=0, description="the paper: 3e-7 (7B), 3e-6 (small models)")
    lr_schedule: Literal["linear", "constant"] = Field("constant", description="the paper keeps the rate constant")
    ref_model: str | None = Field(None, description="frozen KL reference; default: the warm-up checkpoint (`model`)")
    epochs: int = Field(1, gt=0, description="passes over the training questions")
    batch_size: int = Field(8, gt=0, description="questions per process per rollout batch")
    num_samples: int = Field(1, gt=0, description="sampled responses per question")
    mini_batch_size: int = Field(8, gt=0, description="responses per process per PPO update")
    ppo_epochs: int = Field(2, gt=0, description="optimisation passes over each rollout batch")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (the paper: 1.0)")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1.0 = off")
    kl_coef: float | None = Field(None, ge=0, description="beta; default: 0.05 for natural CoT, 0.01 for program CoT (the paper). 0 collapses training")
    gamma: float = Field(1.0, ge=0, le=1, description="discount (the paper: 1.0)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip")
    value_clip_range: float = Field(0.2, gt=0, description="clip of the value update around the rollout value")
    vf_coef: float = Field(5.0, ge=0, description="value loss coefficient")
    value_head_lr: float | None = Field(None, gt=0, description="learning rate of the value head; default: lr (the paper). A fresh head learns little at a policy's small lr")
    whiten_advantages: bool = Field(True, description="whiten over the global batch (all processes)")
    correct_reward: float = Field(1.0, description="reward of a correct final answer")
    partial_reward: float = Field(0.1, description="answer extracted but wrong; 0 turns partial credit off")
    eval_every: int = Field(0, ge=0, description="greedy eval every N rollout batches (0: each epoch only)")

    @property
    def kl_beta(self) -> float:
        if self.kl_coef is not None:
            return self.kl_coef
        return 0.01 if self.cot == "program" else 0.05


class EvalConfig(CommonConfig):
    """Greedy decoding and top-1 accuracy of a checkpoint (`model`) on eval_file."""


class DemoConfig(_Config):
    """The built-in demo: synthetic problems, tiny model, SFT warm-up then ReFT vs continued SFT."""

    output_dir: Path = Field(Path("runs/demo"), description="where the demo writes its three runs and results.json")
    seed: int = Field(0, description="seeds the synthetic data, the model initialisation and sampling")
    cot: CotStyle = Field("natural", description="natural-language CoT, or Python programs run in the sandbox")
    n_train: int = Field(6000, gt=0, description="synthetic training questions (one reference CoT each)")
    n_test: int = Field(500, gt=0, description="held-out test questions (disjoint from training)")
    one_line_fraction: float = Field(0.5, ge=0, le=1, description="share of reference CoTs from the annotator who skips steps (one-line / hand-computed)")
    warmup_epochs: int = Field(6, gt=0, description="warm-up SFT epochs")
    sft_lr: float = Field(3e-3, gt=0, description="warm-up SFT learning rate")
    sft_batch_size: int = Field(32, gt=0, description="examples per SFT batch")
    sft_extra_epochs: int = Field(1, gt=0, description="epochs of the continued-SFT baseline after warm-up")
    sft_continue_lr: float = Field(3e-4, gt=0, description="learning rate of the continued-SFT baseline")
    reft_questions: int = Field(800, gt=0, description="ReFT trains on this many of the training questions")
    reft_epochs: int = Field(2, gt=0, description="ReFT passes over those questions")
    reft_lr: float = Field(5e-5, gt=0, description="ReFT learning rate (constant)")
    reft_value_head_lr: float = Field(1e-3, gt=0, description="learning rate of ReFT's freshly initialised value head")
    reft_batch_size: int = Field(32, gt=0, description="questions per rollout batch")
    num_samples: int = Field(4, gt=0, description="samples per question in ReFT")
    kl_coef: float | None = Field(None, ge=0, description="ReFT KL coefficient; default: the paper's for the CoT style")
    progress: bool = Field(True, description="show progress bars")
