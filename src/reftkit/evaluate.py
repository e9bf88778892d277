"""Batched greedy decoding, top-1 accuracy and a per-example JSONL a person can read."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from reftkit.answers import Grader
from reftkit.config import CommonConfig
from reftkit.cot import CotStyle, response_prefix
from reftkit.data.records import Example
from reftkit.prompts import encode_prompt
from reftkit.rollout import Sampling, generate


def evaluate(
    accelerator: Accelerator,
    lm: PreTrainedModel,
    tokenizer,
    examples: list[Example],
    grader: Grader,
    *,
    batch_size: int,
    max_prompt_tokens: int,
    max_new_tokens: int,
    progress: bool = True,
    predictions_path: Path | None = None,
    cot: CotStyle = "natural",
) -> float:
    """Top-1 (greedy) accuracy over all processes; each process decodes its own shard.

    Prompts are sorted by length inside a shard so a batch pads as little as possible.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = list(range(rank, len(examples), world))
    prompts = {i: encode_prompt(tokenizer, examples[i], max_prompt_tokens, cot) for i in shard}
    order = sorted(shard, key=lambda i: len(prompts[i]))
    rows = []
    greedy = Sampling(do_sample=False, max_new_tokens=max_new_tokens)
    bar = tqdm(total=len(examples), desc="eval", disable=not (progress and accelerator.is_main_process))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        with accelerator.autocast():
            out = generate(lm, tokenizer, [prompts[i] for i in idx], greedy)
        grades = grader.grade(out.texts, [examples[i] for i in idx])
        for i, text, grade in zip(idx, out.texts, grades, strict=True):
            ex = examples[i]
            rows.append({"index": i, "id": ex.id, "question": ex.question, "output": response_prefix(ex, cot) + text,
                         "extracted": grade.extracted, "gold": ex.answer, "correct": grade.correct}
                        | ({"detail": grade.detail} if grade.detail else {}))
        bar.update(len(idx) * world)
    bar.close()
    rows = sorted(gather_object(rows), key=lambda r: r["index"])
    if predictions_path is not None and accelerator.is_main_process:
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        with predictions_path.open("w") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if k != "index"}) + "\n")
    return sum(r["correct"] for r in rows) / max(len(rows), 1)


def evaluate_run(accelerator: Accelerator, lm: PreTrainedModel, tokenizer, examples: list[Example], grader: Grader,
                 cfg: CommonConfig, predictions_path: Path) -> float:
    """`evaluate` with a run config's batch size, lengths and progress setting."""
    return evaluate(accelerator, lm, tokenizer, examples, grader, batch_size=cfg.eval_batch_size,
                    max_prompt_tokens=cfg.max_prompt_tokens, max_new_tokens=cfg.max_length - cfg.max_prompt_tokens,
                    progress=cfg.progress, predictions_path=predictions_path, cot=cfg.cot)
