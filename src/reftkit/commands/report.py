"""The results table and plots of `reftkit reproduce`, from files the stages wrote."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

STRATEGIES = {"top1": "top-1 (greedy)", "vote": "vote@{k}", "rerank": "rerank@{k}", "pass": "pass@{k}"}
CURVES = {"loss": "training loss", "reward": "reward (ReFT)", "train_accuracy": "accuracy of training samples",
          "kl": "KL to the warm-up (ReFT)"}


def results_table(results: dict[str, dict], k: int) -> str:
    """Markdown: one row per method, accuracy per inference strategy, training time, tokens the
    method sampled in training, and (when given) its greedy answers paired against ReFT's."""
    heads = [h.format(k=k) for h in STRATEGIES.values()]
    extra = ["train time (s)", "sampled tokens", "vs ReFT: only it / only ReFT right, McNemar p"]
    lines = ["| method | " + " | ".join(heads + extra) + " |", "|---" * (len(heads) + len(extra) + 1) + "|"]
    for method, r in results.items():
        cells = [f"{r[s]:.1%}" if r.get(s) is not None else "-" for s in STRATEGIES]
        cells.append(f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "-")
        cells.append(f"{r['sampled_tokens']:,}" if r.get("sampled_tokens") is not None else "-")
        paired = r.get("vs_reft")  # as results.json stores it: Paired's fields by name
        cells.append(Paired(**paired).cell() if paired else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: under "no difference" each discordant question is a fair coin."""
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def read_predictions(path: Path) -> dict[str, dict]:
    """predictions.jsonl rows by question id."""
    with open(path) as f:
        return {row["id"]: row for row in map(json.loads, f)}


@dataclass(frozen=True)
class Paired:
    """Two models' answers to the same questions, compared question by question. A named record, not a
    tuple: the table and results.json read each number by its name (results.json: `asdict`)."""

    only_a_right: int
    only_b_right: int
    both_right: int
    mcnemar_p: float

    def cell(self) -> str:
        """The table's "only it / only ReFT right, McNemar p" cell (a is the row's method, b is ReFT)."""
        return f"{self.only_a_right} / {self.only_b_right}, p = {self.mcnemar_p:.2f}"


def paired_counts(a: dict[str, dict], b: dict[str, dict]) -> Paired:
    """Right answers of a and b paired over the same questions, with the exact McNemar p."""
    if a.keys() != b.keys():
        raise ValueError("paired comparison needs the same questions on both sides")
    only_a = sum(a[i]["correct"] and not b[i]["correct"] for i in a)
    only_b = sum(b[i]["correct"] and not a[i]["correct"] for i in a)
    both = sum(a[i]["correct"] and b[i]["correct"] for i in a)
    return Paired(only_a, only_b, both, mcnemar_p(only_a, only_b))


def sampled_tokens(run_dir: Path) -> int | None:
    """Response tokens an RL run sampled in training, all processes (the sum of its rollout
    batches' `sampled_tokens`); None for methods that log no rollouts."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "sampled_tokens" in r]
    return sum(r["sampled_tokens"] for r in rows) if rows else None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows; a step logged twice (a resumed stage redoes it) keeps its last value."""
    if not path.exists():
        return []
    by_step: dict[tuple[int, bool], dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_step[(row["step"], "eval_accuracy" in row)] = row
    return [by_step[key] for key in sorted(by_step)]


def plot_curves(runs: dict[str, Path], path: Path) -> None:
    """One panel per training metric; x is the fraction of each method's training done, since
    methods count steps differently (optimiser steps for SFT, rollout batches for ReFT)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for ax, (key, title) in zip(axes, CURVES.items(), strict=True):
        for method, run_dir in runs.items():
            rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if key in r]
            if rows:
                last = max(r["step"] for r in rows)
                ax.plot([r["step"] / last for r in rows], [r[key] for r in rows], label=method, linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fraction of training")
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(results: dict[str, dict], k: int, path: Path) -> None:
    """Grouped bars: test accuracy per method and inference strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    width = 0.8 / len(STRATEGIES)
    fig, ax = plt.subplots(figsize=(1.6 * len(methods) + 2, 3.6))
    for n, (key, label) in enumerate(STRATEGIES.items()):
        values = [100 * (results[m].get(key) or 0.0) for m in methods]
        ax.bar([i + (n - (len(STRATEGIES) - 1) / 2) * width for i in range(len(methods))], values, width,
               label=label.format(k=k))
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncols=len(STRATEGIES), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
