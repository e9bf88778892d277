"""Reranker recipe: train the outcome reward model (`reftkit.grading.reward_model`) on graded samples of the
training questions, drawn from the SFT model or read from `reftkit sample`'s samples.jsonl.

Classes are balanced by weighting, not by dropping samples: the loss is binary cross-entropy with
pos_weight = (#wrong / #correct), so every sample is used and both classes weigh the same in total.
Identical (question, output) pairs are kept once.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from reftkit.commands.sample import draw_samples, read_samples
from reftkit.config import RerankerConfig
from reftkit.data.batching import shuffled_loader
from reftkit.data.loading import training_examples
from reftkit.data.records import Example
from reftkit.grading.cot import open_grader
from reftkit.grading.reward_model import collate, encode_texts, new_reranker, reranker_text
from reftkit.modeling.model import enable_gradient_checkpointing, load_causal_lm, load_tokenizer
from reftkit.training.checkpoints import claim_output_dir
from reftkit.training.device import make_accelerator
from reftkit.training.loop import fit, steps_per_epoch
from reftkit.training.optim import make_optimizer
from reftkit.training.preflight import preflight
from reftkit.training.rundir import owns_output_dir


def pos_weight(labels: Sequence[float]) -> float:
    """#negatives / #positives, so both classes weigh the same in the loss (1 if one is absent)."""
    positives = sum(1 for y in labels if y > 0.5)
    negatives = len(labels) - positives
    return negatives / positives if positives and negatives else 1.0


def classifier_loss(model, batch: dict, weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
    labels = batch["labels"].float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, labels, pos_weight=torch.tensor(weight, device=logits.device))
    return loss, {"train_accuracy": ((logits > 0).float() == labels).float().mean().item()}


@owns_output_dir
def train_reranker(cfg: RerankerConfig, train: list[Example] | None = None) -> Path:
    """Trains the reward model and returns its directory (a plain HF sequence classifier)."""
    preflight(cfg, train_given=train is not None)
    accelerator = make_accelerator(cfg)
    run = claim_output_dir(accelerator, cfg, "train-reranker")
    train = training_examples(train, cfg, require_cot=cfg.train_needs_cot)
    tokenizer = load_tokenizer(cfg.model)
    tokenizer.padding_side = "right"
    if cfg.samples_file:
        rows = read_samples(Path(cfg.samples_file), train)
    else:
        with open_grader(cfg) as grader:
            rows = draw_samples(accelerator, load_causal_lm(cfg.model), load_tokenizer(cfg.model), train, grader, cfg)
    unique = {(r["index"], r["output"]): float(r["correct"]) for r in rows}
    texts = [reranker_text(train[i], output) for i, output in unique]
    labels = list(unique.values())
    features = list(zip(encode_texts(tokenizer, texts, cfg.max_length), labels, strict=True))
    weight = pos_weight(labels)

    model = new_reranker(cfg.model, tokenizer.pad_token_id)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    loader = shuffled_loader(features, lambda: [len(f[0]) for f in features], cfg.batch_size, cfg.seed,
                             cfg.group_by_length, collate_fn=partial(collate, pad_id=tokenizer.pad_token_id))
    steps = steps_per_epoch(accelerator, loader, cfg.grad_accum)
    optimizer, scheduler = make_optimizer(model.parameters(), cfg, steps * cfg.epochs)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return fit(accelerator, cfg, run, model, tokenizer, loader, optimizer, scheduler,
               partial(classifier_loss, weight=weight), name="reranker", steps_per_epoch=steps)
