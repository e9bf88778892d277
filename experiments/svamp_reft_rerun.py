"""Rerun one ReFT stage of an svamp_smollm2.py run with some settings changed, and score it on the same
dev questions: a diagnostic for the questions the write-up raises (docs/svamp-smollm2.md), not a
search for settings (the dev split would then no longer be held out).

    python experiments/svamp_reft_rerun.py --run_dir /work/svamp-run --cot program --set lr=3e-6

Reads <run_dir>/<cot>/reft/final/trainer_state.json (the stage's full config), applies `--set`,
trains from the same warm-up into <run_dir>/<cot>/rerun-<settings>/ (resumable: a finished rerun is
only re-scored) and prints one JSON line: the settings, accuracy, questions without an answer, training and eval
seconds, and paired counts with an exact McNemar p against the run's ReFT, SFT and warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def value(text: str):
    """`3e-6` -> 3e-06 (YAML 1.1 reads it as a string), `true` -> True, `8` -> 8."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", type=Path, required=True)
    parser.add_argument("--cot", choices=["natural", "program"], required=True)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="ReFT config fields to change")
    parser.add_argument("--eval_batch_size", type=int, default=50)
    args = parser.parse_args()

    from reftkit.config import ReFTConfig
    from reftkit.reproduce import resumable_training, stage_seconds
    from reftkit.trainers.reft import train_reft

    from svamp_smollm2 import compare, eval_dir, no_answer, timed_eval

    root = args.run_dir / args.cot
    state = json.loads((root / "reft" / "final" / "trainer_state.json").read_text())["config"]
    if any("=" not in item for item in args.set):
        parser.error("--set takes KEY=VALUE items, e.g. lr=3e-6")
    changes = {key: value(text) for key, text in (item.split("=", 1) for item in args.set)}
    unknown = set(changes) - set(state)
    if unknown:
        parser.error(f"not ReFT config fields: {sorted(unknown)}")
    name = "rerun-" + "-".join(sorted(item.replace("=", "") for item in args.set))  # as typed: stable
    cfg = ReFTConfig(**{**state, **changes, "output_dir": root / name})
    final = resumable_training(f"{args.cot}/{name}", cfg, train_reft)
    dev = {key: state[key] for key in ("cot", "data_format", "train_file", "seed", "exec_workers",
                                        "max_prompt_tokens", "max_length")}
    scored = eval_dir(args.run_dir, args.cot, name)
    result = timed_eval(scored, model=str(final), eval_file=str(root / "data" / "dev.jsonl"),
                        eval_batch_size=args.eval_batch_size, progress=False, **dev)
    paired = {stage: compare(scored, eval_dir(args.run_dir, args.cot, stage)) for stage in ("reft", "sft", "warmup")}
    vs = {stage: {"only_rerun_right": c.only_a_right, "only_other_right": c.only_b_right, "both_right": c.both_right,
                  "mcnemar_p": c.mcnemar_p} for stage, c in paired.items()}
    print(json.dumps({"settings": changes, **result, "no_answer": no_answer(scored),
                      "train_seconds": stage_seconds(root / name), "vs": vs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
