"""The ReFT/PPO maths against small cases computed by hand."""

import math

import pytest
import torch

from reftkit.rl import ppo

T = torch.tensor


def test_last_token_index_finds_eos_or_truncation_point():
    mask = T([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert ppo.last_token_index(mask).tolist() == [2, 3, 0]


def test_kl_penalized_rewards_puts_score_on_last_real_token():
    scores = T([1.0, 0.1])
    logprobs = T([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]])
    ref_logprobs = T([[-1.5, -1.0, -0.5], [-2.0, -1.0, -1.0]])
    mask = T([[1.0, 1, 1], [1, 1, 0]])  # row 1 ended (EOS) at t=1; t=2 is padding
    rewards, kl = ppo.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # kl = logp - ref: row0 [0.5, -1, 0]; row1 [1, 0, (masked)]
    assert torch.allclose(kl, T([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    # r = -0.1 * kl, + score on the last real token
    assert torch.allclose(rewards, T([[-0.05, 0.1, 1.0], [-0.1, 0.1, 0.0]]))


def test_gae_hand_computed():
    rewards = T([[0.0, 0.0, 1.0]])
    values = T([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    adv, ret = ppo.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # deltas: t2 = 1 - 0.7 = 0.3; t1 = 0 + 0.7 - 0.6 = 0.1; t0 = 0 + 0.6 - 0.5 = 0.1
    a2 = 0.3
    a1 = 0.1 + 0.95 * a2
    a0 = 0.1 + 0.95 * a1
    assert torch.allclose(adv, T([[a0, a1, a2]]))
    assert torch.allclose(ret, adv + values)


def test_gae_discount_and_padding_is_inert():
    rewards = T([[0.0, 2.0, 0.0]])
    values = T([[1.0, 1.0, 5.0]])  # the value on the padded position must not leak in
    mask = T([[1.0, 1, 0]])
    adv, _ = ppo.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    a1 = 2.0 - 1.0  # terminal: no bootstrap from the padding
    a0 = (0.0 + 0.9 * 1.0 - 1.0) + 0.9 * 0.5 * a1
    assert torch.allclose(adv, T([[a0, a1, 0.0]]))
    unpadded, _ = ppo.gae_advantages(rewards[:, :2], values[:, :2], mask[:, :2], gamma=0.9, lam=0.5)
    assert torch.allclose(adv[:, :2], unpadded)


def test_masked_whiten_uses_only_real_tokens():
    x = T([[1.0, 3.0, 100.0]])
    mask = T([[1.0, 1, 0]])
    w = ppo.masked_whiten(x, mask)
    # mean 2, var 1 over the two real tokens
    assert torch.allclose(w, T([[-1.0, 1.0, 0.0]]), atol=1e-4)


def test_masked_whiten_with_all_reduce_matches_global_batch():
    a, b = T([[1.0, 2.0]]), T([[3.0, 10.0]])
    ma, mb = T([[1.0, 1.0]]), T([[1.0, 0.0]])
    full = ppo.masked_whiten(torch.cat([a, b]), torch.cat([ma, mb]))
    # Simulate two processes: all_reduce sums each process's partial sums.
    parts = {}

    def fake_all_reduce(local):
        key = len(parts)
        parts[key] = local
        return local + other_partial(key)

    def other_partial(key):  # the partial sums the other "process" contributes at the same call
        x, m = (b, mb)
        if key == 0:
            return torch.stack([(x * m).sum(), m.sum()])
        mean = (a * ma).sum() + (b * mb).sum()
        mean = mean / (ma.sum() + mb.sum())
        return torch.stack([(((x - mean) ** 2) * m).sum(), m.sum()])

    local = ppo.masked_whiten(a, ma, all_reduce=fake_all_reduce)
    assert torch.allclose(local, full[:1], atol=1e-5)


def test_sequence_mean_averages_tokens_then_sequences():
    x = T([[1.0, 3.0, 0.0], [10.0, 0.0, 0.0]])
    mask = T([[1.0, 1, 0], [1, 0, 0]])
    assert ppo.sequence_mean(x, mask).item() == pytest.approx((2.0 + 10.0) / 2)


def test_policy_loss_clips_hand_computed():
    old = torch.zeros(1, 3)
    logp = torch.log(T([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = T([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    loss, clip_frac = ppo.policy_loss(logp, old, adv, mask, clip_range=0.2)
    # t0: A>0, ratio 1.5 -> clipped 1.2: max(-1.5, -1.2) = -1.2
    # t1: A<0, ratio 0.5 -> clipped 0.8: max(0.5, 0.8) = 0.8
    # t2: ratio 1.1 inside the range: -2.2
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 3)


def test_policy_loss_gradient_is_zero_when_clipped():
    old = torch.zeros(1, 1)
    logp = torch.log(T([[1.5]])).requires_grad_()
    loss, _ = ppo.policy_loss(logp, old, T([[1.0]]), torch.ones(1, 1), clip_range=0.2)
    loss.backward()
    assert logp.grad.abs().item() == 0.0


def test_value_loss_takes_max_of_clipped_and_unclipped():
    old_v = T([[0.0, 0.0]])
    v = T([[1.0, 0.1]])
    returns = T([[1.0, 1.0]])
    mask = torch.ones(1, 2)
    loss = ppo.value_loss(v, old_v, returns, mask, clip_range=0.2)
    # t0: unclipped (1-1)^2 = 0, clipped v=0.2 -> 0.64; max 0.64
    # t1: unclipped 0.81, clipped 0.1 (inside) -> 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)


def test_full_chain_one_sequence():
    """Rewards -> GAE -> (single-sequence) numbers an engineer can follow on paper."""
    scores = T([1.0])
    logp, ref = T([[-0.2, -0.4]]), T([[-0.3, -0.4]])
    mask = torch.ones(1, 2)
    rewards, _ = ppo.kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.05)
    assert torch.allclose(rewards, T([[-0.005, 1.0]]))
    adv, ret = ppo.gae_advantages(rewards, torch.zeros(1, 2), mask, gamma=1.0, lam=0.95)
    assert torch.allclose(adv, T([[-0.005 + 0.95 * 1.0, 1.0]]))
    assert math.isclose(ret[0, 0].item(), 0.945, rel_tol=1e-6)


def test_ppo_objective_is_policy_loss_plus_weighted_value_loss():
    """The two hand-computed cases above in one minibatch: L = L_pi + c_V * L_V."""
    logp, old = torch.log(T([[1.5, 0.5, 1.1]])), torch.zeros(1, 3)
    adv, mask = T([[1.0, -1.0, 2.0]]), torch.ones(1, 3)
    v, old_v, returns = T([[1.0, 0.1, 0.0]]), T([[0.0, 0.0, 0.0]]), T([[1.0, 1.0, 0.0]])
    loss, terms = ppo.ppo_objective(logp, v, old, old_v, adv, returns, mask, clip_range=0.2, value_clip_range=0.2,
                                    vf_coef=5.0)
    policy = (-1.2 + 0.8 - 2.2) / 3
    value = 0.5 * (0.64 + 0.81 + 0.0) / 3
    assert terms["policy_loss"].item() == pytest.approx(policy, abs=1e-6)
    assert terms["value_loss"].item() == pytest.approx(value, abs=1e-6)
    assert terms["clip_frac"].item() == pytest.approx(2 / 3)
    assert loss.item() == pytest.approx(policy + 5.0 * value, abs=1e-6)


def test_group_advantages_hand_computed():
    # Two questions, k = 3: rewards (1, 0, 0.1) and (1, 1, 1).
    scores = T([1.0, 0.0, 0.1, 1.0, 1.0, 1.0])
    mean = 1.1 / 3
    std = math.sqrt(((1 - mean) ** 2 + mean**2 + (0.1 - mean) ** 2) / 2)  # unbiased, as DeepSeekMath's code
    grpo = ppo.group_advantages(scores, 3, "grpo")
    assert grpo[:3].tolist() == pytest.approx([(1 - mean) / std, -mean / std, (0.1 - mean) / std], abs=1e-5)
    assert grpo[3:].tolist() == [0.0, 0.0, 0.0]  # a uniform group teaches nothing
    drgrpo = ppo.group_advantages(scores, 3, "drgrpo")
    assert drgrpo[:3].tolist() == pytest.approx([1 - mean, -mean, 0.1 - mean], abs=1e-6)
    rloo = ppo.group_advantages(scores, 3, "rloo")
    # r_i minus the mean of the other two: 1 - 0.05, 0 - 0.55, 0.1 - 0.5
    assert rloo[:3].tolist() == pytest.approx([0.95, -0.55, -0.4], abs=1e-6)
    assert ppo.uniform_groups(scores, 3).tolist() == [False, True]
    with pytest.raises(ValueError, match="at least 2"):
        ppo.group_advantages(T([1.0]), 1, "rloo")


def test_constant_length_mean_weighs_every_token_alike():
    x = T([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert ppo.constant_length_mean(x, mask, length=8).item() == pytest.approx((4 / 8 + 2 / 8) / 2)
    assert ppo.sequence_mean(x, mask).item() == pytest.approx((1 + 2) / 2)  # the per-sequence mean differs


def test_k3_kl_hand_computed_and_in_the_objective():
    logp, ref = T([[-1.0, -2.0]]), T([[-1.5, -2.0]])
    # delta = ref - logp = -0.5, 0: exp(-0.5) + 0.5 - 1 and 0
    assert ppo.k3_kl(logp, ref)[0].tolist() == pytest.approx([math.exp(-0.5) - 0.5, 0.0], abs=1e-6)
    mask = torch.ones(1, 2)
    adv = torch.zeros(1, 2)
    loss, terms = ppo.ppo_objective(logp, None, logp, None, adv, None, mask, 0.2, 0.2, 5.0, ref_logprobs=ref,
                                    kl_coef=0.1)
    assert "value_loss" not in terms and terms["policy_loss"].item() == 0.0
    assert loss.item() == pytest.approx(0.1 * (math.exp(-0.5) - 0.5) / 2, abs=1e-6)
