"""Typed, validated configs: one explicit config per command, built from small sections.

A section holds the options of one concern (the run, the data, the sandbox, the optimiser, ...)
and is declared once; a command's config lists the sections it honours and declares its own
budget (epochs, batch size, learning rate, samples) with the defaults that command needs. An
option a command cannot honour is not one of its fields, so it is rejected, as is an unknown or
ill-typed key (pydantic, extra="forbid", strict types). Defaults follow the paper (Luong et al.,
ACL 2024, and its authors' code) where it gives a value.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from reftkit.executor.config import check_workers
from reftkit.executor.config import usable_cpus as _usable_cpus
from reftkit.grading.cot import CotStyle
from reftkit.rl.methods import ESTIMATORS, RL_METHODS, Estimator, advantage_help

AdvantageName = Literal[tuple(ESTIMATORS)]


# Strict types: a YAML `batch_size: "8"` or `save_every: true` is an error, not silently converted
# (the command line's strings are converted by the CLI first); NaN and infinity are never a setting.
LaxPath = Annotated[Path, Strict(False)]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------- sections

class RunOptions(_Config):
    """Every command: the model, where results go, seed, precision, progress bars."""

    model: str = Field("tiny", description=(
        "HF model name or directory; 'tiny' builds a small Llama and tokenizer in code from the training data"
    ))
    output_dir: LaxPath = Field(Path("runs/run"), description="run directory: checkpoints, metrics.jsonl, predictions")
    seed: int = Field(42, description="seed for data order, sampling and initialisation")
    bf16: Literal["auto", "yes", "no"] = Field("auto", description=(
        "bf16 autocast (weights, optimiser state and checkpoints stay float32): auto = on for CUDA and for CPUs with "
        "bf16 matrix units (AMX, AVX-512 BF16, Arm BF16), else off"
    ))
    progress: bool = Field(True, description="show progress bars")


class DataOptions(_Config):
    """How math data is read and laid out as prompts."""

    data_format: Literal["auto", "reft", "gsm8k", "svamp", "mathqa", "mathqa-numeric", "hf"] = Field(
        "auto", description="input format of the data files")
    cot: CotStyle = Field(
        "natural", description="chain of thought: natural-language reasoning, or a Python program run in the sandbox")
    skip_invalid: bool = Field(False, description="skip malformed rows (reported with reasons) instead of stopping")
    max_prompt_tokens: int = Field(300, gt=0, description="prompt tokens kept (the paper: 300)")
    max_length: int = Field(700, gt=0, description="prompt + response tokens (the paper: 700)")

    @model_validator(mode="after")
    def _lengths(self):
        if self.max_prompt_tokens >= self.max_length:
            raise ValueError(f"max_prompt_tokens ({self.max_prompt_tokens}) must be < max_length ({self.max_length})")
        return self


# SandboxOptions' options -> the ExecutorConfig fields they set
_EXECUTOR_FIELDS = {"exec_workers": "workers", "exec_timeout": "timeout_s", "exec_memory_mb": "memory_mb",
                    "exec_programs_per_child": "programs_per_child"}


class SandboxOptions(_Config):
    """Program CoT: the sandbox that runs model-written programs (docs/executor.md)."""

    exec_workers: int = Field(default_factory=lambda: min(2, _usable_cpus()), gt=0,
                              description="program CoT: sandbox worker processes, at most the CPUs this process "
                                          "may use (default: 2, or 1 on one CPU)")
    exec_timeout: float = Field(2.0, gt=0, description="program CoT: wall-clock seconds per program")
    exec_memory_mb: int = Field(512, gt=0, description="program CoT: memory limit per program (MiB)")
    exec_programs_per_child: int = Field(
        1, gt=0, description="program CoT: programs run in turn by one forked child (1: a fresh process each; "
                            "more is faster but programs of a child share module state, docs/executor.md)")

    @field_validator("exec_workers")
    @classmethod
    def _workers_the_machine_runs(cls, workers: int) -> int:
        check_workers(workers)  # refused here, before any work, rather than run oversubscribed
        return workers

    @model_validator(mode="after")
    def _sandbox_limits(self):
        # the executor's own checks (e.g. its minimum memory), here so a bad limit is refused before any loading
        try:
            self.executor_config()
        except ValueError as e:
            message = str(e)
            for option, field in _EXECUTOR_FIELDS.items():
                message = re.sub(rf"\b{field}\b", option, message)
            raise ValueError(message) from None
        return self

    def executor_config(self):
        """The sandbox's limits (reftkit.executor.ExecutorConfig) that these options set."""
        from reftkit.executor.config import ExecutorConfig  # no heavy imports: workers import it first

        return ExecutorConfig(**{field: getattr(self, option) for option, field in _EXECUTOR_FIELDS.items()})


