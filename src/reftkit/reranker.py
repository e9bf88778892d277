"""Outcome reward model for rerank@k (the paper's reranking baseline).

A sequence classifier initialised from an SFT checkpoint (`AutoModelForSequenceClassification`
with one output: the logit that the sample's final answer is correct), trained on graded samples
of the training questions. Classes are balanced by weighting, not by dropping samples: the loss
is binary cross-entropy with pos_weight = (#wrong / #correct), so every sample is used and both
classes weigh the same in total. Identical (question, output) pairs are kept once.

The input is the prompt plus the sample, right-padded; the score is read at the last non-pad
token (the transformers convention), so the text carries no EOS: models that pad with EOS would
otherwise be read one token early.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import AutoModelForSequenceClassification

from reftkit.batching import shuffled_loader
from reftkit.config import RerankerConfig
from reftkit.cot import open_grader
from reftkit.data.records import Example
from reftkit.model import enable_gradient_checkpointing, load_causal_lm, load_tokenizer
from reftkit.prompts import pad_right, prompt_text
from reftkit.sampling import draw_samples, read_samples
from reftkit.checkpoints import claim_output_dir
from reftkit.runtime import make_accelerator, make_optimizer, training_examples
from reftkit.trainers.fit import fit, steps_per_epoch


def reranker_text(example: Example, output: str) -> str:
    """What the reranker reads: the N-CoT prompt, then the output (P-CoT's includes its header)."""
    return prompt_text(example, "natural") + output


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids, keeping the last max_length: the final answer is at the end."""
    return [ids[-max_length:] for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def collate(rows: list[tuple[list[int], float]], pad_id: int) -> dict[str, torch.Tensor]:
    return {"input_ids": pad_right([r[0] for r in rows], pad_id),
            "attention_mask": pad_right([[1] * len(r[0]) for r in rows], 0),
            "labels": torch.tensor([r[1] for r in rows])}


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


def new_reranker(sft_dir: str, pad_token_id: int):
    model = AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1)
    model.config.pad_token_id = pad_token_id  # where the score is read: the last non-pad token
    return model


def train_reranker(cfg: RerankerConfig, train: list[Example] | None = None) -> Path:
    """Trains the reward model and returns its directory (a plain HF sequence classifier)."""
    accelerator = make_accelerator(cfg)
    run = claim_output_dir(accelerator, cfg, "train-reranker")
    train = training_examples(train, cfg, require_cot=False)  # graded samples, not the reference CoT
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


@torch.no_grad()
def score_texts(accelerator, model, tokenizer, texts: Sequence[str], batch_size: int, max_length: int) -> list[float]:
    """Reranker logits of `texts` (in order); each process scores its own shard."""
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = list(range(rank, len(texts), world))
    ids = dict(zip(shard, encode_texts(tokenizer, [texts[i] for i in shard], max_length), strict=True))
    order = sorted(shard, key=lambda i: len(ids[i]))
    model.eval()
    scored = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([(ids[i], 0.0) for i in idx], tokenizer.pad_token_id)
        with accelerator.autocast():
            logits = model(input_ids=batch["input_ids"].to(accelerator.device),
                           attention_mask=batch["attention_mask"].to(accelerator.device)).logits[:, 0]
        scored += list(zip(idx, logits.float().tolist(), strict=True))
    return [score for _, score in sorted(gather_object(scored))]


def score_samples(accelerator, reranker_dir: str, examples: Sequence[Example], rows: Sequence[dict], cfg) -> list[float]:
    """Scores sample rows (from `draw_samples` or a samples file) with a trained reranker."""
    model = AutoModelForSequenceClassification.from_pretrained(reranker_dir).to(accelerator.device)
    tokenizer = load_tokenizer(reranker_dir)
    texts = [reranker_text(examples[r["index"]], r["output"]) for r in rows]
    return score_texts(accelerator, model, tokenizer, texts, cfg.eval_batch_size, cfg.max_length)
