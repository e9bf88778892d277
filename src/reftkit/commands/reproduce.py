"""`reftkit reproduce`: the paper's comparison in one resumable run.

Stages, each in its own directory under output_dir:
  warmup                         SFT from `model` (the paper's warm-up)
  sft, online_st, reft           continued SFT, Online-ST and ReFT from the warm-up
  train_samples                  k samples per training question from the warm-up
  offline_st, reranker           Offline-ST and the reward model, both from those samples and the warm-up
  eval/<method>                  top-1, vote@k, pass@k and rerank@k on the test set (eval_file)
then results.md, results.json, curves.png and accuracy.png in output_dir.

A stage is done when its final artefact exists (written atomically): a rerun skips it, and a
training stage with checkpoints but no final model resumes from its last checkpoint. Training
stages never see the test set; only the eval stages read it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from reftkit.commands.report import (
    paired_counts,
    plot_accuracy,
    plot_curves,
    read_predictions,
    results_table,
    sampled_tokens,
)
from reftkit.commands.sample import RESULTS_FILE, run_sample
from reftkit.config import DemoConfig, EvalConfig, ReproduceConfig, only_fields
from reftkit.rl.methods import ESTIMATORS, RL_METHODS
from reftkit.training.checkpoints import STATE_FILE, latest_checkpoint
from reftkit.training.device import process_state
from reftkit.training.preflight import preflight
from reftkit.training.rundir import owns_output_dir
from reftkit.writers import write_examples, write_json

log = logging.getLogger("reftkit")
METHOD_NAMES = {"warmup": "warm-up SFT", "sft": "SFT", "offline_st": "Offline-ST", "online_st": "Online-ST",
                "reft": ESTIMATORS["gae"].display, **{m.name: m.display for m in RL_METHODS.values()}}
STAGE_FILE = "stage.json"  # wall-clock seconds of a finished stage


def _write_json(path: Path, data: dict) -> None:
    if process_state().is_main_process:
        write_json(path, data)
    process_state().wait_for_everyone()


def _timed(directory: Path, run: Callable[[], object]) -> None:
    """stage.json: the seconds the stage took; for a training stage, those its final model records,
    which add up every part of a run that was interrupted and resumed."""
    start = time.time()
    made = run()
    recorded = made / STATE_FILE if isinstance(made, Path) else None
    seconds = json.loads(recorded.read_text()).get("seconds") if recorded and recorded.exists() else None
    _write_json(directory / STAGE_FILE, {"seconds": round(time.time() - start if seconds is None else seconds, 1)})


def train_stage(cfg: ReproduceConfig, name: str, train_fn: Callable, **fixed) -> Path:
    """Runs one training stage unless its final model exists; resumes it from a checkpoint."""
    return resumable_training(name, cfg.stage(name, **fixed), train_fn)  # stages get no eval_file: no test-set peeking


def resumable_training(name: str, stage_cfg, train_fn: Callable) -> Path:
    """`train_fn(stage_cfg)` unless its final model exists, resumed from its last checkpoint if any;
    the seconds it took go to stage.json (after an interruption, those of every part up to each one's
    last checkpoint: work lost after it is not counted)."""
    final = stage_cfg.output_dir / "final"
    if (final / STATE_FILE).exists():
        log.info("stage %s: done, skipped (%s)", name, final)
        return final
    stage_cfg.resume = latest_checkpoint(stage_cfg.output_dir) is not None
    # The stage directory is this reproduce run's own: what an attempt left before its first
    # checkpoint (metrics, the run file) is replaced rather than refused.
    stage_cfg.overwrite_output_dir = not stage_cfg.resume
    log.info("stage %s: %s", name, "resuming" if stage_cfg.resume else "starting")
    _timed(stage_cfg.output_dir, lambda: train_fn(stage_cfg))
    return final


def sample_stage(cfg: ReproduceConfig, name: str, directory: Path, **fixed) -> Path:
    """`reftkit sample` as a stage; done when its results.json exists."""
    stage_cfg = cfg.stage(name, output_dir=directory, **fixed)
    if not (directory / RESULTS_FILE).exists():
        log.info("stage %s: sampling into %s", name, directory)
        _timed(directory, lambda: run_sample(stage_cfg))
    return directory


def eval_stage(cfg: ReproduceConfig, method: str, model: Path, reranker: Path, test_file: str) -> dict:
    """Top-1 (greedy) plus vote@k, pass@k and rerank@k of one method's model on the test set."""
    from reftkit.commands.evaluate import run_eval

    directory = cfg.output_dir / "eval" / method
    summary_file = directory / "summary.json"
    # Which training runs made the model and the reranker: a retrained one makes this stage stale.
    made = [json.loads((d / STATE_FILE).read_text())["time"] for d in (model, reranker)]
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if summary["made"] == made:
            return summary
        log.info("stage eval/%s: the model or the reranker was retrained, evaluating again", method)
        if process_state().is_main_process:
            (directory / RESULTS_FILE).unlink(missing_ok=True)
        process_state().wait_for_everyone()
    fixed = {"model": str(model), "eval_file": test_file, "reranker": str(reranker)}
    common = cfg.stage("eval", output_dir=directory / "greedy", **fixed)
    top1 = run_eval(EvalConfig(**only_fields(dict(common), EvalConfig)))
    sampled = json.loads((sample_stage(cfg, "eval", directory, **fixed) / RESULTS_FILE).read_text())
    summary = {"top1": top1, "vote": sampled["vote_accuracy"], "rerank": sampled["rerank_accuracy"],
               "pass": sampled["pass_accuracy"], "sample_accuracy": sampled["sample_accuracy"], "k": sampled["k"],
               "made": made}
    _write_json(summary_file, summary)
    return summary


