"""The run loop every trainer shares, so that a recipe shows only its own step.

`TrainingRun` owns the bookkeeping: resume, the epoch and batch order (a resumed run skips what it
already consumed), the optimiser step (accumulated, guarded against non-finite values) and the
schedule, the progress bar, metrics.jsonl, greedy evaluations, `save_every` and end-of-epoch
checkpoints, and the final save. `fit` runs it with a loss function (SFT, Offline-ST, the reranker);
Online-ST and ReFT write their step (sample, then update) on the same object.

    run = TrainingRun(...)
    for epoch in run.epochs():
        for i, batch in run.batches(loader, epoch):
            ... the recipe's step, then run.step(loss, ...) or run.record(...) ...
        run.end_epoch(epoch)
    return run.finish()
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from reftkit.config import TrainerOptions
from reftkit.data.loading import load_examples_for, training_examples
from reftkit.data.records import Example
from reftkit.modeling.loading import load_model_and_tokenizer, prepare_lm_for_training
from reftkit.modeling.model import language_model, load_tokenizer, prepare_tokenizer
from reftkit.rollout.decoding import eval_record, evaluate_run
from reftkit.training.checkpoints import (
    Run,
    claim_output_dir,
    resume_from,
    save_final,
    save_step_checkpoint,
    step_checkpoint_due,
)
from reftkit.training.device import make_accelerator
from reftkit.training.metrics import Metrics
from reftkit.training.optim import guarded_step
from reftkit.training.publish import push_to_hub

log = logging.getLogger("reftkit")

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]  # (loss, extra metrics)


def steps_per_epoch(accelerator: Accelerator, loader, grad_accum: int = 1) -> int:
    """Steps in one epoch of `loader` (batches before sharding across processes)."""
    return math.ceil(len(loader) / accelerator.num_processes / grad_accum)


def epoch_batches(accelerator: Accelerator, loader, progress, epoch: int):
    """(index, batch) pairs of one epoch; on the epoch a resumed run stopped in, the batches it
    already consumed are skipped (the seedable sampler gives the same order again)."""
    loader.set_epoch(epoch)
    skip = progress.batch_in_epoch if epoch == progress.epoch else 0
    return enumerate(accelerator.skip_first_batches(loader, skip) if skip else loader, start=skip)


class TrainingRun:
    """One training run's bookkeeping (see the module docstring). A step is one optimiser step
    (supervised recipes) or one rollout batch (ReFT, whose update takes several optimiser steps)."""

    def __init__(self, accelerator: Accelerator, cfg: TrainerOptions, run: Run, model, tokenizer, optimizer, scheduler,
                 *, name: str, steps_per_epoch: int, eval_set: list[Example] | None = None, grader=None):
        self.accelerator, self.cfg, self.model, self.tokenizer = accelerator, cfg, model, tokenizer
        self.optimizer, self.scheduler = optimizer, scheduler
        self.eval_set, self.grader = eval_set, grader
        accelerator.register_for_checkpointing(scheduler)
        self.run = resume_from(accelerator, cfg, run) if cfg.resume else run
        self.progress = self.run.progress
        self.metrics = Metrics(accelerator, cfg, name, self.run.resumed_at)
        # sampled completions a person can read (ReFT's --log_samples_every), kept in step with metrics.jsonl
        self.samples = Metrics(accelerator, cfg, name, self.run.resumed_at, file="samples.jsonl", track=False)
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
        stepped, grad_norm = guarded_step(self.accelerator, self.model, self.optimizer, self.cfg, loss,
                                          f"step {self.progress.step + 1} (epoch {epoch + 1}, batch {i + 1})")
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        self.record({"loss": self.accelerator.reduce(loss.detach(), "mean").item(), **extra, "grad_norm": grad_norm,
                     "skipped": not stepped, "lr": lr, "epoch": epoch}, epoch, i, loss=f"{loss.item():.3f}")
        self.checkpoint_if_due()

    def record(self, row: dict, epoch: int, i: int, **postfix: str) -> None:
        """Counts a finished step (batch i of `epoch`) and logs its metrics row; `postfix` goes on the bar."""
        progress = self.progress
        progress.step += 1
        progress.epoch, progress.batch_in_epoch = epoch, i + 1
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(postfix)
        self.metrics.log(row, progress.step)

    def log_samples(self, rows: list[dict]) -> None:
        """Rows of samples.jsonl at this step (main process): a few completions with their rewards."""
        for row in rows:
            self.samples.log(row, self.progress.step)

    def checkpoint_if_due(self) -> None:
        if step_checkpoint_due(self.cfg, self.progress, self.batches_in_epoch):
            self.checkpoint()

    def evaluate(self, tag: str, **extra) -> None:
        """Greedy accuracy of the model on eval_set (none: nothing), logged and kept as predictions-{tag}.jsonl."""
        if not self.eval_set:
            return
        read_outs: dict = {}  # program CoT: the programs' exit statuses; multiple choice: consistency
        lm = language_model(self.accelerator.unwrap_model(self.model))
        acc = evaluate_run(self.accelerator, lm, self.tokenizer, self.eval_set, self.grader, self.cfg,
                           self.cfg.output_dir / f"predictions-{tag}.jsonl", read_outs=read_outs, cuts=self.run.cuts)
        self.metrics.log(eval_record(acc, read_outs) | extra, self.progress.step)
        log.info("%s: eval accuracy %.4f", tag, acc)

    def end_epoch(self, epoch: int, evaluate: bool = True) -> None:
        """After the epoch's last batch: the evaluation (if `evaluate`), then its checkpoint."""
        self.progress.epoch, self.progress.batch_in_epoch = epoch + 1, 0
        if evaluate:
            self.evaluate(f"epoch{epoch + 1}", epoch=epoch + 1)
        self.checkpoint()

    def finish(self) -> Path:
        """The final model (and, with push_to_hub, its upload); returns its directory."""
        self.bar.close()
        final = save_final(self.accelerator, self.model, self.tokenizer, self.cfg, self.run)
        self.metrics.close()
        if self.cfg.push_to_hub and self.accelerator.is_main_process:
            log.info("pushed %s to the Hub: %s", final, push_to_hub(final, self.cfg.push_to_hub))
        return final

    def checkpoint(self) -> None:
        save_step_checkpoint(self.accelerator, self.model, self.tokenizer, self.cfg, self.run, self.progress)