class TrainData(_Config):
    train_file: str | None = Field(None, description=(
        "training data (file, directory of JSON/JSONL files, or HF dataset name)"
    ))
    max_train_examples: int | None = Field(None, gt=0, description="train on the first N training examples only")

    @property
    def train_needs_cot(self) -> bool:
        """Whether every training row needs a reference CoT: training on it (not so for the commands
        that use only the questions and gold answers)."""
        return True


class EvalData(_Config):
    eval_file: str | None = Field(None, description="evaluation data (a question and a gold answer per row)")
    eval_batch_size: int = Field(64, gt=0, description=(
        "responses per decoding batch (k samples each: eval_batch_size // k prompts, or one prompt's samples in chunks "
        "of eval_batch_size)"
    ))
    max_eval_examples: int | None = Field(None, gt=0, description="evaluate on the first N examples only")


class Tracking(_Config):
    log_with: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list, description=(
        "extra trackers (metrics.jsonl is always written)"
    ))


class RunDirOptions(Tracking):
    """A training run's directory: checkpoints, resuming, reuse (README, "Run directories")."""

    save_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: at the end of each epoch only)")
    resume: bool = Field(False, description=(
        "continue the run in output_dir from its newest intact checkpoint (settings must match, README)"
    ))
    push_to_hub: str | None = Field(None, description=(
        "after the final save, upload the final model (with its model card) to this Hugging Face Hub repo id "
        "(huggingface_hub; needs a token with write access)"
    ))
    overwrite_output_dir: bool = Field(False, description=(
        "start afresh in an output_dir that holds another run: its checkpoints, final model, metrics and predictions "
        "are removed first (other files stay)"
    ))


class OptimOptions(_Config):
    """AdamW and its schedule, without the rate (each command declares its own)."""

    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of steps for linear warm-up")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    nonfinite: Literal["stop", "skip"] = Field("stop", description=(
        "a non-finite loss or gradient: stop the run (nothing non-finite is saved; the last checkpoint stays), or skip "
        "that optimiser step and count it"
    ))


class MemoryOptions(_Config):
    gradient_checkpointing: bool = Field(False, description=(
        "recompute each layer's activations in the backward pass: less activation memory for about one more forward "
        "pass of compute"
    ))
    group_by_length: bool = Field(False, description=(
        "batches of similar length, still shuffled per epoch; less padding, but batches are no longer uniformly random "
        "(off: the paper's setup)"
    ))


class LoraOptions(_Config):
    lora_r: int = Field(0, ge=0, description=(
        "LoRA rank; 0 = off (full fine-tuning). With LoRA only the adapters (and ReFT's value head) train, and ReFT's "
        "KL reference is the same model with its adapters disabled"
    ))
    lora_alpha: float = Field(16.0, gt=0, description=(
        "LoRA scale numerator: the update is scaled by lora_alpha / lora_r"
    ))
    lora_dropout: float = Field(0.05, ge=0, lt=1, description=(
        "dropout on the adapters' input (SFT; ReFT runs its policy without dropout)"
    ))
    lora_target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], description=(
        "module names to adapt; all-linear = every linear layer of attention and MLP (not the output head)"
    ))


class AccumulationOptions(_Config):
    grad_accum: int = Field(1, gt=0, description=(
        "micro-batches per optimiser step (gradient accumulation); the effective batch is batch_size x grad_accum x "
        "processes"
    ))


class SamplingOptions(_Config):
    """How responses are sampled (the paper: temperature 1.0 from the full distribution)."""

    temperature: float = Field(1.0, gt=0, description="sampling temperature (the paper: 1.0)")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1.0 = off")


class SamplesInput(SamplingOptions):
    """Samples on the training questions, from a file or drawn from `model` first."""

    samples_file: str | None = Field(None, description=(
        "samples.jsonl from `reftkit sample` on the training questions; default: draw num_samples per training "
        "question from `model`"
    ))
    num_samples: int = Field(100, gt=0, description="samples per training question when drawing them (the paper: 100)")


