"""Picks the demo reranker's settings on training data only: train on the samples of the first
questions of a `train_samples` stage, report rerank@k on the samples of the rest.

    python experiments/reranker_dev.py runs/reproduce-demo0 --settings 1e-3:2 3e-4:4 1e-4:4

RUN is a `reftkit reproduce --demo` directory (its warmup/ and train_samples/ are used).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from reftkit.commands.sample import read_samples, summarize
from reftkit.config import DEMO_LENGTHS, RerankerConfig
from reftkit.data.readers import load_examples
from reftkit.grading.reward_model import score_samples
from reftkit.trainers.reranker import train_reranker
from reftkit.training.device import make_accelerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--held_out", type=int, default=200, help="questions (the last ones) kept for validation")
    parser.add_argument("--settings", nargs="+", default=["1e-3:2"], help="lr:epochs pairs")
    args = parser.parse_args()
    train = load_examples(str(args.run / "data" / "train.jsonl"), "reft").examples
    rows = read_samples(args.run / "train_samples" / "samples.jsonl", train)
    questions = sorted({r["index"] for r in rows})
    fit_q = set(questions[: -args.held_out])
    fit_rows = [r for r in rows if r["index"] in fit_q]
    val_rows = [r for r in rows if r["index"] not in fit_q]
    samples = args.run / "reranker_dev_samples.jsonl"
    samples.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "index"}) + "\n" for r in fit_rows))
    val = sorted({r["index"] for r in val_rows})
    val_examples = [train[i] for i in val]
    remap = {i: n for n, i in enumerate(val)}
    val_rows = [r | {"index": remap[r["index"]]} for r in val_rows]
    for setting in args.settings:
        lr, epochs = setting.split(":")
        cfg = RerankerConfig(model=str(args.run / "warmup" / "final"), samples_file=str(samples), lr=float(lr),
                             epochs=int(epochs), batch_size=32, warmup_ratio=0.05, progress=False,
                             output_dir=args.run / f"reranker_dev_{setting.replace(':', '_')}", **DEMO_LENGTHS)
        start = time.time()
        final = train_reranker(cfg, train)
        scores = score_samples(make_accelerator(cfg), str(final), val_examples, val_rows, cfg)
        s = summarize([r | {"score": x} for r, x in zip(val_rows, scores, strict=True)], val_examples)
        print(f"lr {lr} epochs {epochs}: rerank@{s['k']} {s['rerank_accuracy']:.3f}  vote {s['vote_accuracy']:.3f}  "
              f"sample {s['sample_accuracy']:.3f}  ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
