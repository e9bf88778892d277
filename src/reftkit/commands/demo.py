"""`reftkit demo`: the whole pipeline offline on CPU, on synthetic problems with a tiny model.

warm-up SFT -> (a) SFT continued on all training data for more epochs, (b) ReFT from the same
warm-up over the first training questions (a subset of the same questions: ReFT's rollouts are
the expensive part); then greedy top-1 accuracy of each on a disjoint test set. The settings of
each stage are `reftkit.config.DEMO_STAGES`, changed by the demo config's stage sections.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from reftkit.config import DEMO_LENGTHS, DemoConfig
from reftkit.data.synthetic import make_splits
from reftkit.trainers.reft import train_reft
from reftkit.trainers.sft import train_sft
from reftkit.training.checkpoints import check_writable, on_main_process, previous_outputs
from reftkit.training.device import process_state
from reftkit.training.errors import RunError
from reftkit.training.rundir import owns_output_dir


@owns_output_dir
def run_demo(cfg: DemoConfig) -> dict:
    """Runs the three stages and prints (and returns) test accuracy and wall-clock per stage."""
    from reftkit.commands.evaluate import run_eval
    from reftkit.config import EvalConfig
    from reftkit.writers import write_examples

    out = Path(cfg.output_dir)

    def check() -> None:
        check_writable(out)
        if previous_outputs(out) and not cfg.overwrite_output_dir:
            raise RunError(f"output_dir {out} is not empty: rerun the demo with --overwrite_output_dir to replace "
                           "its runs, or choose another --output_dir")

    on_main_process(process_state().is_main_process, check)
    train, test = make_splits(cfg.n_train, cfg.n_test, cfg.seed, cfg.one_line_fraction, cfg.cot)
    stages = cfg.stage_configs()
    test_file = Path(cfg.output_dir) / "test.jsonl"
    if process_state().is_main_process:
        write_examples(test_file, test)
    process_state().wait_for_everyone()

    results: dict[str, dict] = {}
    runs = [("warm-up SFT", stages["warmup"], train_sft), ("SFT (continued)", stages["sft"], train_sft),
            ("ReFT", stages["reft"], train_reft)]
    for name, stage_cfg, train_fn in runs:
        start = time.time()
        final = train_fn(stage_cfg, train)
        seconds = time.time() - start
        acc = run_eval(EvalConfig(model=str(final), eval_file=str(test_file), data_format="reft", cot=cfg.cot,
                                  output_dir=stage_cfg.output_dir / "test", progress=False, **DEMO_LENGTHS))
        results[name] = {"test_accuracy": acc, "train_seconds": round(seconds, 1), "model": str(final)}
    if process_state().is_main_process:
        (Path(cfg.output_dir) / "results.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"),
                                                                       "results": results}, indent=2))
        print(format_table(results, cfg))
    return results


def format_table(results: dict[str, dict], cfg: DemoConfig) -> str:
    lines = [(
        f"reftkit demo ({cfg.cot} CoT, seed {cfg.seed}, {cfg.n_train} train / {cfg.n_test} test synthetic problems)"
    ),
             "", "| stage | test accuracy (greedy) | train time (s) |", "|---|---|---|"]
    lines += [f"| {name} | {r['test_accuracy']:.1%} | {r['train_seconds']:.0f} |" for name, r in results.items()]
    return "\n".join(lines)
