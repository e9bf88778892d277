"""`reftkit sample`: k graded samples per question, and what the protocol reads off them.

samples.jsonl holds one row per sample: id, question, sample (0..k-1), output (what the model
wrote, after any generation prefix such as P-CoT's function header), extracted, gold, correct,
detail (programs: exit status), for multiple choice consistent (reftkit.grading.faithfulness) and,
with a reranker, score. Offline self-training and the reranker read it back, joined to the
training examples by id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from reftkit.config import SampleConfig
from reftkit.data.readers import DataError
from reftkit.data.records import Example
from reftkit.grading.answers import reasoning_of
from reftkit.grading.cot import CotStyle, open_grader, program_body, response_prefix, warn_if_sandbox_limited
from reftkit.grading.faithfulness import consistency_summary
from reftkit.grading.reward_model import score_samples
from reftkit.grading.voting import majority_vote, pass_at_k, rerank
from reftkit.rollout.decoding import decode_and_grade, row_status_counts
from reftkit.rollout.generation import Sampling
from reftkit.training.checkpoints import check_results_dir
from reftkit.training.rundir import on_main_process, owns_output_dir
from reftkit.writers import write_json, write_jsonl

log = logging.getLogger("reftkit")
SAMPLES_FILE, RESULTS_FILE = "samples.jsonl", "results.json"


def draw_samples(accelerator, lm, tokenizer, examples: list[Example], grader, cfg) -> list[dict]:
    """`cfg.num_samples` graded samples per example (cfg: any config with sampling options)."""
    lm = lm.to(accelerator.device).eval()
    rows = decode_and_grade(accelerator, lm, tokenizer, examples, grader, Sampling.of(cfg),
                            num_samples=cfg.num_samples, batch_size=cfg.eval_batch_size,
                            max_prompt_tokens=cfg.max_prompt_tokens, cot=cfg.cot, progress=cfg.progress, desc="sample")
    if accelerator.is_main_process:
        warn_if_sandbox_limited(row_status_counts(rows), cfg, "sampling")
    return rows


def summarize(rows: Sequence[dict], examples: Sequence[Example]) -> dict:
    """Per-question sample, vote@k, pass@k and (when rows have scores) rerank@k accuracy; on
    multiple-choice data also the samples' consistency rate and counts (`consistency_summary`); for
    program CoT the programs' exit statuses (programs_ok, programs_timeout, ...: `status_counts`)."""
    by_index: dict[int, list[dict]] = {}
    for r in rows:
        by_index.setdefault(r["index"], []).append(r)
    n = len(examples)
    vote = passed = reranked = 0
    for i, ex in enumerate(examples):
        group = by_index.get(i, [])
        winner = majority_vote([r["extracted"] for r in group], multiple_choice=ex.is_multiple_choice)
        vote += winner is not None and group[winner]["correct"]
        passed += pass_at_k([r["correct"] for r in group])
        if group and "score" in group[0]:
            reranked += group[rerank([r["score"] for r in group])]["correct"]
    k = max((len(g) for g in by_index.values()), default=0)
    summary = {"questions": n, "k": k, "sample_accuracy": sum(r["correct"] for r in rows) / max(len(rows), 1),
               "vote_accuracy": vote / max(n, 1), "pass_accuracy": passed / max(n, 1)}
    if rows and "score" in rows[0]:
        summary["rerank_accuracy"] = reranked / max(n, 1)
    return summary | consistency_summary(rows) | row_status_counts(rows)


@owns_output_dir
def run_sample(cfg: SampleConfig) -> dict:
    """Writes samples.jsonl and results.json into output_dir; returns the summary. Every input (the reranker
    too) is checked before sampling, and the samples are written before they are scored."""
    from reftkit.data.loading import load_examples_for
    from reftkit.modeling.model import load_causal_lm, load_tokenizer
    from reftkit.training.device import make_accelerator
    from reftkit.training.preflight import preflight

    preflight(cfg)
    accelerator = make_accelerator(cfg)
    on_main_process(accelerator.is_main_process,  # before sampling, not after it
                    lambda: check_results_dir(cfg, (SAMPLES_FILE, RESULTS_FILE)))
    examples = load_examples_for(cfg.eval_file, cfg, "eval")[: cfg.max_eval_examples]
    with open_grader(cfg) as grader:
        rows = draw_samples(accelerator, load_causal_lm(cfg.model), load_tokenizer(cfg.model), examples, grader, cfg)
    if accelerator.is_main_process:  # kept, whatever happens to the scoring
        write_jsonl(cfg.output_dir / SAMPLES_FILE, rows)
    if cfg.reranker:
        scores = score_samples(accelerator, cfg.reranker, examples, rows, cfg)
        rows = [r | {"score": s} for r, s in zip(rows, scores, strict=True)]
        if accelerator.is_main_process:
            write_jsonl(cfg.output_dir / SAMPLES_FILE, rows)
    summary = summarize(rows, examples)
    if accelerator.is_main_process:
        write_json(cfg.output_dir / RESULTS_FILE, summary)
    accelerator.wait_for_everyone()
    log.info("%s", summary)
    return summary


def read_samples(path: Path, examples: Sequence[Example]) -> list[dict]:
    """Rows of a samples file with their `index` into `examples` (joined by id); an unknown id or a
    missing field is an error naming the file, the line and the field."""
    index = {ex.id: i for i, ex in enumerate(examples)}
    rows = []
    with Path(path).open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_no}: not JSON ({e.msg})") from None
            for field in ("id", "output", "correct"):
                if field not in row:
                    raise DataError(f"{path} line {line_no}: field '{field}' is missing")
            if row["id"] not in index:
                raise DataError(
                    f"{path} line {line_no}: field 'id' = {row['id']!r} is not a question of the training data"
                )
            rows.append(row | {"index": index[row["id"]]})
    return rows


def completion_of(row: dict, example: Example, cot: CotStyle) -> str:
    """What the model generated: the row's output without the generation prefix."""
    return row["output"].removeprefix(response_prefix(example, cot))


def example_from_sample(example: Example, completion: str, cot: CotStyle) -> Example:
    """A correct sample as a training example: its reasoning becomes the reference CoT."""
    if cot == "program":
        return Example(example.id, example.question, program_body(completion), example.answer, example.options)
    return Example(example.id, example.question, reasoning_of(completion), example.answer, example.options)


def correct_examples(rows: Sequence[dict], examples: Sequence[Example], cot: CotStyle) -> list[Example]:
    """The correct samples as training examples, deduplicated per question (the paper's Offline-ST)."""
    seen: set[tuple[int, str]] = set()
    kept = []
    for r in rows:
        if not r["correct"]:
            continue
        ex = examples[r["index"]]
        new = example_from_sample(ex, completion_of(r, ex, cot), cot)
        key = (r["index"], new.cot.strip())
        if key not in seen:
            seen.add(key)
            kept.append(new)
    return kept
