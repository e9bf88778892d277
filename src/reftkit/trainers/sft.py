"""Supervised fine-tuning recipe: (question, reference CoT) pairs, loss on response tokens only."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from reftkit.config import SFTConfig
from reftkit.data.batching import shuffled_loader
from reftkit.data.prompts import collate_sft, encode_sft_examples
from reftkit.data.records import Example
from reftkit.grading.cot import open_grader
from reftkit.training.loop import fit, start_lm_run, steps_per_epoch
from reftkit.training.optim import make_optimizer
from reftkit.training.preflight import preflight
from reftkit.training.rundir import owns_output_dir


@owns_output_dir
def train_sft(cfg: SFTConfig, train: list[Example] | None = None, eval_set: list[Example] | None = None, *,
              model=None, tokenizer=None) -> Path:
    """Runs SFT from `cfg.model` (or the loaded `model` and `tokenizer`) and returns the directory of the final
    model (a plain HF checkpoint)."""
    preflight(cfg, train_given=train is not None, eval_given=eval_set is not None, model_given=model is not None)
    with open_grader(cfg) as grader:  # for program CoT, this starts the sandbox the evaluations use
        return _train_sft(cfg, train, eval_set, grader, model, tokenizer)


def _train_sft(cfg: SFTConfig, train: list[Example] | None, eval_set: list[Example] | None, grader, model=None,
               tokenizer=None) -> Path:
    accelerator, run, train, eval_set, model, tokenizer = start_lm_run(cfg, "sft", train, eval_set, model=model,
                                                                       tokenizer=tokenizer)
    features = encode_sft_examples(tokenizer, train, cfg.max_prompt_tokens, cfg.max_length, cfg.cot, run.cuts)
    loader = shuffled_loader(features, lambda: [len(f.input_ids) for f in features], cfg.batch_size, cfg.seed,
                             cfg.group_by_length, collate_fn=partial(collate_sft, pad_id=tokenizer.pad_token_id))
    steps = steps_per_epoch(accelerator, loader, cfg.grad_accum)
    optimizer, scheduler = make_optimizer(model.parameters(), cfg, steps * cfg.epochs)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return fit(accelerator, cfg, run, model, tokenizer, loader, optimizer, scheduler, lm_loss, name="sft",
               steps_per_epoch=steps, eval_set=eval_set if cfg.eval_every_epoch else None, grader=grader)


def lm_loss(model, batch: dict) -> tuple:
    """Mean token NLL of the response (labels mask the prompt); no KV cache in training."""
    return model(**batch, use_cache=False).loss, {}
