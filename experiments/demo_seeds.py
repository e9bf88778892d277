"""Runs `reftkit demo` for several seeds and writes the mean and spread to docs/demo-results*.md.

    python experiments/demo_seeds.py --seeds 1 2 3 [--cot program] [--output_dir runs/demo-seeds]

Each seed is one full demo (data, tokenizer, model, warm-up, SFT, ReFT); a seed whose
results.json holds the same config is not run again, so an interrupted sweep can be resumed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
from pathlib import Path

from reftkit.commands.demo import run_demo
from reftkit.config import DemoConfig


def machine() -> str:
    import torch

    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}, Python {platform.python_version()}")


def summarize(per_seed: dict[int, dict], cfg: DemoConfig, command: str) -> str:
    stages = list(next(iter(per_seed.values())))
    lines = [
        "# Demo: SFT vs ReFT on synthetic word problems (tiny Llama, CPU)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Precision: `--bf16 {cfg.bf16}` (auto: bf16 where the CPU has bf16 matrix units)  ",
        f"Date: {datetime.date.today().isoformat()}",
        "",
        f"Data: {cfg.n_train} training / {cfg.n_test} test synthetic problems per seed (`reftkit.data.synthetic`,"
        " disjoint questions). Test accuracy is greedy top-1. The settings were explored on seed 0 only"
        " (docs/demo.md); these seeds draw fresh data, test questions, initialisations and samples.",
        "",
        "| stage | " + " | ".join(f"seed {s}" for s in per_seed) + " | mean | spread (max - min) | std |",
        "|---|" + "---|" * (len(per_seed) + 3),
    ]
    for stage in stages:
        accs = [per_seed[s][stage]["test_accuracy"] for s in per_seed]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {stage} | " + " | ".join(f"{a:.1%}" for a in accs)
                     + f" | **{statistics.mean(accs):.1%}** | {max(accs) - min(accs):.1%} | {std:.1%} |")
    gains = [per_seed[s]["ReFT"]["test_accuracy"] - per_seed[s]["SFT (continued)"]["test_accuracy"] for s in per_seed]
    lines += [
        "",
        "ReFT minus SFT (continued), per seed: " + ", ".join(f"{g:+.1%}" for g in gains)
        + f"; mean {statistics.mean(gains):+.1%}.",
        "",
        "Training seconds per stage (mean over seeds): " + ", ".join(
            f"{st} {statistics.mean(per_seed[s][st]['train_seconds'] for s in per_seed):.0f} s" for st in stages) + ".",
        "",
        "Which annotator's style the model writes under greedy decoding, and how often each is right",
        "(all seeds pooled; read from each stage's `test/predictions.jsonl`):",
        "",
        "| stage | step-by-step: share of outputs | step-by-step: accuracy | skips steps: accuracy |",
        "|---|---|---|---|",
    ]
    for stage in stages:
        rows = [r for s in per_seed for r in predictions(per_seed[s][stage])]
        step = [r for r in rows if is_stepwise(r["output"], cfg.cot)]
        skip = [r for r in rows if not is_stepwise(r["output"], cfg.cot)]
        lines.append(f"| {stage} | {len(step) / len(rows):.1%} | {accuracy(step)} | {accuracy(skip)} |")
    return "\n".join(lines) + "\n"


def predictions(stage: dict) -> list[dict]:
    path = Path(stage["model"]).parent / "test" / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def is_stepwise(output: str, cot: str) -> bool:
    """Step-by-step annotator: an equation per event (N-CoT) or a line of code per event (P-CoT)."""
    if cot == "program":
        return len(re.findall(r"^\s+(\w+) = \1 [-+*] \d+$", output, re.MULTILINE)) >= 2
    return output.count(" = ") >= 2


def accuracy(rows: list[dict]) -> str:
    return f"{sum(r['correct'] for r in rows) / len(rows):.1%} (n={len(rows)})" if rows else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_dir", type=Path, default=Path("runs/demo-seeds"))
    parser.add_argument("--cot", choices=["natural", "program"], default="natural")
    parser.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--doc", type=Path, help="default: docs/demo-results[-program].md")
    args = parser.parse_args(argv)
    doc = args.doc or Path("docs/reports") / ("demo-results-natural.md" if args.cot == "natural"
                                              else "demo-results-program.md")
    per_seed: dict[int, dict] = {}
    for seed in args.seeds:
        cfg = DemoConfig(seed=seed, cot=args.cot, output_dir=args.output_dir / f"seed{seed}", progress=False,
                         bf16=args.bf16)
        per_seed[seed] = cached(cfg) or run_demo(cfg)
    command = "python experiments/demo_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(summarize(per_seed, DemoConfig(cot=args.cot, bf16=args.bf16), command.strip()))
    print(doc.read_text())


def cached(cfg: DemoConfig) -> dict | None:
    """A finished seed's results, if it ran with exactly this config (stale runs are redone)."""
    done = cfg.output_dir / "results.json"
    if not done.exists():
        return None
    saved = json.loads(done.read_text())
    return saved["results"] if saved["config"] == cfg.model_dump(mode="json") else None


if __name__ == "__main__":
    main()
