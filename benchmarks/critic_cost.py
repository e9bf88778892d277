"""What the critic costs per ReFT step: one rollout batch + its PPO update with the paper's GAE
(value head, value loss) against GRPO (no critic), measured side by side in one run.

    python benchmarks/critic_cost.py [--rounds 7] [--doc docs/critic-cost.md]

Each round starts both estimators from the same weights with the same sampling seed, so they
generate the same responses; the difference is the value head's work (hidden states kept, the
head's forward and backward, the value loss) and, for GRPO, the group advantages instead of GAE.
Rounds alternate the order (A B, B A, ...) so both see the same machine load; the median of the
per-round ratios is reported with the spread. The model is the demo's tiny Llama (random weights)
on the demo's lengths; 16 questions x 4 samples per rollout batch, 2 PPO epochs of 2 minibatches.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from reftkit.config import DEMO_LENGTHS, ReFTConfig
from reftkit.data.prompts import prompt_text, response_text
from reftkit.data.synthetic import make_splits
from reftkit.grading.answers import Grade
from reftkit.modeling.model import PolicyWithValueHead
from reftkit.modeling.tiny import build_model, build_tokenizer
from reftkit.trainers.reft import make_rollout, ppo_update
from reftkit.training.device import make_accelerator
from reftkit.training.optim import make_optimizer


class EveryOtherCorrect:
    """A grader stand-in with varied rewards (a random model is never right): the update then has
    non-zero advantages to work on, as in training."""

    def grade(self, texts, examples):
        return [Grade(correct=i % 2 == 0, extracted="1") for i in range(len(texts))]


def one_step(cfg: ReFTConfig, lm, tokenizer, examples, seed: int) -> float:
    accelerator = make_accelerator(cfg)
    policy = PolicyWithValueHead(copy.deepcopy(lm), critic=cfg.critic)
    optimizer, scheduler = make_optimizer(policy.parameters(), cfg, 8)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    ref = copy.deepcopy(lm).eval().requires_grad_(False)
    torch.manual_seed(seed)
    start = time.perf_counter()
    batch, _ = make_rollout(accelerator, policy, ref, tokenizer, examples, cfg, EveryOtherCorrect())
    ppo_update(accelerator, policy, optimizer, scheduler, batch, cfg, torch.Generator().manual_seed(seed), 1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "critic-cost.md")
    args = parser.parse_args()
    train, _ = make_splits(200, 10, seed=0)
    tokenizer = build_tokenizer(prompt_text(e) + response_text(e) for e in train)
    lm = build_model(tokenizer, seed=0)
    common = dict(model="tiny", output_dir=Path("/tmp/critic-cost"), batch_size=16, num_samples=4,
                  mini_batch_size=32, progress=False, **DEMO_LENGTHS)
    setups = {"GAE (value head)": ReFTConfig(**common), "GRPO (no critic)": ReFTConfig(**common, advantage="grpo")}
    times: dict[str, list[float]] = {name: [] for name in setups}
    for round_ in range(args.rounds + 1):  # round 0 warms up and is not counted
        order = list(setups) if round_ % 2 == 0 else list(reversed(setups))
        for name in order:
            seconds = one_step(setups[name], lm, tokenizer, train[:16], seed=round_)
            if round_:
                times[name].append(seconds)
    gae, grpo = times["GAE (value head)"], times["GRPO (no critic)"]
    ratios = [a / b for a, b in zip(gae, grpo, strict=True)]
    import torch as _torch

    lines = [
        "# What the critic costs per ReFT step (tiny model, CPU)",
        "",
        "Command: `python benchmarks/critic_cost.py`  ",
        f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, torch {_torch.__version__}, "
        f"torch threads {_torch.get_num_threads()}  ",
        f"Date: {datetime.date.today().isoformat()}",
        "",
        __doc__.split("\n\n")[2].replace("\n", " "),
        "",
        "| estimator | median seconds per step | min | max |",
        "|---|---|---|---|",
        *(f"| {name} | {statistics.median(t):.3f} | {min(t):.3f} | {max(t):.3f} |" for name, t in times.items()),
        "",
        f"GAE / GRPO time per step, per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"median **{statistics.median(ratios):.2f}x** ({args.rounds} rounds).",
    ]
    args.doc.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