class EngineOptions(_Config):
    """Where rollouts are sampled (docs/rollout-engines.md)."""

    rollout_engine: Literal["hf", "vllm"] = Field("hf", description=(
        "hf = transformers' generate on the policy; vllm = an in-process vLLM engine (installed separately) that gets "
        "the policy's weights after every update, its samples rescored by the trainer's own forward"
    ))
    vllm_sleep_mode: bool = Field(False, description=(
        "vllm engine, CUDA only: free the engine's weights and KV cache during each update (vLLM's sleep mode)"
    ))


class TrainerOptions(RunOptions, DataOptions, SandboxOptions, TrainData, RunDirOptions, OptimOptions, MemoryOptions):
    """What every training command honours; each command adds its budget and its own options."""


# ----------------------------------------------------------------------------- commands

class SFTConfig(TrainerOptions, EvalData, LoraOptions, AccumulationOptions):
    """Supervised fine-tuning on (question, reference CoT); loss on response tokens only."""

    epochs: int = Field(3, gt=0, description="passes over the training data")
    batch_size: int = Field(16, gt=0, description="examples per process per micro-batch")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    lr_schedule: Literal["linear", "constant"] = Field("linear", description=(
        "after warm-up: linear decay to 0, or constant"
    ))
    eval_every_epoch: bool = Field(True, description="greedy accuracy on eval_file after each epoch")


