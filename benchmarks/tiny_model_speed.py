"""Training throughput of two tiny Llama sizes, measured side by side in one run.

    python benchmarks/tiny_model_speed.py [--doc docs/reports/tiny-model-speed.md]

Forward + backward + AdamW step on 32 x 60-token batches (the demo's sequence length),
alternating the two models so both see the same machine load; reports the median step time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from reftkit.data.prompts import prompt_text, response_text
from reftkit.data.synthetic import make_splits
from reftkit.modeling.tiny import build_model, build_tokenizer

SIZES = {"demo model (width 128, 4 layers)": (128, 4), "smaller (width 96, 3 layers)": (96, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", type=Path, default=Path("docs/reports/tiny-model-speed.md"))
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    train, _ = make_splits(200, 10, seed=0)
    tok = build_tokenizer(prompt_text(e) + response_text(e) for e in train)
    x = torch.randint(3, len(tok), (32, 60))
    setups = {}
    for name, (width, layers) in SIZES.items():
        model = build_model(tok, hidden_size=width, num_layers=layers)
        setups[name] = (model, torch.optim.AdamW(model.parameters(), 1e-3), [])
    for round_ in range(args.rounds + 1):
        for model, opt, times in setups.values():
            start = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            if round_:  # round 0 warms up
                times.append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, (_, _, t) in setups.items()}
    base = medians[next(iter(SIZES))]
    lines = ["# Tiny model training speed", "",
             "Command: `python benchmarks/tiny_model_speed.py`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads  ", f"Date: {datetime.date.today().isoformat()}", "",
             "| model | parameters | median s / step (32 x 60 tokens) | examples / s | speed vs demo model |",
             "|---|---|---|---|---|"]
    for name, (model, _, _) in setups.items():
        params = sum(p.numel() for p in model.parameters())
        lines.append(f"| {name} | {params:,} | {medians[name]:.3f} | {32 / medians[name]:.0f} | "
                     f"{base / medians[name]:.2f}x |")
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text("\n".join(lines) + "\n")
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
