"""Supervised fine-tuning recipe: (question, reference CoT) pairs, loss on response tokens only."""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from reftkit.batching import shuffled_loader
from reftkit.config import SFTConfig
from reftkit.cot import open_grader
from reftkit.data.records import Example
from reftkit.evaluate import evaluate_run
from reftkit.prompts import collate_sft, encode_sft
from reftkit.training import (
    training_examples,
    Metrics, Progress, epoch_batches, load_examples_for, load_model_and_tokenizer, make_accelerator,
    make_optimizer, prepare_lm_for_training, resume_from, save_checkpoint, save_step_checkpoint,
)

log = logging.getLogger("reftkit")


def _lm(model):
    return model


def train_sft(cfg: SFTConfig, train: list[Example] | None = None, eval_set: list[Example] | None = None) -> Path:
    """Runs SFT and returns the directory of the final model (a plain HF checkpoint)."""
    with open_grader(cfg) as grader:  # for program CoT, this starts the sandbox the evaluations use
        return _train_sft(cfg, train, eval_set, grader)


def _train_sft(cfg: SFTConfig, train: list[Example] | None, eval_set: list[Example] | None, grader) -> Path:
    accelerator = make_accelerator(cfg)
    train = training_examples(train, cfg)
    if eval_set is None and cfg.eval_file:
        eval_set = load_examples_for(cfg.eval_file, cfg, "eval")[: cfg.max_eval_examples]
    model, tokenizer = load_model_and_tokenizer(cfg.model, train, cfg.seed, cfg.cot)
    model = prepare_lm_for_training(model, cfg)

    features = [encode_sft(tokenizer, ex, cfg.max_prompt_tokens, cfg.max_length, cfg.cot) for ex in train]
    truncated = sum(f.truncated for f in features)
    if truncated:
        log.warning("%d of %d training examples exceed max_length=%d and were truncated", truncated,
                    len(features), cfg.max_length)
    loader = shuffled_loader(features, lambda: [len(f.input_ids) for f in features], cfg.batch_size, cfg.seed,
                             cfg.group_by_length, collate_fn=partial(collate_sft, pad_id=tokenizer.pad_token_id))
    steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / cfg.grad_accum)
    optimizer, scheduler = make_optimizer(model.parameters(), cfg, steps_per_epoch * cfg.epochs)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    progress = resume_from(accelerator, cfg.output_dir) if cfg.resume else Progress()
    metrics = Metrics(accelerator, cfg, "sft")

    def checkpoint() -> None:
        save_step_checkpoint(accelerator, model, _lm, tokenizer, cfg, progress)

    bar = tqdm(total=steps_per_epoch * cfg.epochs, initial=progress.step, desc="sft",
               disable=not (cfg.progress and accelerator.is_main_process))
    model.train()
    for epoch in range(progress.epoch, cfg.epochs):
        for i, batch in epoch_batches(accelerator, loader, progress, epoch):
            with accelerator.accumulate(model):
                loss = model(**batch, use_cache=False).loss  # no KV cache in training (nor with checkpointing)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            progress.step += 1
            progress.epoch, progress.batch_in_epoch = epoch, i + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            metrics.log({"loss": accelerator.reduce(loss.detach(), "mean").item(),
                         "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0], "epoch": epoch}, progress.step)
            if cfg.save_every and progress.step % cfg.save_every == 0:
                checkpoint()
        progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        if eval_set and cfg.eval_every_epoch:
            acc = evaluate_run(accelerator, accelerator.unwrap_model(model), tokenizer, eval_set, grader, cfg,
                               cfg.output_dir / f"predictions-epoch{epoch + 1}.jsonl")
            metrics.log({"eval_accuracy": acc, "epoch": epoch + 1}, progress.step)
            log.info("epoch %d: eval accuracy %.4f", epoch + 1, acc)
        checkpoint()
    bar.close()
    final = save_checkpoint(accelerator, model, _lm, tokenizer, cfg.output_dir, "final", None,
                            cfg.model_dump(mode="json"))
    metrics.close()
    return final
