"""The RL family on the demo: `reftkit reproduce --demo` with every method, for several seeds, then
one table of the mean and spread per method and a paired test of each against ReFT.

    python experiments/methods_demo.py --seeds 1 2 3 [--output_dir runs/methods-demo] [--run_only]

Each seed is one `reproduce --demo` run (resumable: a finished seed is read back, not rerun). With
--run_only the script runs the given seeds and writes nothing to docs/, so seeds can run in
separate processes; a final call without it (same seeds) writes docs/reports/methods-demo.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

from reftkit.commands.report import mcnemar_p, paired_counts, read_metrics, read_predictions
from reftkit.commands.reproduce import METHOD_NAMES, run_reproduce
from reftkit.config import ReproduceConfig
from reftkit.rl.methods import RL_METHODS

METHODS = ["sft", "offline_st", "online_st", "reft", *RL_METHODS]
READ_OUTS = {"top1": "top-1", "vote": "vote@k", "pass": "pass@k"}


def machine() -> str:
    import torch

    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}, Python {platform.python_version()}")


def run_seed(seed: int, out: Path) -> dict:
    cfg = ReproduceConfig(demo=True, seed=seed, output_dir=out / f"seed{seed}", methods=METHODS, progress=False)
    return run_reproduce(cfg)


def mean_spread(values: list[float], percent: bool = True) -> str:
    fmt = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:,.0f}")
    return f"{fmt(statistics.mean(values))} ({fmt(min(values))}-{fmt(max(values))})"


def mean_of(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{statistics.mean(values):.3f}" if values else "-"


def pooled_vs_reft(out: Path, seeds: list[int], method: str) -> tuple[int, int, float]:
    """Greedy answers of `method` against ReFT's on every seed's test questions, pooled."""
    only_it = only_reft = 0
    for seed in seeds:
        greedy = out / f"seed{seed}" / "eval"
        paired = paired_counts(read_predictions(greedy / method / "greedy" / "predictions.jsonl"),
                               read_predictions(greedy / "reft" / "greedy" / "predictions.jsonl"))
        only_it, only_reft = only_it + paired.only_a_right, only_reft + paired.only_b_right
    return only_it, only_reft, mcnemar_p(only_it, only_reft)


def summary(out: Path, per_seed: dict[int, dict], command: str) -> str:
    seeds = list(per_seed)
    k = next(iter(per_seed[seeds[0]].values()))["k"]
    lines = [
        "# The RL family on the demo: ReFT's PPO beside GRPO, Dr. GRPO, RLOO and an SFT term",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {datetime.date.today().isoformat()}",
        "",
        f"Each seed is one `reftkit reproduce --demo` run with every method (synthetic data, tiny Llama, "
        f"seeds {', '.join(map(str, seeds))}); every method starts from that seed's warm-up and the RL "
        f"methods sample the same sequences per question and batch (ReFT's budget). Accuracy on the "
        f"seed's 500 test questions in %, mean over seeds with (min-max); k = {k}. Train time and "
        "tokens are per seed, mean (min-max).",
        "",
        "| method | " + " | ".join(h.replace("k", str(k)) if h != "top-1" else h for h in READ_OUTS.values())
        + " | train time (s) | sampled tokens | vs ReFT, all seeds: only it / only ReFT right, McNemar p |",
        "|---" * (len(READ_OUTS) + 4) + "|",
    ]
    for method in ["warmup", *METHODS]:
        name = METHOD_NAMES[method]
        rows = [per_seed[s][name] for s in seeds]
        cells = [mean_spread([r[key] for r in rows]) for key in READ_OUTS]
        seconds = [r["train_seconds"] for r in rows if r.get("train_seconds") is not None]
        cells.append(mean_spread(seconds, percent=False) if seconds else "-")
        tokens = [r["sampled_tokens"] for r in rows if r.get("sampled_tokens") is not None]
        cells.append(mean_spread(tokens, percent=False) if tokens else "-")
        if method == "reft":
            cells.append("-")
        else:
            a, b, p = pooled_vs_reft(out, seeds, method)
            cells.append(f"{a} / {b}, p = {p:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", (
        "How each RL method trained (mean over seeds of its last 10 rollout batches; "
        "`reftkit.commands.report.read_metrics`):"
    ),
              "", (
                  "| method | train accuracy of samples | reward | KL to the warm-up | response tokens |"
              ), "|---|---|---|---|---|"]
    for method in ["online_st", "reft", *RL_METHODS]:
        rows = [r for s in seeds for r in [r for r in read_metrics(out / f"seed{s}" / method / "metrics.jsonl")
                                           if "train_accuracy" in r][-10:]]
        lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(
            mean_of(rows, key) for key in ("train_accuracy", "reward", "kl", "response_tokens")) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--output_dir", type=Path, default=Path("runs/methods-demo"))
    parser.add_argument("--run_only", action="store_true", help="run the seeds; write no docs")
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "methods-demo.md")
    args = parser.parse_args(argv)
    per_seed = {seed: run_seed(seed, args.output_dir) for seed in args.seeds}
    if args.run_only:
        return
    command = "python experiments/methods_demo.py --seeds " + " ".join(map(str, args.seeds))
    text = summary(args.output_dir, per_seed, command)
    args.doc.write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