class ReFTConfig(TrainerOptions, EvalData, LoraOptions, SamplingOptions, EngineOptions):
    """ReFT: PPO from a warm-up SFT checkpoint (`model`), rewarded by answer correctness.
    No grad_accum: a PPO update's unit is mini_batch_size responses."""

    epochs: int = Field(1, gt=0, description="passes over the training questions")
    batch_size: int = Field(8, gt=0, description="questions per process per rollout batch")
    num_samples: int = Field(1, gt=0, description="sampled responses per question")
    lr: float = Field(3e-6, gt=0, description="the paper: 3e-7 (7B), 3e-6 (small models)")
    lr_schedule: Literal["linear", "constant"] = Field("constant", description="the paper keeps the rate constant")
    ref_model: str | None = Field(None, description="frozen KL reference; default: the warm-up checkpoint (`model`)")
    mini_batch_size: int = Field(8, gt=0, description="responses per process per PPO update")
    share_prompts: bool = Field(True, description=(
        "run each question's prompt once for its num_samples responses (sampling's prefill, old log-probs, values, "
        "reference, every update: cached keys and values) and responses in length buckets; minibatches then hold whole "
        "questions. Not in the updates with sft_coef > 0 (they run padded), nor in a vLLM engine's sampling (vLLM "
        "shares prefixes itself). false: every row padded and whole, minibatches of shuffled rows (the numbers of "
        "reftkit before this option)"
    ))
    ppo_epochs: int = Field(2, gt=0, description="optimisation passes over each rollout batch")
    kl_coef: float | None = Field(None, ge=0, description=(
        "beta; default: 0.05 for natural CoT, 0.01 for program CoT (the paper). 0 collapses training"
    ))
    gamma: float = Field(1.0, ge=0, le=1, description="discount (the paper: 1.0)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip")
    value_clip_range: float = Field(0.2, gt=0, description="clip of the value update around the rollout value")
    vf_coef: float = Field(5.0, ge=0, description="value loss coefficient")
    value_head_lr: float | None = Field(None, gt=0, description=(
        "learning rate of the value head; default: lr (the paper). A fresh head learns little at a policy's small lr"
    ))
    whiten_advantages: bool = Field(True, description="whiten over the global batch (all processes)")
    correct_reward: float = Field(1.0, description="reward of a correct final answer")
    partial_reward: float = Field(0.1, description="answer extracted but wrong; 0 turns partial credit off")
    reward: list[str] = Field(default_factory=lambda: ["correctness"], description=(
        "reward functions, each `correctness` (the paper's) or module:function with TRL's signature f(prompts, "
        "completions, completion_ids, grades, **columns) -> list[float | None] (reftkit.grading.rewards); a "
        "completion's reward is their weighted sum"))
    reward_weights: list[float] = Field(default_factory=list, description="one weight per reward function; "
                                        "empty: all 1")
    mask_truncated: bool = Field(False, description=(
        "DAPO's overlong filtering: completions cut at max_length (no EOS) get no loss and no gradient"))
    log_samples_every: int = Field(0, ge=0, description=(
        "every N rollout batches, write a few sampled completions with their rewards to samples.jsonl (0: never)"))
    eval_every: int = Field(0, ge=0, description="greedy eval every N rollout batches (0: each epoch only)")
    advantage: AdvantageName = Field("gae", description=advantage_help())
    kl_in: Literal["reward", "loss"] = Field("reward", description=(
        "where the KL to the reference goes: per-token k1 in the reward (the paper; summed per sequence for the group "
        "estimators), or GRPO's k3 estimate in the loss"
    ))
    sft_coef: float = Field(0.0, ge=0, le=1, description=(
        "mu: each update minimises (1 - mu) * L_RL + mu * L_SFT on its questions' reference CoTs (CHORD's global "
        "coefficient); 0 = off"
    ))
    sft_coef_schedule: Literal["constant", "linear"] = Field("constant", description=(
        "sft_coef constant, or decayed linearly to 0 over training"
    ))
    drop_uniform_groups: bool = Field(False, description=(
        "DAPO's dynamic sampling: drop the questions whose num_samples responses all got the same reward before the "
        "update (logged as dropped_groups)"
    ))

    @model_validator(mode="after")
    def _estimator_options(self):
        if not self.estimator.critic:
            given = sorted(set(CRITIC_OPTIONS) & self.model_fields_set)
            if given:
                raise ValueError(
                    f"{', '.join(given)}: options of the value head and GAE; advantage={self.advantage} has neither"
                )
        if max(self.estimator.min_samples, 2 if self.drop_uniform_groups else 1) > self.num_samples:
            raise ValueError(f"num_samples must be >= 2 for advantage={self.advantage} or drop_uniform_groups "
                             "(a group of one sample has no baseline)")
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise ValueError(f"reward_weights: {len(self.reward_weights)} weights for {len(self.reward)} reward "
                             "functions")
        if not self.reward:
            raise ValueError("reward: name at least one reward function (`correctness` is the paper's)")
        if self.sft_coef_schedule != "constant" and not self.sft_coef:
            raise ValueError("sft_coef_schedule: set sft_coef > 0 (the schedule decays it)")
        return self

    @property
    def train_needs_cot(self) -> bool:
        return self.sft_coef > 0  # PPO needs questions and gold answers; the SFT term the reference CoTs

    @property
    def estimator(self) -> Estimator:
        return ESTIMATORS[self.advantage]

    @property
    def critic(self) -> bool:
        return self.estimator.critic

    @property
    def loss_norm_length(self) -> int | None:
        """The constant a sequence's token sum is divided by (rl.ppo.reduce_tokens); None: the token mean."""
        return self.max_length - self.max_prompt_tokens if self.estimator.loss == "constant_length" else None

    @property
    def kl_beta(self) -> float:
        if self.kl_coef is not None:
            return self.kl_coef
        return 0.01 if self.cot == "program" else 0.05


class OnlineSTConfig(TrainerOptions, EvalData, LoraOptions, AccumulationOptions, SamplingOptions):
    """Online self-training: each batch, sample from the current policy and train on its correct samples
    mixed with the reference CoTs."""

    epochs: int = Field(1, gt=0, description="passes over the training questions")
    batch_size: int = Field(8, gt=0, description=(
        "questions per process per batch; a step trains on their reference CoTs plus up to num_samples correct samples "
        "each"
    ))
    num_samples: int = Field(1, gt=0, description="sampled responses per question")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    lr_schedule: Literal["linear", "constant"] = Field("linear", description=(
        "after warm-up: linear decay to 0, or constant"
    ))
    self_weight: float = Field(0.5, ge=0, le=1, description=(
        "share of the loss on the policy's own correct samples (the paper: 50/50); the rest is on the reference CoTs"
    ))


class OfflineSTConfig(SFTConfig, SamplesInput):
    """Offline self-training: SFT from `model` on the original data plus the correct (deduplicated)
    samples of `model`."""


