"""Pieces both trainers share, as plain functions: accelerator, data, optimiser, checkpoints, metrics."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, set_seed
from transformers import PreTrainedModel, get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from reftkit.config import CommonConfig, OptimConfig, TrainConfig
from reftkit.data.records import Example
from reftkit.lora import add_lora, plain_model_and_state
from reftkit.model import enable_gradient_checkpointing, load_causal_lm, load_tokenizer
from reftkit.cot import CotStyle
from reftkit.prompts import prompt_text, response_text
from reftkit.tiny import build_model, build_tokenizer

log = logging.getLogger("reftkit")
# accelerate warns on every save that tied embeddings are stored once; that is expected for
# tied models (from_pretrained re-ties them), so the warning only buries real ones.
logging.getLogger("accelerate.utils.other").addFilter(lambda r: "Removed shared tensor" not in r.getMessage())

STATE_FILE = "trainer_state.json"
ACCELERATE_DIR = "accelerate_state"  # optimizer, scheduler, per-process RNG, model (for --resume)


def cpu_multiprocess() -> bool:
    """Several processes (`accelerate launch --multi_gpu`, torchrun) but no CUDA: accelerate only
    sets up its gloo CPU backend when asked for the CPU, so ask for it exactly then."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state() -> PartialState:
    """The process group (rank, world size); the same one the trainers' Accelerator uses."""
    return PartialState(cpu=cpu_multiprocess())


