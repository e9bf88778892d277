"""Does PPO improve what it optimises? Repeated rollouts + updates on ONE fixed batch of training questions.

    python experiments/ppo_fixed_batch.py --checkpoint runs/demo-seeds/seed1/warmup/final --seed 1 \
        [--rounds 12] [--lr 5e-5] [--doc docs/reports/ppo-fixed-batch.md]

Uses the demo's synthetic training questions for `--seed` (the ones the checkpoint was warmed up
on) and the trainer's own `make_rollout` / `ppo_update`. Reports sample accuracy per round, and
after the first update how the summed log-probability of positive- and negative-advantage samples
moved. Skips cleanly when the checkpoint is absent (run `experiments/demo_seeds.py` first).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

from reftkit.config import DEMO_LENGTHS as LENGTHS
from reftkit.config import DemoConfig, ReFTConfig
from reftkit.data.synthetic import make_splits
from reftkit.grading.answers import NaturalLanguageGrader
from reftkit.modeling.model import PolicyWithValueHead, load_causal_lm, load_tokenizer
from reftkit.trainers.reft import make_rollout, policy_outputs, ppo_update
from reftkit.training.device import make_accelerator
from reftkit.training.optim import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True, help="the demo seed whose training questions to use")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--doc", type=Path, default=Path("docs/reports/ppo-fixed-batch.md"))
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").exists():
        print(f"skipped: no checkpoint at {args.checkpoint}")
        return
    train, _ = make_splits(DemoConfig().n_train, DemoConfig().n_test, seed=args.seed)
    cfg = ReFTConfig(model=str(args.checkpoint), output_dir=Path("runs/ppo-fixed-batch"), batch_size=32, num_samples=4,
                     mini_batch_size=64, lr=args.lr, seed=args.seed, **LENGTHS)
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(cfg.model)
    policy, ref = PolicyWithValueHead(load_causal_lm(cfg.model)), load_causal_lm(cfg.model).eval()
    optimizer, scheduler = make_optimizer(policy.parameters(), cfg, args.rounds * 4)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    policy.eval()
    questions, grader, rows, moved = train[: cfg.batch_size], NaturalLanguageGrader(), [], None
    for round_ in range(args.rounds):
        batch, record = make_rollout(accelerator, policy, ref, tokenizer, questions, cfg, grader)
        if round_ == 0:
            with torch.no_grad():
                before, _ = policy_outputs(policy, batch.sequences, batch.attention_mask, batch.prompt_len, 1.0)
        ppo_update(accelerator, policy, optimizer, scheduler, batch, cfg, torch.Generator().manual_seed(round_))
        if round_ == 0:
            with torch.no_grad():
                after, _ = policy_outputs(policy, batch.sequences, batch.attention_mask, batch.prompt_len, 1.0)
            delta = ((after - before) * batch.mask).sum(1)
            seq_adv = (batch.advantages * batch.mask).sum(1)
            moved = (delta[seq_adv > 0].mean().item(), delta[seq_adv < 0].mean().item())
        rows.append(f"| {round_ + 1} | {record['train_accuracy']:.3f} | {record['kl']:.3f} |")
    command = "python experiments/ppo_fixed_batch.py " + " ".join(sys.argv[1:])
    lines = ["# PPO on one fixed batch of training questions", "",
             f"Command: `{command}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}  ",
             f"Date: {datetime.date.today().isoformat()}", "",
             f"32 training questions x 4 samples, lr {args.lr}, the paper's PPO settings otherwise. Accuracy is"
             " that of the round's samples (temperature 1), drawn before the round's update.", "",
             f"After the first update, summed log-probability of positive-advantage samples moved {moved[0]:+.2f},"
             f" of negative-advantage samples {moved[1]:+.2f}.", "",
             "| round | sample accuracy | KL to reference (per sequence) |", "|---|---|---|", *rows]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text("\n".join(lines) + "\n")
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