class RerankerConfig(TrainerOptions, AccumulationOptions, SamplesInput):
    """Outcome reward model: a sequence classifier initialised from an SFT checkpoint (`model`), trained on
    graded samples of the training questions.
    No LoRA: its fresh score head must train fully."""

    epochs: int = Field(2, gt=0, description="passes over the samples")
    batch_size: int = Field(16, gt=0, description="samples per process per micro-batch")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    lr_schedule: Literal["linear", "constant"] = Field("linear", description=(
        "after warm-up: linear decay to 0, or constant"
    ))
    eval_batch_size: int = Field(64, gt=0, description=(
        "responses per decoding batch (k samples each: eval_batch_size // k prompts, or one prompt's samples in chunks "
        "of eval_batch_size), when drawing samples"
    ))

    @property
    def train_needs_cot(self) -> bool:
        return False  # it learns from graded samples of the questions, not from the reference CoTs


class EvalConfig(RunOptions, DataOptions, SandboxOptions, EvalData, Tracking):
    """Greedy decoding and top-1 accuracy of a checkpoint (`model`) on eval_file."""

    train_file: str | None = Field(None, description="worked examples for few_shot (its first N rows)")
    few_shot: int = Field(0, ge=0, description=(
        "put the first N examples of train_file before each question as worked examples (a base model that never saw "
        "the format); the answer ends where the model starts a new question. Raise max_prompt_tokens to fit them"
    ))

    @model_validator(mode="after")
    def _shots_source(self):
        if self.few_shot and self.train_file is None:
            raise ValueError("few_shot: the worked examples come from train_file; set it")
        return self


class SampleConfig(RunOptions, DataOptions, SandboxOptions, EvalData, SamplingOptions):
    """k sampled responses per question, graded; accuracy by majority vote, pass@k and (with a reranker) rerank@k."""

    num_samples: int = Field(100, gt=0, description="k: sampled responses per question (the paper: 100)")
    reranker: str | None = Field(None, description=(
        "reward-model directory (`reftkit train-reranker`): scores every sample for rerank@k"
    ))


# The RL family beside the paper's PPO (reftkit.rl.methods.RL_METHODS): each is a `reftkit reft` run
# that takes ReFT's budget (its section's options, less the critic's when it has none) plus the
# method's options, then its own section.
MethodName = Literal[("sft", "offline_st", "online_st", "reft", *RL_METHODS)]
CRITIC_OPTIONS = ("vf_coef", "value_clip_range", "value_head_lr", "gamma", "lam", "whiten_advantages")
# Stage sections of `reftkit reproduce` and the config each one validates into.
STAGES: dict[str, type[_Config]] = {
    "warmup": SFTConfig, "sft": SFTConfig, "train_samples": SampleConfig, "offline_st": OfflineSTConfig,
    "online_st": OnlineSTConfig, "reft": ReFTConfig, "reranker": RerankerConfig, "eval": SampleConfig,
    **dict.fromkeys(RL_METHODS, ReFTConfig),
}
DEMO_LENGTHS = {"max_prompt_tokens": 96, "max_length": 176}  # synthetic prompts < 60 tokens, responses < 50
# The demo's tiny Llama runs float32 unless asked otherwise: on a CPU with bf16 units, bf16 made it slower
# (matrices too small for the units to pay for autocast's casts) and its ReFT worse (docs/cpu-bf16.md).
DEMO_BF16 = "no"
# The demo's settings per stage, shared by `reftkit demo` and `reftkit reproduce --demo`; a demo
# config's stage sections (`reft: {lr: 1e-4}`) go on top. ReFT trains on the first 800 questions;
# Online-ST gets the same questions, samples and budget, at continued SFT's rate.
_DEMO_SFT = {"lr": 3e-4, "batch_size": 32, "eval_every_epoch": False}
_DEMO_ONLINE = {"lr": 5e-5, "batch_size": 32, "num_samples": 4, "epochs": 2, "max_train_examples": 800}
DEMO_STAGES: dict[str, dict[str, Any]] = {
    "warmup": {"epochs": 6, "lr": 3e-3, "batch_size": 32, "warmup_ratio": 0.05, "eval_every_epoch": False},
    "sft": {"epochs": 1, **_DEMO_SFT},
    "reft": {**_DEMO_ONLINE, "value_head_lr": 1e-3, "mini_batch_size": 64},
    "online_st": {**_DEMO_ONLINE, "lr": _DEMO_SFT["lr"]},
    "train_samples": {"num_samples": 8, "max_eval_examples": 800},
    "offline_st": {"epochs": 1, **_DEMO_SFT},
    "reranker": {"epochs": 4, "lr": 3e-4, "batch_size": 32, "warmup_ratio": 0.05},  # experiments/reranker_dev.py
    "eval": {"num_samples": 8},
}