def fit(
    accelerator: Accelerator, cfg: TrainerOptions, run: Run, model, tokenizer, loader, optimizer, scheduler,
    loss_fn: LossFn, *, name: str, steps_per_epoch: int, eval_set: list[Example] | None = None, grader=None,
) -> Path:
    """Runs cfg.epochs over `loader` (all already `accelerator.prepare`d), one `loss_fn(model,
    batch)` per micro-batch, greedy accuracy on eval_set after each epoch; returns the final model dir."""
    loop = TrainingRun(accelerator, cfg, run, model, tokenizer, optimizer, scheduler, name=name,
                       steps_per_epoch=steps_per_epoch, eval_set=eval_set, grader=grader)
    model.train()
    for epoch in loop.epochs():
        for i, batch in loop.batches(loader, epoch):
            with accelerator.accumulate(model):
                loss, extra = loss_fn(model, batch)
                loop.step(loss, extra, epoch, i)
        loop.end_epoch(epoch)
    return loop.finish()


def start_lm_run(cfg: TrainerOptions, command: str, train: list[Example] | None, eval_set: list[Example] | None,
                 *, require_cot: bool = True, before_claim: Callable[[Accelerator], None] | None = None,
                 model=None, tokenizer=None):
    """(accelerator, run, train, eval_set, model, tokenizer) of a run that fine-tunes a causal LM,
    with the configured LoRA / gradient checkpointing applied. `before_claim` checks what must hold
    before the output_dir is claimed; require_cot=False: only questions and gold answers are needed.
    `model` (a loaded transformers or peft model) and `tokenizer` stand for cfg.model when given."""
    accelerator = make_accelerator(cfg)
    if before_claim is not None:
        before_claim(accelerator)
    run = claim_output_dir(accelerator, cfg, command)
    train = training_examples(train, cfg, require_cot=require_cot)
    if eval_set is None and cfg.eval_file:
        eval_set = load_examples_for(cfg.eval_file, cfg, "eval")[: cfg.max_eval_examples]
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model, train, cfg.seed, cfg.cot)
    else:
        tokenizer = prepare_tokenizer(tokenizer if tokenizer is not None
                                      else load_tokenizer(getattr(model, "name_or_path", cfg.model)))
    return accelerator, run, train, eval_set, prepare_lm_for_training(model, cfg), tokenizer
