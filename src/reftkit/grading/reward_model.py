"""Outcome reward model for rerank@k (the paper's reranking baseline): what it reads and how it scores.
Training it is `reftkit.trainers.reranker`.

A sequence classifier initialised from an SFT checkpoint (`AutoModelForSequenceClassification`
with one output: the logit that the sample's final answer is correct), trained on graded samples
of the training questions.

The input is the prompt plus the sample, right-padded; the score is read at the last non-pad
token (the transformers convention), so the text carries no EOS: models that pad with EOS would
otherwise be read one token early.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate.utils import gather_object
from transformers import AutoModelForSequenceClassification

from reftkit.data.prompts import pad_right, prompt_text, tail_token_ids
from reftkit.data.records import Example
from reftkit.modeling.model import load_pretrained, load_tokenizer


def reranker_text(example: Example, output: str) -> str:
    """What the reranker reads: the N-CoT prompt, then the output (P-CoT's includes its header)."""
    return prompt_text(example, "natural") + output


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids, keeping the last max_length: the final answer is at the end (a huge question is
    never tokenized whole)."""
    return [tail_token_ids(tokenizer, text, max_length, add_special_tokens=True)[0] for text in texts]


def collate(rows: list[tuple[list[int], float]], pad_id: int) -> dict[str, torch.Tensor]:
    return {"input_ids": pad_right([r[0] for r in rows], pad_id),
            "attention_mask": pad_right([[1] * len(r[0]) for r in rows], 0),
            "labels": torch.tensor([r[1] for r in rows])}


def new_reranker(sft_dir: str, pad_token_id: int):
    model = load_pretrained(AutoModelForSequenceClassification, sft_dir, num_labels=1)
    model.config.pad_token_id = pad_token_id  # where the score is read: the last non-pad token
    return model


def load_reranker(reranker_dir: str):
    """A trained reranker, or a ValueError naming what it lacks. Loading a causal LM (an SFT checkpoint)
    as a sequence classifier succeeds with a randomly initialised score head, whose scores would rank
    samples by noise: so every tensor of the classifier must come from the checkpoint's weights."""
    model, info = load_pretrained(AutoModelForSequenceClassification, reranker_dir, output_loading_info=True)
    missing = sorted(info["missing_keys"])
    if missing:
        raise ValueError(f"reranker {reranker_dir!r} is not a trained reranker: its weights have no "
                         f"{', '.join(missing)} (the score head `reftkit train-reranker` trains and saves), so it "
                         "would score with random weights. A causal LM such as an SFT checkpoint is not a reranker; "
                         "train one with `reftkit train-reranker --model <SFT checkpoint>`")
    if model.config.num_labels != 1:
        raise ValueError(f"reranker {reranker_dir!r} has {model.config.num_labels} outputs; a reftkit reranker has "
                         "one (the logit that the answer is right), as `reftkit train-reranker` trains it")
    return model


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


def score_samples(accelerator, reranker_dir: str, examples: Sequence[Example], rows: Sequence[dict],
                  cfg) -> list[float]:
    """Scores sample rows (from `draw_samples` or a samples file) with a trained reranker."""
    model = load_reranker(reranker_dir).to(accelerator.device)
    tokenizer = load_tokenizer(reranker_dir)
    texts = [reranker_text(examples[r["index"]], r["output"]) for r in rows]
    return score_texts(accelerator, model, tokenizer, texts, cfg.eval_batch_size, cfg.max_length)