def stage_config(name: str, values: dict[str, Any], config: type[_Config] | None = None) -> _Config:
    """Validates one stage's options into its command's config; errors name the section."""
    try:
        return (config or STAGES[name]).model_validate(values)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg'].removeprefix('Value error, ')}"
                             for err in e.errors())
        raise ValueError(f"section '{name}': {problems}") from None


def only_fields(values: dict[str, Any], config: type[_Config]) -> dict[str, Any]:
    """The options of `values` that `config`'s command has (shared options go only where honoured)."""
    return {k: v for k, v in values.items() if k in config.model_fields}


class DemoConfig(_Config):
    """The built-in demo: synthetic problems, tiny model, SFT warm-up then ReFT vs continued SFT.

    Each stage takes that command's options in its section (`reft: {lr: 1e-4, epochs: 3}`), on
    top of the demo's settings (`reftkit.config.DEMO_STAGES`)."""

    output_dir: LaxPath = Field(Path("runs/demo"), description="where the demo writes its three runs and results.json")
    seed: int = Field(0, description="seeds the synthetic data, the model initialisation and sampling")
    cot: CotStyle = Field("natural", description="natural-language CoT, or Python programs run in the sandbox")
    n_train: int = Field(6000, gt=0, description="synthetic training questions (one reference CoT each)")
    n_test: int = Field(500, gt=0, description="held-out test questions (disjoint from training)")
    one_line_fraction: float = Field(0.5, ge=0, le=1, description=(
        "share of reference CoTs from the annotator who skips steps (one-line / hand-computed)"
    ))
    progress: bool = Field(True, description="show progress bars")
    bf16: Literal["auto", "yes", "no"] = Field(DEMO_BF16, description=(
        "bf16 autocast of every stage; the tiny model runs faster and better in float32 (docs/cpu-bf16.md)"
    ))
    overwrite_output_dir: bool = Field(False, description=(
        "rerun into an output_dir that holds an earlier demo's runs (they are replaced)"
    ))
    warmup: dict[str, Any] = Field(default_factory=dict, description=(
        "`reftkit sft` options of the warm-up (from the tiny model)"
    ))
    sft: dict[str, Any] = Field(default_factory=dict, description="`reftkit sft` options of the continued-SFT baseline")
    reft: dict[str, Any] = Field(default_factory=dict, description=(
        "`reftkit reft` options (e.g. lr, epochs, num_samples, max_train_examples, kl_coef)"
    ))

    @model_validator(mode="after")
    def _stages_valid(self):
        self.stage_configs()  # an unknown or ill-typed stage option fails here, before any training
        return self

    def stage_configs(self) -> dict[str, _Config]:
        out = Path(self.output_dir)
        common = {**DEMO_LENGTHS, "seed": self.seed, "progress": self.progress, "cot": self.cot, "bf16": self.bf16,
                  "overwrite_output_dir": self.overwrite_output_dir}
        start = str(out / "warmup" / "final")
        models = {"warmup": "tiny", "sft": start, "reft": start}
        return {name: stage_config(name, {**common, **DEMO_STAGES[name], **getattr(self, name), "model": models[name],
                                          "output_dir": out / name})
                for name in ("warmup", "sft", "reft")}