def make_accelerator(cfg: CommonConfig) -> Accelerator:
    use_bf16 = cfg.bf16 == "yes" or (cfg.bf16 == "auto" and torch.cuda.is_available())
    accelerator = Accelerator(
        cpu=cpu_multiprocess(),
        mixed_precision="bf16" if use_bf16 else "no",
        log_with=list(cfg.log_with) or None,
        project_dir=str(cfg.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(cfg.seed, device_specific=False)
    return accelerator


def load_examples_for(path: str | None, cfg: CommonConfig, role: str) -> list[Example]:
    from reftkit.data.readers import load_examples

    if path is None:
        raise ValueError(f"no {role} data: set {role}_file in the config or on the command line")
    result = load_examples(path, cfg.data_format, skip_invalid=cfg.skip_invalid)
    if result.skipped:
        log.warning(result.summary())
    return result.examples


def training_examples(train: list[Example] | None, cfg) -> list[Example]:
    """The examples a trainer was given, or its train_file; the first max_train_examples of them."""
    train = train if train is not None else load_examples_for(cfg.train_file, cfg, "train")
    return train[: cfg.max_train_examples]


def load_model_and_tokenizer(name_or_path: str, train: list[Example], seed: int,
                             cot: CotStyle = "natural") -> tuple[PreTrainedModel, object]:
    """`tiny` builds a tokenizer on the training text and a small Llama; anything else is from_pretrained."""
    if name_or_path == "tiny":
        tokenizer = build_tokenizer(prompt_text(e, cot) + response_text(e, cot) for e in train)
        return build_model(tokenizer, seed=seed), tokenizer
    return load_causal_lm(name_or_path), load_tokenizer(name_or_path)


def prepare_lm_for_training(lm: PreTrainedModel, cfg: TrainConfig) -> PreTrainedModel:
    """Gradient checkpointing and/or LoRA adapters, as configured. Checkpointing is switched on
    first, on the plain model, so peft sees it and keeps the (frozen) embedding output differentiable."""
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    if cfg.lora_r:
        lm = add_lora(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    return lm


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own RNG. Without it each new iterator draws from the global torch RNG, which
    also drives sampling, so a resumed run (new iterator after the RNG restore) would sample
    differently from an uninterrupted one."""
    return torch.Generator().manual_seed(seed)


def make_optimizer(params, cfg: OptimConfig, total_steps: int):
    """AdamW with linear warm-up, then linear decay to 0 or a constant rate.

    `params` is an iterable of tensors or of param-group dicts (a group may set its own "lr")."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        groups = [{"params": [p for p in params if p.requires_grad]}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if cfg.lr_schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    return optimizer, scheduler


@dataclass
class Progress:
    """Where a run is: enough to continue it exactly (with the accelerate state beside it)."""

    step: int = 0  # optimiser steps (SFT) or rollout batches (ReFT) done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of the current epoch already consumed


def save_hf_model(accelerator: Accelerator, model, lm_of, tokenizer, directory: Path) -> None:
    """Writes a plain HF directory: `from_pretrained(directory)` loads the policy without reftkit."""
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)  # gathers shards under FSDP / ZeRO-3
    lm = lm_of(unwrapped)
    prefix = "lm." if lm is not unwrapped else ""
    lm_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if state else None
    lm, lm_state = plain_model_and_state(lm, lm_state)  # LoRA: merged weights, no peft needed to load
    lm.save_pretrained(directory, state_dict=lm_state, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(directory)
        if hasattr(unwrapped, "save_value_head"):
            unwrapped.save_value_head(directory)


def save_checkpoint(
    accelerator: Accelerator, model, lm_of, tokenizer, output_dir: Path, name: str, progress: Progress | None,
    config: dict,
) -> Path:
    """Writes output_dir/name atomically: into a temporary directory, renamed when complete.

    With `progress`, the accelerate state (optimizer, scheduler, RNG of every process) is kept
    for --resume; without it (the final model) only the HF directory is written.
    """
    final = output_dir / name
    tmp = output_dir / f".{name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    save_hf_model(accelerator, model, lm_of, tokenizer, tmp)
    if progress is not None:
        accelerator.save_state(str(tmp / ACCELERATE_DIR))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"progress": progress.__dict__ if progress else None, "config": config, "time": time.time()}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories of an interrupted save are ignored)."""
    done = [p for p in output_dir.glob("checkpoint-*") if (p / STATE_FILE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def resume_from(accelerator: Accelerator, output_dir: Path) -> Progress:
    ckpt = latest_checkpoint(output_dir)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint-* directory in {output_dir}")
    accelerator.load_state(str(ckpt / ACCELERATE_DIR))
    progress = Progress(**json.loads((ckpt / STATE_FILE).read_text())["progress"])
    log.info("resumed from %s at step %d", ckpt, progress.step)
    return progress


def prune_checkpoints(accelerator: Accelerator, output_dir: Path, keep: int = 2) -> None:
    if accelerator.is_main_process:
        done = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def save_step_checkpoint(accelerator: Accelerator, model, lm_of, tokenizer, cfg: CommonConfig,
                         progress: Progress) -> None:
    """checkpoint-{step} with everything --resume needs; older ones beyond the last two are removed."""
    save_checkpoint(accelerator, model, lm_of, tokenizer, cfg.output_dir, f"checkpoint-{progress.step}", progress,
                    cfg.model_dump(mode="json"))
    prune_checkpoints(accelerator, cfg.output_dir)


def epoch_batches(accelerator: Accelerator, loader, progress: Progress, epoch: int):
    """(index, batch) pairs of one epoch; on the epoch a resumed run stopped in, the batches it
    already consumed are skipped (the seedable sampler gives the same order again)."""
    loader.set_epoch(epoch)
    skip = progress.batch_in_epoch if epoch == progress.epoch else 0
    return enumerate(accelerator.skip_first_batches(loader, skip) if skip else loader, start=skip)


class Metrics:
    """Appends one JSON line per record to metrics.jsonl; forwards to TensorBoard/W&B if configured."""

    def __init__(self, accelerator: Accelerator, cfg: CommonConfig, run_name: str):
        self.accelerator = accelerator
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.log_with:
            accelerator.init_trackers(run_name, config=json.loads(cfg.model_dump_json()))

    def log(self, record: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        row = {"step": step, "time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        # Not accelerator.end_training(): it also destroys the process group, and a pipeline
        # (the demo: SFT then ReFT in one process) still needs it.
        for tracker in self.accelerator.trackers:
            tracker.finish()
