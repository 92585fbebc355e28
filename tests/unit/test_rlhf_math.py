"""Classic-RLHF math against hand-computed values: GAE, whitening, PPO's clipped policy and value losses, the
per-token KL reward, RLOO's leave-one-out baseline, the adaptive KL controller, and the Bradley-Terry loss with
margin and centring (parity with TRL 1.16's RewardTrainer.compute_loss on the same scores), plus calibration."""

from __future__ import annotations

import math

import pytest
import torch

from components.core.algos import rl
from components.core.model import heads


def test_gae_by_hand():
    # one sequence of 3 tokens, gamma 0.9, lam 0.5; values V = [1, 2, 3], rewards r = [0, 0, 10]
    rewards = torch.tensor([[0.0, 0.0, 10.0]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 10.0 - 3.0  # next value past the end is 0
    d1 = 0.0 + 0.9 * 3.0 - 2.0
    d0 = 0.0 + 0.9 * 2.0 - 1.0
    a2 = d2
    a1 = d1 + 0.9 * 0.5 * a2
    a0 = d0 + 0.9 * 0.5 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 1, a1 + 2, a2 + 3]]))


def test_gae_stops_at_each_sequence_end():
    # second row has 2 real tokens: its last reward sits at t = 1, and position 2 (padding) contributes nothing
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 99.0]])  # the padded value must be ignored
    mask = torch.tensor([[True, True, False]])
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # lam = gamma = 1: A_t = sum of future rewards - V_t
    torch.testing.assert_close(adv, torch.tensor([[1.0 - 0.5, 1.0 - 0.25, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 0.0]]))


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    out = rl.masked_whiten(x, mask)
    # mean 2, unbiased var 1 over the three masked entries
    torch.testing.assert_close(out[0, :3], torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(1 + 1e-8))
    kept = rl.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept[0, :3], torch.tensor([1.0, 2.0, 3.0]), atol=1e-6, rtol=0)  # var 1: scale 1


def test_token_kl_and_ppo_rewards_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    k1 = rl.token_kl(logp, ref, "k1")
    torch.testing.assert_close(k1, torch.tensor([[math.log(2), 0.0]]))
    k3 = rl.token_kl(logp, ref, "k3")  # exp(ref - logp) - (ref - logp) - 1 = 0.5 + ln 2 - 1
    torch.testing.assert_close(k3, torch.tensor([[0.5 + math.log(2) - 1, 0.0]]))
    with pytest.raises(ValueError, match="k1 or k3"):
        rl.token_kl(logp, ref, "k2")
    mask = torch.tensor([[True, True, False], [True, False, False]])
    kl = torch.tensor([[1.0, 2.0, 7.0], [4.0, 7.0, 7.0]])
    r = rl.ppo_token_rewards(torch.tensor([10.0, 20.0]), kl, mask, kl_coef=0.1)
    # -0.1 * KL on real tokens, the score added at each row's last real token, 0 on padding
    torch.testing.assert_close(r, torch.tensor([[-0.1, -0.2 + 10.0, 0.0], [-0.4 + 20.0, 0.0, 0.0]]))


def test_ppo_policy_loss_clips_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5]]))  # ratios 0.5, 1, 1.5
    loss, clipped = rl.ppo_policy_losses(logp, old, torch.tensor([[1.0, 1.0, 1.0]]), cliprange=0.2)
    # A > 0: max(-A r, -A clip(r)) = -A min(r, clip(r)): -0.5, -1, -1.2
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.0, -1.2]]))
    assert clipped.tolist() == [[False, False, True]]
    loss, clipped = rl.ppo_policy_losses(logp, old, torch.tensor([[-1.0, -1.0, -1.0]]), cliprange=0.2)
    # A < 0: max(r, clip(r)): 0.8 (clipped up), 1, 1.5
    torch.testing.assert_close(loss, torch.tensor([[0.8, 1.0, 1.5]]))
    assert clipped.tolist() == [[True, False, False]]


def test_ppo_value_loss_clips_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, 2.0]])
    loss, clipped = rl.ppo_value_losses(new, old, returns, cliprange_value=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped V = 0.2: (0.2-2)^2 = 3.24 -> max 3.24, * 0.5
    # token 1: inside the range: both (0.1-2)^2 = 3.61
    torch.testing.assert_close(loss, 0.5 * torch.tensor([[3.24, 3.61]]))
    assert clipped.tolist() == [[True, False]]


def test_rloo_baseline_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0])  # two groups of 3
    adv = rl.rloo_advantages(r, 3)
    # 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2; 6 - 0, 0 - 3, 0 - 3
    torch.testing.assert_close(adv, torch.tensor([-1.5, 0.0, 1.5, 6.0, -3.0, -3.0]))
    with pytest.raises(ValueError, match="at least 2"):
        rl.rloo_advantages(r, 1)


def test_adaptive_kl_controller_by_hand():
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(current_kl=9.0, n_steps=10)  # error clip(9/6 - 1) = 0.2: x (1 + 0.2 * 10 / 100)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(current_kl=5.4, n_steps=10)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.99)


def test_bradley_terry_matches_trl_reward_trainer():
    torch.manual_seed(0)
    rc, rr = torch.randn(6), torch.randn(6)
    margin = torch.rand(6)
    # TRL 1.16 RewardTrainer.compute_loss, written out: mean over the batch, then the centring term
    trl = -torch.nn.functional.logsigmoid(rc - rr - margin).mean() + 0.01 * torch.mean((rc + rr) ** 2)
    ours = heads.bradley_terry_losses(rc, rr, margin, 0.01).mean()
    torch.testing.assert_close(ours, trl)
    plain = heads.bradley_terry_losses(torch.tensor([1.0]), torch.tensor([0.0]))
    torch.testing.assert_close(plain, torch.tensor([math.log(1 + math.exp(-1.0))]))


def test_bradley_terry_gradient_of_accumulated_shares_equals_the_batch_loss():
    rc = torch.tensor([0.3, -0.2, 1.0, 0.5], requires_grad=True)
    rr = torch.tensor([0.1, 0.4, -1.0, 0.5], requires_grad=True)
    heads.bradley_terry_losses(rc, rr, None, 0.05).mean().backward()
    whole = rc.grad.clone()
    rc.grad = None
    for sl in (slice(0, 1), slice(1, 4)):  # micro-batches of 1 and 3, each its share of the global mean
        (heads.bradley_terry_losses(rc[sl], rr[sl], None, 0.05).sum() / 4).backward()
    torch.testing.assert_close(rc.grad, whole)


def test_reliability_counts_each_pair_both_ways():
    calib = heads.reliability([2.0, 0.0], [0.0, 0.0], bins=10)
    p = 1 / (1 + math.exp(-2.0))  # 0.881: bin 8, observed 1; its mirror 0.119 in bin 1, observed 0
    bins = {(round(b["low"], 1)): b for b in calib["bins"]}
    assert bins[0.8]["count"] == 1 and bins[0.8]["observed"] == 1.0 and bins[0.8]["predicted"] == pytest.approx(p)
    assert bins[0.1]["count"] == 1 and bins[0.1]["observed"] == 0.0
    assert bins[0.5]["count"] == 2 and bins[0.5]["observed"] == 0.5  # a tie: 0.5 both ways, one right one wrong
    # ECE: (|p - 1| + |1 - p - 0| + 2 * 0) / 4
    assert calib["ece"] == pytest.approx(2 * (1 - p) / 4)
