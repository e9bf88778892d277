"""The ReFT/PPO maths as pure functions on tensors: no model, no I/O.

Shapes: B = sequences in the batch, T = response tokens (right-padded).
`mask` [B, T] is 1.0 on real response tokens (including the EOS token) and 0.0 on padding.
Every function here maps to a line of the paper's objective (Luong et al. 2024, Sec. 3):

    r_t   = score * [t == last] - beta * (log pi_old(a_t|s_t) - log pi_ref(a_t|s_t))
    A_t   = GAE(gamma, lambda) over r_t and V(s_t), whitened over the whole batch
    L_pi  = -min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t)
    L_V   = 1/2 * max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)
    L     = L_pi + c_V * L_V        (each averaged over tokens per sequence, then over sequences)

The critic-free family on the same path (k samples per question, outcome scores r_1..r_k):

    GRPO      A_i = (r_i - mean(r)) / (std(r) + eps) on every token of y_i; per-sequence token mean
    Dr. GRPO  A_i = r_i - mean(r); token losses summed and divided by a constant (max response length)
    RLOO      A_i = r_i - mean of the other k - 1 rewards
    KL        in the reward (k1, the paper) or in the loss (GRPO's k3: exp(ref - logp) - (ref - logp) - 1)
    SFT term  L = (1 - mu) * L_RL + mu * L_SFT(reference CoT)        (CHORD's global coefficient)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from reftkit.rl.methods import ESTIMATORS

# Sums a tensor over all processes (e.g. `accelerator.reduce(t, "sum")`); identity on one process.
AllReduceSum = Callable[[torch.Tensor], torch.Tensor]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row [B]: the EOS, or the last token when truncated."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, torch.zeros_like(positions)).max(dim=1).values


def kl_penalized_rewards(
    scores: torch.Tensor,  # [B] outcome reward of each sequence
    logprobs: torch.Tensor,  # [B, T] log pi_old of the sampled tokens
    ref_logprobs: torch.Tensor,  # [B, T] log pi_ref of the same tokens
    mask: torch.Tensor,  # [B, T]
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, T]: -beta * KL estimate everywhere, plus the score on the last token.

    Returns (rewards, kl) where kl [B, T] = log pi_old - log pi_ref on real tokens (0 on padding).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae_advantages(
    rewards: torch.Tensor,  # [B, T]
    values: torch.Tensor,  # [B, T] V(s_t) from the rollout (old) value head
    mask: torch.Tensor,  # [B, T]
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. Returns (advantages, returns), both [B, T].

    The value after the last real token is 0 (the episode ends at EOS). Padding is masked out
    so a right-padded row behaves exactly like the same row without padding.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, advantages + values


def masked_mean(x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduceSum | None = None) -> torch.Tensor:
    """Mean of x over real tokens, across all processes when all_reduce is given."""
    total = torch.stack([(x * mask).sum(), mask.sum()])
    if all_reduce is not None:
        total = all_reduce(total)
    return total[0] / total[1].clamp(min=1.0)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduceSum | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over real tokens of the whole (global) batch; padding stays 0."""
    mean = masked_mean(x, mask, all_reduce)
    var = masked_mean((x - mean) ** 2, mask, all_reduce)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over each sequence's real tokens, then over sequences (the paper's reduction)."""
    per_seq = (x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return per_seq.mean()


def constant_length_mean(x: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
    """Each sequence's token sum divided by one constant (Dr. GRPO), then averaged over sequences:
    a long response weighs no less per token than a short one."""
    return ((x * mask).sum(dim=1) / length).mean()


def reduce_tokens(x: torch.Tensor, mask: torch.Tensor, norm_length: int | None) -> torch.Tensor:
    """The loss reduction: per-sequence token mean (None, the paper and GRPO) or Dr. GRPO's constant."""
    return sequence_mean(x, mask) if norm_length is None else constant_length_mean(x, mask, norm_length)


def group_advantages(
    scores: torch.Tensor,  # [B] outcome reward per sequence; the k samples of a question are consecutive
    k: int,
    estimator: str,  # a critic-free entry of reftkit.rl.methods.ESTIMATORS: "grpo" | "drgrpo" | "rloo"
) -> torch.Tensor:
    """Critic-free advantages [B] from each question's group of k samples (the estimator's group function)."""
    method = ESTIMATORS.get(estimator)
    if method is None or method.group is None:
        raise ValueError(f"unknown group estimator {estimator!r}")
    if k < method.min_samples:
        raise ValueError(f"{estimator} needs at least {method.min_samples} samples per question")
    return method.group(scores.float().view(-1, k)).reshape(-1)


def uniform_groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B / k] bool: groups whose k scores are all equal (zero advantage everywhere: DAPO drops them)."""
    groups = scores.view(-1, k)
    return (groups == groups[:, :1]).all(dim=1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """GRPO's per-token KL estimate exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased for KL(pi||ref))."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def policy_loss(
    logprobs: torch.Tensor,  # [B, T] log pi_theta (with grad)
    old_logprobs: torch.Tensor,  # [B, T] log pi_old from the rollout
    advantages: torch.Tensor,  # [B, T]
    mask: torch.Tensor,
    clip_range: float,
    norm_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss. Returns (loss, fraction of tokens where the clip was active)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = reduce_tokens(torch.maximum(unclipped, clipped), mask, norm_length)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def value_loss(
    values: torch.Tensor,  # [B, T] V_theta (with grad)
    old_values: torch.Tensor,  # [B, T] V_old from the rollout
    returns: torch.Tensor,  # [B, T]
    mask: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """0.5 * max(unclipped, clipped) squared error, as in the paper's code."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    error = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * sequence_mean(error, mask)


def ppo_objective(
    logprobs: torch.Tensor,  # [B, T] log pi_theta (with grad)
    values: torch.Tensor | None,  # [B, T] V_theta (with grad); None without a critic
    old_logprobs: torch.Tensor,  # [B, T] from the rollout
    old_values: torch.Tensor | None,  # [B, T] from the rollout
    advantages: torch.Tensor,  # [B, T]
    returns: torch.Tensor | None,  # [B, T]
    mask: torch.Tensor,
    clip_range: float,
    value_clip_range: float,
    vf_coef: float,
    *,
    ref_logprobs: torch.Tensor | None = None,  # [B, T]: the k3 KL term goes into the loss
    kl_coef: float = 0.0,
    norm_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss one PPO minibatch minimises: L = L_pi + c_V * L_V (clipped surrogate plus the
    clipped value loss, each averaged per sequence then over the batch) + beta * k3 KL when the KL
    sits in the loss. Without a critic (values None) there is no L_V. Returns (L, its terms)."""
    pg_loss, clip_frac = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range, norm_length)
    loss, terms = pg_loss, {"policy_loss": pg_loss, "clip_frac": clip_frac}
    if values is not None:
        terms["value_loss"] = value_loss(values, old_values, returns, mask, value_clip_range)
        loss = loss + vf_coef * terms["value_loss"]
    if ref_logprobs is not None:
        terms["kl_loss"] = reduce_tokens(k3_kl(logprobs, ref_logprobs), mask, norm_length)
        loss = loss + kl_coef * terms["kl_loss"]
    return loss, terms
