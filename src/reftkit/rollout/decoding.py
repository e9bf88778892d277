"""Batched decoding and grading (greedy or k samples per question), with a JSONL a person can read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from reftkit.config import DataOptions
from reftkit.data.prompts import FEW_SHOT_STOP, Truncations, encode_prompts
from reftkit.data.records import Example
from reftkit.grading.answers import Grade, Grader
from reftkit.grading.cot import CotStyle, response_prefix, status_counts, warn_if_sandbox_limited
from reftkit.grading.faithfulness import consistency_summary, prediction_consistency
from reftkit.rollout.generation import Sampling, generate
from reftkit.writers import write_jsonl


def decode_and_grade(
    accelerator: Accelerator,
    lm: PreTrainedModel,
    tokenizer,
    examples: list[Example],
    grader: Grader,
    sampling: Sampling,
    *,
    num_samples: int = 1,
    batch_size: int,
    max_prompt_tokens: int,
    cot: CotStyle = "natural",
    progress: bool = True,
    desc: str = "eval",
    local: bool = False,
    shots: Sequence[Example] = (),
    cuts: Truncations | None = None,
) -> list[dict]:
    """`num_samples` graded responses per example, one row per response, ordered by (example,
    sample): each process decodes its shard and all get all rows; with `local`, each process
    decodes all of its own `examples` (a trainer's per-process batch) and keeps its rows.

    Prompts are sorted by length inside a shard so a batch pads as little as possible;
    `batch_size` counts responses, so k samples per prompt mean batch_size // k prompts a batch, and
    a prompt with more than batch_size samples has them drawn in chunks of at most batch_size:
    memory follows batch_size, never k (for k <= batch_size, one call per batch, as before).
    `shots` are worked examples put before every prompt (few-shot prompting of a base model).
    A multiple-choice row also carries `consistent`: whether the picked option matches the number
    its reasoning ended on (True/False, None when unknown; rules in reftkit.grading.faithfulness).
    Prompts cut at max_prompt_tokens are counted in `cuts` (a run's), warned about once.
    """
    rank, world = (0, 1) if local else (accelerator.process_index, accelerator.num_processes)
    shard = list(range(rank, len(examples), world))
    prompts = dict(zip(shard, encode_prompts(tokenizer, [examples[i] for i in shard], max_prompt_tokens, cot, shots,
                                             cuts),
                       strict=True))
    order = sorted(shard, key=lambda i: len(prompts[i]))
    per_batch = max(1, batch_size // num_samples)
    chunk = min(num_samples, batch_size)  # samples of one prompt per `generate` call
    rows = []
    bar = tqdm(total=len(examples), desc=desc, disable=not (progress and accelerator.is_main_process))
    for start in range(0, len(order), per_batch):
        idx = order[start : start + per_batch]
        for first in range(0, num_samples, chunk):
            k = min(chunk, num_samples - first)
            with accelerator.autocast():
                out = generate(lm, tokenizer, [prompts[i] for i in idx], sampling, k)
            repeated = [i for i in idx for _ in range(k)]  # generate keeps prompt order
            grades = grader.grade(out.texts, [examples[i] for i in repeated])
            for n, (i, text, grade) in enumerate(zip(repeated, out.texts, grades, strict=True)):
                rows.append(graded_row(examples[i], i, first + n % k, text, grade, cot))
        bar.update(len(idx) * world)
    bar.close()
    return sorted(rows if local else gather_object(rows), key=lambda r: (r["index"], r["sample"]))


def graded_row(ex: Example, index: int, sample: int, text: str, grade: Grade, cot: CotStyle) -> dict:
    """One predictions/samples row: a response of example `index` and its grade."""
    row = {"index": index, "sample": sample, "id": ex.id, "question": ex.question,
           "output": response_prefix(ex, cot) + text, "extracted": grade.extracted, "gold": ex.answer,
           "correct": grade.correct}
    if ex.is_multiple_choice:
        row["consistent"] = prediction_consistency(ex, text, grade, cot)
    return row | ({"detail": grade.detail} if grade.detail else {})


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
    shots: Sequence[Example] = (),
    read_outs: dict | None = None,
    cuts: Truncations | None = None,
) -> float:
    """Top-1 (greedy) accuracy over all processes; with `shots`, a response ends where the model
    starts a new question. `read_outs`, when given, is filled with the multiple-choice consistency
    counts (`reftkit.grading.faithfulness.consistency_summary`; nothing for numeric data) and, for program
    CoT, the programs' exit statuses (`reftkit.grading.cot.status_counts`)."""
    greedy = Sampling(do_sample=False, max_new_tokens=max_new_tokens, stop=FEW_SHOT_STOP if shots else None)
    rows = decode_and_grade(accelerator, lm, tokenizer, examples, grader, greedy, batch_size=batch_size,
                            max_prompt_tokens=max_prompt_tokens, cot=cot, progress=progress, shots=shots,
                            cuts=cuts)
    if predictions_path is not None and accelerator.is_main_process:
        write_jsonl(predictions_path, ({k: v for k, v in r.items() if k not in ("index", "sample")} for r in rows))
    if read_outs is not None:
        read_outs.update(consistency_summary(rows) | row_status_counts(rows))
    return sum(r["correct"] for r in rows) / max(len(rows), 1)


def row_status_counts(rows: Sequence[dict]) -> dict[str, int]:
    """`status_counts` of prediction or sample rows (program CoT; {} for natural CoT)."""
    return status_counts(r["detail"] for r in rows if r.get("detail"))


def eval_record(accuracy: float, read_outs: dict) -> dict:
    """A training run's eval row: the accuracy and `evaluate`'s read-outs, named eval_* so that they
    are not mistaken for the same counts over training samples (programs_* of a rollout batch)."""
    return {"eval_accuracy": accuracy} | {f"eval_{key}": value for key, value in read_outs.items()}


def evaluate_run(accelerator: Accelerator, lm: PreTrainedModel, tokenizer, examples: list[Example], grader: Grader,
                 cfg: DataOptions, predictions_path: Path, shots: Sequence[Example] = (),
                 read_outs: dict | None = None, cuts: Truncations | None = None) -> float:
    """`evaluate` with a run config's batch size, lengths and progress setting; warns when the
    sandbox's limits stopped a noticeable share of the programs (program CoT)."""
    read_outs = {} if read_outs is None else read_outs
    acc = evaluate(accelerator, lm, tokenizer, examples, grader, batch_size=cfg.eval_batch_size,
                   max_prompt_tokens=cfg.max_prompt_tokens, max_new_tokens=cfg.max_length - cfg.max_prompt_tokens,
                   progress=cfg.progress, predictions_path=predictions_path, cot=cfg.cot, shots=shots,
                   read_outs=read_outs, cuts=cuts)
    if accelerator.is_main_process:
        warn_if_sandbox_limited(read_outs, cfg, f"eval ({predictions_path.name})")
    return acc
