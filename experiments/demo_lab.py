"""The seed-0 runs of docs/demo.md's lab log (H3-H5) on the current task, one stage per call.

    python experiments/demo_lab.py warmup --out runs/lab/w0                       # H3
    python experiments/demo_lab.py reft --warm runs/lab/w0/warmup/final --out runs/lab/r0 --eval_every 25  # H4
    python experiments/demo_lab.py sft --warm runs/lab/w0/warmup/final --out runs/lab/s0 --sft_epochs 6     # H5

Each prints one JSON line: greedy accuracy on seed 0's first 300 test questions, and the share and
accuracy of step-by-step outputs (the demo's per-style diagnostic).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from reftkit.commands.evaluate import run_eval
from reftkit.config import DEMO_LENGTHS as LENGTHS
from reftkit.config import EvalConfig, ReFTConfig, SFTConfig
from reftkit.data.synthetic import make_splits
from reftkit.trainers.reft import train_reft
from reftkit.trainers.sft import train_sft

sys.path.insert(0, str(Path(__file__).parent))
from demo_seeds import is_stepwise  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["warmup", "reft", "sft"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--warm", help="warm-up checkpoint (reft, sft)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_train", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=6, help="warm-up epochs")
    parser.add_argument("--sft_epochs", type=int, default=1, help="continued-SFT epochs")
    parser.add_argument("--lr", type=float, default=5e-5, help="ReFT learning rate")
    parser.add_argument("--reft_epochs", type=int, default=4)
    parser.add_argument("--questions", type=int, default=800)
    parser.add_argument("--eval_every", type=int, default=0)
    args = parser.parse_args()

    train, test = make_splits(args.n_train, 300, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    test_file = args.out / "test.jsonl"
    test_file.write_text("".join(json.dumps({"item_id": e.id, "question": e.question, "answer_cot": e.cot,
                                             "answer_value": e.answer}) + "\n" for e in test))
    common = {**LENGTHS, "seed": args.seed, "progress": False}
    start = time.time()
    if args.stage == "warmup":
        final = train_sft(SFTConfig(model="tiny", output_dir=args.out / "warmup", epochs=args.epochs, lr=3e-3,
                                    batch_size=32, warmup_ratio=0.05, eval_every_epoch=False, **common), train)
    elif args.stage == "sft":
        final = train_sft(SFTConfig(model=args.warm, output_dir=args.out / "sft", epochs=args.sft_epochs, lr=3e-4,
                                    batch_size=32, eval_every_epoch=False, **common), train)
    else:
        cfg = ReFTConfig(model=args.warm, output_dir=args.out / "reft", epochs=args.reft_epochs, lr=args.lr,
                         value_head_lr=1e-3, batch_size=32, num_samples=4, mini_batch_size=64,
                         eval_every=args.eval_every, **common)
        final = train_reft(cfg, train[: args.questions], test if args.eval_every else None)
    seconds = time.time() - start
    acc = run_eval(EvalConfig(model=str(final), eval_file=str(test_file), data_format="reft",
                              output_dir=args.out / "test", progress=False, **LENGTHS))
    rows = [json.loads(line) for line in (args.out / "test" / "predictions.jsonl").read_text().splitlines()]
    step = [r for r in rows if is_stepwise(r["output"], "natural")]
    print(json.dumps({"stage": args.stage, "accuracy": acc, "train_seconds": round(seconds),
                      "stepwise_share": len(step) / len(rows),
                      "stepwise_accuracy": sum(r["correct"] for r in step) / max(len(step), 1)}))


if __name__ == "__main__":
    main()
