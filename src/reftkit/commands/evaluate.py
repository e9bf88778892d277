"""`reftkit eval`: greedy top-1 accuracy of a checkpoint, with a readable predictions file.

On multiple-choice data the summary (metrics.jsonl and the log line) also reports the consistency
rate: the share of predictions whose picked option matches the number their reasoning ended on,
with the counts behind it (reftkit.grading.faithfulness). With program CoT it reports how the programs
ended (programs_ok, programs_timeout, ...: reftkit.grading.cot.status_counts)."""

from __future__ import annotations

import logging

from reftkit.config import EvalConfig
from reftkit.data.loading import load_examples_for
from reftkit.grading.cot import open_grader
from reftkit.modeling.model import load_causal_lm, load_tokenizer
from reftkit.rollout.decoding import evaluate_run
from reftkit.training.checkpoints import check_results_dir
from reftkit.training.device import make_accelerator
from reftkit.training.metrics import Metrics
from reftkit.training.preflight import preflight
from reftkit.training.rundir import on_main_process, owns_output_dir

log = logging.getLogger("reftkit")


@owns_output_dir
def run_eval(cfg: EvalConfig) -> float:
    preflight(cfg)
    accelerator = make_accelerator(cfg)
    # before decoding, not after it; never into a training run's directory
    on_main_process(accelerator.is_main_process,
                    lambda: check_results_dir(cfg, ("predictions.jsonl", "metrics.jsonl"), training_runs=False))
    examples = load_examples_for(cfg.eval_file, cfg, "eval")[: cfg.max_eval_examples]
    lm = load_causal_lm(cfg.model).to(accelerator.device).eval()
    shots = load_examples_for(cfg.train_file, cfg, "train")[: cfg.few_shot] if cfg.few_shot else []
    path = cfg.output_dir / "predictions.jsonl"
    read_outs: dict = {}
    with open_grader(cfg) as grader:
        acc = evaluate_run(accelerator, lm, load_tokenizer(cfg.model), examples, grader, cfg, path, shots, read_outs)
    Metrics(accelerator, cfg, "eval").log({"eval_accuracy": acc, "examples": len(examples)} | read_outs, 0)
    log.info("accuracy %.4f on %d examples%s%s; predictions in %s", acc, len(examples), consistency_note(read_outs),
             status_note(read_outs), path)
    return acc


def consistency_note(read_outs: dict) -> str:
    """The log line's consistency part on multiple-choice data; empty for numeric data."""
    if "consistency" not in read_outs:
        return ""
    rate = "n/a" if read_outs["consistency"] is None else f"{read_outs['consistency']:.4f}"
    return (f", consistency {rate} ({read_outs['consistent']} consistent, {read_outs['inconsistent']} inconsistent "
            f"of which {read_outs['correct_inconsistent']} correct, {read_outs['consistency_unknown']} unknown)")


def status_note(read_outs: dict) -> str:
    """The log line's program part (program CoT): how many programs ended how, e.g. ", programs: 3 ok, 1 timeout"."""
    ended = [(
        f"{n} {key.removeprefix('programs_')}"
    ) for key, n in read_outs.items() if key.startswith("programs_") and n]
    return f", programs: {', '.join(ended)}" if ended else ""