def write_demo_data(cfg: ReproduceConfig) -> tuple[str, str]:
    """The demo's synthetic train and test files (the same generator and sizes as `reftkit demo`)."""
    from reftkit.data.synthetic import make_splits

    demo = DemoConfig()
    train, test = make_splits(demo.n_train, demo.n_test, cfg.seed, demo.one_line_fraction, cfg.cot)
    paths = []
    for split, examples in (("train", train), ("test", test)):
        path = cfg.output_dir / "data" / f"{split}.jsonl"
        if process_state().is_main_process and not path.exists():
            write_examples(path, examples)
        paths.append(str(path))
    process_state().wait_for_everyone()
    return paths[0], paths[1]


@owns_output_dir
def run_reproduce(cfg: ReproduceConfig) -> dict:
    from reftkit.trainers.offline_st import train_offline_st
    from reftkit.trainers.online_st import train_online_st
    from reftkit.trainers.reft import train_reft
    from reftkit.trainers.reranker import train_reranker
    from reftkit.trainers.sft import train_sft

    preflight(cfg)  # the model and both data files, before the first stage trains
    train_file, test_file = write_demo_data(cfg) if cfg.demo else (cfg.train_file, cfg.eval_file)
    data = {"train_file": train_file}
    warm = train_stage(cfg, "warmup", train_sft, **data)
    start = {"model": str(warm), **data}
    samples = sample_stage(cfg, "train_samples", cfg.output_dir / "train_samples", model=str(warm),
                           eval_file=train_file) / "samples.jsonl"
    reranker = train_stage(cfg, "reranker", train_reranker, samples_file=str(samples), **start)
    trainers = {"sft": train_sft, "offline_st": train_offline_st, "online_st": train_online_st, "reft": train_reft,
                **dict.fromkeys(RL_METHODS, train_reft)}
    models = {"warmup": warm}
    for method in cfg.methods:
        extra = {"samples_file": str(samples)} if method == "offline_st" else {}
        models[method] = train_stage(cfg, method, trainers[method], **start, **extra)

    results = {}
    for method, model in models.items():
        results[METHOD_NAMES[method]] = eval_stage(cfg, method, model, reranker, test_file) | {
            "train_seconds": stage_seconds(cfg.output_dir / method),
            "sampled_tokens": sampled_tokens(cfg.output_dir / method)}
    if "reft" in models:  # each method's greedy answers against ReFT's, question by question
        reft = read_predictions(greedy_predictions(cfg, "reft"))
        for method in models:
            if method != "reft":
                results[METHOD_NAMES[method]]["vs_reft"] = asdict(paired_counts(
                    read_predictions(greedy_predictions(cfg, method)), reft))
    k = next(iter(results.values()))["k"]
    table = results_table(results, k)
    seconds = {str(p.parent.relative_to(cfg.output_dir)): json.loads(p.read_text())["seconds"]
               for p in sorted(cfg.output_dir.rglob(STAGE_FILE))}
    _write_json(cfg.output_dir / "results.json", {"config": cfg.model_dump(mode="json"), "results": results,
                                                  "stage_seconds": seconds, "total_seconds": sum(seconds.values())})
    if process_state().is_main_process:
        (cfg.output_dir / "results.md").write_text(table + "\n")
        plot_curves({METHOD_NAMES[m]: cfg.output_dir / m for m in models}, cfg.output_dir / "curves.png")
        plot_accuracy(results, k, cfg.output_dir / "accuracy.png")
        print(table)
    process_state().wait_for_everyone()
    return results


def greedy_predictions(cfg: ReproduceConfig, method: str) -> Path:
    return cfg.output_dir / "eval" / method / "greedy" / "predictions.jsonl"


def stage_seconds(directory: Path) -> float | None:
    path = directory / STAGE_FILE
    return json.loads(path.read_text())["seconds"] if path.exists() else None