class _ReproduceBase(RunOptions, DataOptions, SandboxOptions, Tracking):
    """The paper's protocol in one run: warm-up SFT, then SFT, Offline-ST, Online-ST and ReFT from the
    same warm-up; each evaluated top-1, by vote@k and by rerank@k on eval_file (the test set).

    Every stage is configured by its own section (a mapping of that command's options, e.g.
    `reft: {kl_coef: 0.05}`), on top of the options given here for all stages. A rerun skips
    the stages that finished and resumes an interrupted one from its last checkpoint.
    """

    train_file: str | None = Field(None, description="training data of every training stage")
    eval_file: str | None = Field(None, description="the test set, read by the evaluation stages only")
    eval_batch_size: int = Field(64, gt=0, description=(
        "responses per decoding batch (k samples each: eval_batch_size // k prompts, or one prompt's samples in chunks "
        "of eval_batch_size)"
    ))
    max_eval_examples: int | None = Field(None, gt=0, description="evaluate on the first N test examples only")
    demo: bool = Field(False, description=(
        "synthetic data and the tiny model, with the demo's settings as stage defaults"
    ))
    methods: list[MethodName] = Field(default_factory=lambda: ["sft", "offline_st", "online_st", "reft"],
                                      description="methods trained from the warm-up and compared")
    warmup: dict[str, Any] = Field(default_factory=dict, description="`reftkit sft` options of the warm-up")
    sft: dict[str, Any] = Field(default_factory=dict, description="`reftkit sft` options of continued SFT")
    train_samples: dict[str, Any] = Field(default_factory=dict, description=(
        "`reftkit sample` options for the warm-up's samples on the training questions (Offline-ST data, reranker data)"
    ))
    offline_st: dict[str, Any] = Field(default_factory=dict, description="`reftkit offline-st` options")
    online_st: dict[str, Any] = Field(default_factory=dict, description="`reftkit online-st` options")
    reft: dict[str, Any] = Field(default_factory=dict, description="`reftkit reft` options")
    reranker: dict[str, Any] = Field(default_factory=dict, description="`reftkit train-reranker` options")
    eval: dict[str, Any] = Field(default_factory=dict, description=(
        "`reftkit sample` options on the test set (num_samples = k)"
    ))

    @model_validator(mode="after")
    def _stages_valid(self):
        if self.demo and {"model", "train_file", "eval_file"} & self.model_fields_set:
            raise ValueError("demo makes its own data and model: drop model, train_file and eval_file")
        if not self.demo and (self.train_file is None or self.eval_file is None):
            raise ValueError("set train_file and eval_file (the test set), or demo: true")
        for name in self.stage_names():
            self.stage(name)  # an unknown or ill-typed stage option fails here, before any training
        # RL family: reft's budget
        used = set(self.methods) | ({"reft"} if set(RL_METHODS) & set(self.methods) else set())
        unused = sorted(name for name in typing.get_args(MethodName) if getattr(self, name) and name not in used)
        if unused:
            raise ValueError(f"section {unused[0]!r} is given but {unused[0]} is not in methods")
        return self

    def stage_names(self) -> tuple[str, ...]:
        """The stages this run has, each a section validated into its command's config (`stage`)."""
        return ("warmup", "train_samples", "reranker", "eval", *self.methods)

    def stage(self, name: str, **fixed: Any) -> _Config:
        """The typed config of one stage: shared options (those its command has) < demo defaults <
        its section < `fixed`. The test set (eval_file) reaches a stage only through `fixed`."""
        config = STAGES[name]
        shared_keys = set(ReproduceConfig.model_fields) - set(STAGES) - {"demo", "methods", "output_dir", "eval_file"}
        shared = {k: getattr(self, k) for k in shared_keys}
        if self.demo:
            shared |= {"model": "tiny", "data_format": "reft"}
            shared |= {k: v for k, v in {**DEMO_LENGTHS, "bf16": DEMO_BF16}.items() if k not in self.model_fields_set}
        base = "reft" if name in RL_METHODS else name  # the RL family starts from ReFT's options
        options = {**(DEMO_STAGES.get(base, {}) if self.demo else {}), **(self.reft if base == "reft" else {})}
        if name in RL_METHODS:
            if not RL_METHODS[name].estimator.critic:  # no critic: the value head's options do not apply
                options = {k: v for k, v in options.items() if k not in CRITIC_OPTIONS}
            options |= RL_METHODS[name].options
        values = {**only_fields(shared, config), "output_dir": self.output_dir / name, **options,
                  **getattr(self, name), **fixed}
        return stage_config(name, values)


# `reftkit reproduce`'s config: the sections above plus one per RL method of the registry (`grpo: {...}`).
ReproduceConfig = create_model(
    "ReproduceConfig", __base__=_ReproduceBase, __doc__=_ReproduceBase.__doc__, __module__=__name__,
    **{m.name: (dict[str, Any], Field(default_factory=dict, description=(
        f"`reftkit reft` options of {m.display}, over ReFT's budget (the reft section"
        f"{'' if m.estimator.critic else ' less the critic options'}) and {m.summary}")))
       for m in RL_METHODS.values()},
)
