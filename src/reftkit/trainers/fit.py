"""The supervised loop: batches -> loss -> step, with checkpoints, --resume, metrics and a
per-epoch hook. `fit` runs it for SFT and the reranker; Online-ST writes its own loop (sampling,
then a step) on the same `SupervisedRun` bookkeeping; ReFT owns its PPO loop."""

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
from reftkit.evaluate import eval_record, evaluate_run
from reftkit.checkpoints import (
    Progress, Run, claim_output_dir, resume_from, save_final, save_step_checkpoint, step_checkpoint_due,
)
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


class SupervisedRun:
    """The bookkeeping of a supervised loop, so that a recipe shows only its own steps: resume,
    the optimiser step (accumulated over cfg.grad_accum micro-batches, guarded against non-finite
    values), the schedule, metrics, the progress bar and checkpoints.

        loop = SupervisedRun(...)
        for epoch in loop.epochs():
            for i, batch in loop.batches(loader, epoch):
                with accelerator.accumulate(model):
                    loop.step(loss_of(batch), extra_metrics, epoch, i)
            loop.end_epoch(epoch, after_epoch)
        return loop.finish()
    """

    def __init__(self, accelerator: Accelerator, cfg: TrainerOptions, run: Run, model, tokenizer, optimizer, scheduler,
                 *, name: str, steps_per_epoch: int, lm_of=_identity):
        self.accelerator, self.cfg, self.model, self.tokenizer = accelerator, cfg, model, tokenizer
        self.optimizer, self.scheduler, self.lm_of = optimizer, scheduler, lm_of
        accelerator.register_for_checkpointing(scheduler)
        self.run = resume_from(accelerator, cfg, run) if cfg.resume else run
        self.progress = self.run.progress
        self.metrics = Metrics(accelerator, cfg, name, self.run.resumed_at)
        self.batches_in_epoch = math.inf  # the epoch's length, set by `batches` (save_every: `step_checkpoint_due`)
        self.bar = tqdm(total=steps_per_epoch * cfg.epochs, initial=self.progress.step, desc=name,
                        disable=not (cfg.progress and accelerator.is_main_process))

    def epochs(self) -> range:
        return range(self.progress.epoch, self.cfg.epochs)

    def batches(self, loader, epoch: int):
        self.batches_in_epoch = len(loader)
        return epoch_batches(self.accelerator, loader, self.progress, epoch)

    def step(self, loss: torch.Tensor, extra: dict[str, float], epoch: int, i: int) -> None:
        """Backward on one micro-batch's loss; at the end of an accumulation, the optimiser step,
        then the schedule, the metrics row and (every save_every steps) a checkpoint."""
        self.accelerator.backward(loss)
        if not self.accelerator.sync_gradients:
            return  # the next micro-batch adds to these gradients
        progress = self.progress
        stepped, grad_norm = guarded_step(self.accelerator, self.model, self.optimizer, self.cfg, loss,
                                          f"step {progress.step + 1} (epoch {epoch + 1}, batch {i + 1})")
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        progress.step += 1
        progress.epoch, progress.batch_in_epoch = epoch, i + 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss.item():.3f}")
        self.metrics.log({"loss": self.accelerator.reduce(loss.detach(), "mean").item(), **extra,
                          "grad_norm": grad_norm, "skipped": not stepped, "lr": lr, "epoch": epoch}, progress.step)
        if step_checkpoint_due(self.cfg, progress, self.batches_in_epoch):
            self._checkpoint()

    def end_epoch(self, epoch: int, after_epoch: Callable[[int, Progress, Metrics], None] | None = None) -> None:
        self.progress.epoch, self.progress.batch_in_epoch = epoch + 1, 0
        if after_epoch is not None:
            after_epoch(epoch, self.progress, self.metrics)
        self._checkpoint()

    def finish(self) -> Path:
        self.bar.close()
        final = save_final(self.accelerator, self.model, self.lm_of, self.tokenizer, self.cfg, self.run)
        self.metrics.close()
        return final

    def _checkpoint(self) -> None:
        save_step_checkpoint(self.accelerator, self.model, self.lm_of, self.tokenizer, self.cfg, self.run,
                             self.progress)


def fit(
    accelerator: Accelerator, cfg: TrainerOptions, run: Run, model, tokenizer, loader, optimizer, scheduler,
    loss_fn: LossFn, *, name: str, steps_per_epoch: int,
    after_epoch: Callable[[int, Progress, Metrics], None] | None = None, lm_of=_identity,
) -> Path:
    """Runs cfg.epochs over `loader` (all already `accelerator.prepare`d), one `loss_fn(model,
    batch)` per micro-batch; returns the final model dir."""
    loop = SupervisedRun(accelerator, cfg, run, model, tokenizer, optimizer, scheduler, name=name,
                         steps_per_epoch=steps_per_epoch, lm_of=lm_of)
    model.train()
    for epoch in loop.epochs():
        for i, batch in loop.batches(loader, epoch):
            with accelerator.accumulate(model):
                loss, extra = loss_fn(model, batch)
                loop.step(loss, extra, epoch, i)
        loop.end_epoch(epoch, after_epoch)
    return loop.finish()


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
        read_outs: dict = {}  # program CoT: the programs' exit statuses; multiple choice: consistency
        acc = evaluate_run(accelerator, accelerator.unwrap_model(model), tokenizer, eval_set, grader, cfg,
                           cfg.output_dir / f"predictions-epoch{epoch + 1}.jsonl", read_outs=read_outs)
        metrics.log(eval_record(acc, read_outs) | {"epoch": epoch + 1}, progress.step)
        log.info("epoch %d: eval accuracy %.4f", epoch + 1, acc)
    return after_epoch
