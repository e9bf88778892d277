"""The results table and plots of `reftkit reproduce`, from files the stages wrote."""

from __future__ import annotations

import json
from pathlib import Path

STRATEGIES = {"top1": "top-1 (greedy)", "vote": "vote@{k}", "rerank": "rerank@{k}", "pass": "pass@{k}"}
CURVES = {"loss": "training loss", "reward": "reward (ReFT)", "train_accuracy": "accuracy of training samples",
          "kl": "KL to the warm-up (ReFT)"}


def results_table(results: dict[str, dict], k: int) -> str:
    """Markdown: one row per method, accuracy per inference strategy, and training time."""
    heads = [h.format(k=k) for h in STRATEGIES.values()]
    lines = ["| method | " + " | ".join(heads) + " | train time (s) |", "|---" * (len(heads) + 2) + "|"]
    for method, r in results.items():
        cells = [f"{r[s]:.1%}" if r.get(s) is not None else "-" for s in STRATEGIES]
        seconds = f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {seconds} |")
    return "\n".join(lines)


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
