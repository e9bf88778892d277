"""The RL methods on ReFT's loop, each described once.

An advantage estimator is one `Estimator` entry: how it turns outcome scores into advantages, whether
it needs the value head, how the loss reduces a sequence's tokens and its display name. The config's
`--advantage` choices and help, `reftkit reproduce`'s method sections and display names, and the
method table of docs/methods.md all come from `ESTIMATORS` and `RL_METHODS`. Adding an estimator is
one entry here plus its hand-computed test in tests/test_ppo.py.

No torch import: the config reads this module, and `reftkit --help` stays free of torch. The group
functions use tensor methods only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

GroupAdvantage = Callable[["torch.Tensor"], "torch.Tensor"]  # scores [questions, k] -> advantages [questions, k]
LossMode = Literal["sequence_mean", "constant_length"]
# How a loss over [B, T] tokens becomes one number (rl.ppo.reduce_tokens), for the docs' table.
LOSS_MODES: dict[str, str] = {
    "sequence_mean": "token mean per sequence, then over sequences",
    "constant_length": "each sequence's token sum / (max_length - max_prompt_tokens), then over sequences",
}
GROUP_EPS = 1e-6  # GRPO's std guard


def grpo(groups: torch.Tensor) -> torch.Tensor:
    """(r_i - mean) / (std + eps), std the unbiased sample std of the group (DeepSeekMath's code)."""
    return (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + GROUP_EPS)


def drgrpo(groups: torch.Tensor) -> torch.Tensor:
    """r_i - mean: Dr. GRPO drops the std division (and the length normalisation, see its loss mode)."""
    return groups - groups.mean(dim=1, keepdim=True)


def rloo(groups: torch.Tensor) -> torch.Tensor:
    """r_i - mean of the other k - 1 scores = k / (k - 1) * (r_i - mean)."""
    k = groups.shape[1]
    return (groups - groups.mean(dim=1, keepdim=True)) * k / (k - 1)


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: the value of `--advantage`."""

    name: str
    display: str  # in results tables and plots
    advantage: str  # what every token of y_i gets, for the help text and the docs
    group: GroupAdvantage | None = None  # critic-free: from each question's k scores; None: GAE with the value head
    loss: LossMode = "sequence_mean"
    min_samples: int = 1  # a group of one sample has no baseline

    @property
    def critic(self) -> bool:
        return self.group is None


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("gae", "ReFT", "GAE(gamma=1, lambda=0.95) over per-token rewards and V(s_t), whitened over the "
              "global batch"),
    Estimator("grpo", "GRPO", "(r_i - mean(r)) / (std(r) + 1e-6), std the unbiased sample std of the k scores",
              grpo, min_samples=2),
    Estimator("drgrpo", "Dr. GRPO", "r_i - mean(r)", drgrpo, loss="constant_length", min_samples=2),
    Estimator("rloo", "RLOO", "r_i - mean of the other k - 1 scores", rloo, min_samples=2),
)}


@dataclass(frozen=True)
class Method:
    """A `reftkit reproduce` method of the RL family: a `reftkit reft` run over ReFT's budget (its `reft`
    section, less the critic's options when the estimator has no critic) plus `options`."""

    name: str
    display: str
    options: dict[str, Any] = field(default_factory=dict)
    summary: str = ""  # the reproduce section's help

    @property
    def estimator(self) -> Estimator:
        return ESTIMATORS[self.options.get("advantage", "gae")]


# reft_sft is ReFT + CHORD's SFT term: mu = 0.1, decayed linearly to 0 (a small pull towards the
# references that fades, so the end of training is pure RL as in CHORD's schedule).
RL_METHODS: dict[str, Method] = {m.name: m for m in (
    *(Method(e.name, e.display, {"advantage": e.name}, f"advantage: {e.name}")
      for e in ESTIMATORS.values() if e.name != "gae"),
    Method("reft_sft", "ReFT + SFT term", {"sft_coef": 0.1, "sft_coef_schedule": "linear"},
           "sft_coef 0.1 decayed linearly"),
)}


def advantage_help() -> str:
    """`--advantage`'s help, from the registry."""
    parts = [f"{e.name} = {e.advantage}" + ("" if e.critic else " (no critic)")
             + ("" if e.loss == "sequence_mean" else f", loss: {LOSS_MODES[e.loss]}") for e in ESTIMATORS.values()]
    return "advantage estimator: " + "; ".join(parts) + ". Estimators without a critic need num_samples >= 2"


def methods_table() -> str:
    """The estimator table of docs/methods.md (a test keeps the doc equal to it)."""
    rows = ["| `--advantage` | advantage of every token of y_i | loss reduction | critic |", "|---|---|---|---|"]
    for e in ESTIMATORS.values():
        name = f"`{e.name}`" + (" (the paper, default)" if e.name == "gae" else "")
        critic = "value head, loss coefficient 5" if e.critic else "none"
        rows.append(f"| {name} | {e.advantage} | {LOSS_MODES[e.loss]} | {critic} |")
    return "\n".join(rows)
