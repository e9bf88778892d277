"""The supervised loop shared by SFT and the reranker: batches -> loss -> step, with checkpoints,
--resume, metrics and a per-epoch hook. Methods with rollouts (ReFT, Online-ST) own their loops."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from reftkit.config import TrainerOptions
from reftkit.data.records import Example
from reftkit.evaluate import evaluate_run
from reftkit.checkpoints import Progress, Run, claim_output_dir, resume_from, save_final, save_step_checkpoint
from reftkit.runtime import (
    Metrics, epoch_batches, guarded_step, load_examples_for, load_model_and_tokenizer, make_accelerator,
    prepare_lm_for_training, training_examples,
)

log = logging.getLogger("reftkit")

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]  # (loss, extra metrics)


def _identity(model):
    return model


def steps_per_epoch(accelerator: Accelerator, loader, grad_accum: int) -> int:
    """Optimiser steps in one epoch of `loader` (batches before sharding across processes)."""
    return math.ceil(len(loader) / accelerator.num_processes / grad_accum)


def fit(
    accelerator: Accelerator, cfg: TrainerOptions, run: Run, model, tokenizer, loader, optimizer, scheduler,
    loss_fn: LossFn, *, name: str, steps_per_epoch: int,
    after_epoch: Callable[[int, Progress, Metrics], None] | None = None, lm_of=_identity,
) -> Path:
    """Runs cfg.epochs over `loader` (all already `accelerator.prepare`d); returns the final model dir.

    `cfg.grad_accum` micro-batches make one optimiser step (the accelerator accumulates); a step
    with a non-finite loss or gradient stops the run or is skipped (`cfg.nonfinite`)."""
    accelerator.register_for_checkpointing(scheduler)
    run = resume_from(accelerator, cfg, run) if cfg.resume else run
    progress = run.progress
    metrics = Metrics(accelerator, cfg, name, run.resumed_at)
    bar = tqdm(total=steps_per_epoch * cfg.epochs, initial=progress.step, desc=name,
               disable=not (cfg.progress and accelerator.is_main_process))
    model.train()
    for epoch in range(progress.epoch, cfg.epochs):
        for i, batch in epoch_batches(accelerator, loader, progress, epoch):
            with accelerator.accumulate(model):
                loss, extra = loss_fn(model, batch)
                accelerator.backward(loss)
                if not accelerator.sync_gradients:
                    continue  # the next micro-batch adds to these gradients
                stepped, grad_norm = guarded_step(accelerator, model, optimizer, cfg, loss,
                                         f"step {progress.step + 1} (epoch {epoch + 1}, batch {i + 1})")
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            progress.step += 1
            progress.epoch, progress.batch_in_epoch = epoch, i + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            metrics.log({"loss": accelerator.reduce(loss.detach(), "mean").item(), **extra,
                         "grad_norm": grad_norm, "skipped": not stepped,
                         "lr": lr, "epoch": epoch}, progress.step)
            if cfg.save_every and progress.step % cfg.save_every == 0:
                save_step_checkpoint(accelerator, model, lm_of, tokenizer, cfg, run, progress)
        progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        if after_epoch is not None:
            after_epoch(epoch, progress, metrics)
        save_step_checkpoint(accelerator, model, lm_of, tokenizer, cfg, run, progress)
    bar.close()
    final = save_final(accelerator, model, lm_of, tokenizer, cfg, run)
    metrics.close()
    return final


def start_lm_run(cfg: TrainerOptions, command: str, train: list[Example] | None, eval_set: list[Example] | None):
    """(accelerator, run, train, eval_set, model, tokenizer) of a run that fine-tunes a causal LM,
    with the configured LoRA / gradient checkpointing applied; the output_dir is claimed first."""
    accelerator = make_accelerator(cfg)
    run = claim_output_dir(accelerator, cfg, command)
    train = training_examples(train, cfg)
    if eval_set is None and cfg.eval_file:
        eval_set = load_examples_for(cfg.eval_file, cfg, "eval")[: cfg.max_eval_examples]
    model, tokenizer = load_model_and_tokenizer(cfg.model, train, cfg.seed, cfg.cot)
    return accelerator, run, train, eval_set, prepare_lm_for_training(model, cfg), tokenizer


def greedy_eval_hook(accelerator, model, tokenizer, eval_set: list[Example] | None, grader, cfg):
    """An `after_epoch` hook: greedy accuracy on eval_set, logged and kept as predictions-epochN.jsonl."""
    def after_epoch(epoch: int, progress: Progress, metrics: Metrics) -> None:
        if not eval_set:
            return
        acc = evaluate_run(accelerator, accelerator.unwrap_model(model), tokenizer, eval_set, grader, cfg,
                           cfg.output_dir / f"predictions-epoch{epoch + 1}.jsonl")
        metrics.log({"eval_accuracy": acc, "epoch": epoch + 1}, progress.step)
        log.info("epoch %d: eval accuracy %.4f", epoch + 1, acc)
    return after_epoch
