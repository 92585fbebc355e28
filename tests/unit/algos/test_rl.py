"""algos/rl.py against hand-computed values and TRL: GRPO-family advantages, surrogate, KL and aggregation; GAE,
whitening, PPO's clipped policy and value losses, the RLOO baseline and the adaptive KL controller."""

from __future__ import annotations

import math

import pytest
import torch

from components.core.algos import rl


def test_group_advantages_each_scale_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5])  # two groups of 2: {1, 0} and {0.5, 0.5}
    std_g1 = math.sqrt(0.5)  # unbiased std of {1, 0}
    adv, group_std = rl.group_advantages(r, 2, "none")
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0]
    torch.testing.assert_close(group_std, torch.tensor([std_g1, std_g1, 0.0, 0.0]))
    adv, _ = rl.group_advantages(r, 2, "group")
    torch.testing.assert_close(adv, torch.tensor([0.5 / (std_g1 + 1e-4), -0.5 / (std_g1 + 1e-4), 0.0, 0.0]))
    batch_std = math.sqrt(sum((x - 0.5) ** 2 for x in [1.0, 0.0, 0.5, 0.5]) / 3)
    adv, _ = rl.group_advantages(r, 2, "batch")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (batch_std + 1e-4))
    assert rl.zero_std_groups(group_std, 2).tolist() == [False, True]
    with pytest.raises(ValueError, match="groups of 3"):
        rl.group_advantages(r, 3, "group")


def test_clipped_surrogate_clips_low_and_high_by_hand():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[0.5, 1.0, 1.5]]))  # ratios 0.5, 1.0, 1.5
    pos = rl.clipped_surrogate(logps, old, torch.tensor([2.0]), epsilon_low=0.2, epsilon_high=0.28)
    # A > 0: min(r A, clip(r) A) = A * min(r, clip(r)): 0.5*2 (unclipped low side), 1*2, 1.28*2
    torch.testing.assert_close(pos.per_token_loss, -torch.tensor([[1.0, 2.0, 2.56]]))
    neg = rl.clipped_surrogate(logps, old, torch.tensor([-2.0]), epsilon_low=0.2, epsilon_high=0.28)
    # A < 0: min(-2 r, -2 clip(r)) = -2 max(r, clip(r)): 0.8, 1, 1.5
    torch.testing.assert_close(neg.per_token_loss, torch.tensor([[1.6, 2.0, 3.0]]))
    mask = torch.ones(1, 3)
    clip = rl.clip_fractions(neg.ratio, torch.tensor([-2.0]), mask, 0.2, 0.28)
    assert clip["clip_ratio/low"].item() == 1 and clip["clip_ratio/high"].item() == 0
    clip = rl.clip_fractions(pos.ratio, torch.tensor([2.0]), mask, 0.2, 0.28)
    assert clip["clip_ratio/high"].item() == 1 and clip["clip_ratio/region"].item() == 1


def test_k3_kl_by_hand_and_in_the_loss():
    logps, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    # exp(ref - logp) - (ref - logp) - 1 = 0.5 - ln 0.5 - 1
    torch.testing.assert_close(rl.k3_kl(logps, ref), torch.tensor([[0.5 + math.log(2) - 1]]))
    assert rl.k3_kl(ref, ref).item() == 0.0
    out = rl.clipped_surrogate(logps, logps, torch.tensor([0.0]), 0.2, 0.2, beta=0.1, ref_logps=ref)
    torch.testing.assert_close(out.per_token_loss, 0.1 * rl.k3_kl(logps, ref))
    with pytest.raises(ValueError, match="reference"):
        rl.clipped_surrogate(logps, logps, torch.tensor([0.0]), 0.2, 0.2, beta=0.1)


def test_each_loss_aggregation_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    totals = rl.Totals(sequences=2, tokens=4, micro_batches=1, max_completion_length=5)
    assert rl.aggregate(loss, mask, "grpo", totals).item() == pytest.approx((2.0 + 4.0) / 2)
    assert rl.aggregate(loss, mask, "bnpo", totals).item() == pytest.approx(10.0 / 4)
    assert rl.aggregate(loss, mask, "dr_grpo", totals).item() == pytest.approx(10.0 / (2 * 5))
    assert rl.aggregate(loss, mask, "dapo", totals).item() == pytest.approx(10.0 / 4)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"])
def test_micro_batch_shares_sum_to_the_global_loss(loss_type):
    """Split one batch in two micro-batches: the shares add up to the loss of the whole (bnpo is per
    micro-batch by definition and is excluded)."""
    torch.manual_seed(0)
    loss = torch.randn(6, 4)
    mask = (torch.rand(6, 4) > 0.3).long()
    mask[:, 0] = 1
    whole = rl.Totals(sequences=6, tokens=int(mask.sum()), micro_batches=1, max_completion_length=4)
    split = rl.Totals(sequences=6, tokens=int(mask.sum()), micro_batches=2, max_completion_length=4)
    parts = rl.aggregate(loss[:2], mask[:2], loss_type, split) + rl.aggregate(loss[2:], mask[2:], loss_type, split)
    torch.testing.assert_close(parts, rl.aggregate(loss, mask, loss_type, whole))


OBJECTIVES = [("grpo", "token"), ("bnpo", "token"), ("dr_grpo", "token"), ("dapo", "token"), ("cispo", "token"),
              ("sapo", "token"), ("grpo", "sequence"), ("luspo", "sequence"), ("sapo", "sequence")]


@pytest.mark.parametrize(("loss_type", "level"), OBJECTIVES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_trl_grpo_trainer(loss_type, level, beta):
    """TRL 1.16's GRPOTrainer._compute_loss on a stub model that returns fixed per-token log-probs."""
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    torch.manual_seed(1)
    B, T = 4, 5
    logps = torch.randn(B, T) * 0.1 - 1.0
    old = logps + torch.randn(B, T) * 0.3
    ref = logps + torch.randn(B, T) * 0.2
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    eps_high = 5.0 if loss_type == "cispo" else 0.28  # cispo: the ScaleRL paper's eps_max

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.__dict__.update(
        beta=beta, epsilon_low=0.2, epsilon_high=eps_high, loss_type=loss_type, max_completion_length=T,
        importance_sampling_level=level, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
        accelerator=SimpleNamespace(num_processes=1, gather=lambda t: t.reshape(-1), reduce=lambda t, reduction=None: t,
                                    gather_for_metrics=lambda t: t.reshape(-1)),
        model=SimpleNamespace(training=True), _metrics={"train": __import__("collections").defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1,
                             sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
    )
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros(B, T), None)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    try:
        expected = trainer._compute_loss(None, inputs)
    except (AttributeError, KeyError, TypeError) as e:  # a private API: name the drift instead of a false pass
        pytest.fail(f"TRL's _compute_loss changed shape ({type(e).__name__}: {e}); update this test")
    objective = rl.Objective(loss_type, level, 0.2, eps_high, beta, (1.0, 1.05))
    out = rl.policy_surrogate(logps, old, adv, mask, objective, ref if beta else None)
    totals = rl.Totals(sequences=B, tokens=int(mask.sum()), micro_batches=1, max_completion_length=T)
    torch.testing.assert_close(rl.aggregate(out.per_token_loss, mask, loss_type, totals), expected)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo") and level == "token":  # the older entry point agrees
        old_api = rl.clipped_surrogate(logps, old, adv, 0.2, eps_high, beta, ref if beta else None)
        torch.testing.assert_close(old_api.per_token_loss, out.per_token_loss)


def test_gspo_weight_is_one_per_sequence_by_hand():
    logps = torch.tensor([[0.0, 0.0, 0.0]])
    old = torch.tensor([[-0.2, 0.4, 9.0]])  # log-ratios 0.2, -0.4 and a masked token
    mask = torch.tensor([[1, 1, 0]])
    w = rl.importance_weights(logps, old, mask, "sequence")
    torch.testing.assert_close(w, torch.tensor([[math.exp(-0.1)]]))  # exp(mean(0.2, -0.4))
    out = rl.policy_surrogate(logps, old, torch.tensor([1.0]), mask, rl.Objective("grpo", "sequence", 0.2, 0.2))
    # w = 0.905 inside [0.8, 1.2]: loss -w * A on every token of the sequence
    torch.testing.assert_close(out.per_token_loss, torch.full((1, 3), -math.exp(-0.1)))
    with pytest.raises(ValueError, match="token or sequence"):
        rl.importance_weights(logps, old, mask, "group")


def test_cispo_clips_the_weight_and_keeps_the_gradient_of_the_log_prob():
    logps = torch.tensor([[math.log(0.5), math.log(0.5)]], requires_grad=True)
    old = torch.log(torch.tensor([[0.05, 0.5]]))  # ratios 10 and 1
    out = rl.policy_surrogate(logps, old, torch.tensor([2.0]), torch.ones(1, 2), rl.Objective("cispo", "token", 0.2, 5.0))
    # -min(w, 5) * A * logp: -5 * 2 * ln 0.5 and -1 * 2 * ln 0.5
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[10 * math.log(2), 2 * math.log(2)]]))
    out.per_token_loss.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-10.0, -2.0]]))  # the weight is detached: d/dlogp = -w A
    clip = rl.clip_fractions(out.ratio, torch.tensor([2.0]), torch.ones(1, 2), 0.2, 5.0, cispo=True)
    assert clip["clip_ratio/high"].item() == 1 and clip["clip_ratio/low"].item() == 0


def test_sapo_gate_by_hand():
    logps, old = torch.zeros(1, 1), torch.full((1, 1), -0.5)  # w = e^0.5
    w = math.exp(0.5)
    for adv, tau in ((1.0, 1.0), (-1.0, 1.05)):
        out = rl.policy_surrogate(logps, old, torch.tensor([adv]), torch.ones(1, 1), rl.Objective("sapo", "token"))
        gate = 4 / tau / (1 + math.exp(-tau * (w - 1)))
        torch.testing.assert_close(out.per_token_loss, torch.tensor([[-gate * adv]]))
    # at w = 1 the gate is 4 sigma(0) / tau = 2 / tau: the soft gate's value on policy


def test_luspo_sums_each_sequence_and_averages_over_sequences():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    totals = rl.Totals(sequences=2, tokens=4, micro_batches=1, max_completion_length=5)
    assert rl.aggregate(loss, mask, "luspo", totals).item() == pytest.approx((6.0 + 4.0) / 2)
    assert rl.aggregate(loss, mask, "cispo", totals).item() == pytest.approx(10.0 / 4)
    assert rl.aggregate(loss, mask, "sapo", totals).item() == pytest.approx((2.0 + 4.0) / 2)


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


def test_best_worst_marks_each_groups_pair_by_hand():
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.1, 0.3, 0.3, 0.3, 0.3])  # groups of 4: a pair, then all equal
    assert rl.best_worst(rewards, 4).tolist() == [0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0]
    adv, std = rl.advantages_of("online_dpo", rewards, 4, "group")
    assert adv.tolist() == rl.best_worst(rewards, 4).tolist() and std[4].item() == 0.0
    assert rl.advantages_of("dapo", rewards, 4, "group")[0].tolist() == rl.group_advantages(rewards, 4, "group")[0].tolist()


def test_online_dpo_loss_by_hand():
    # one group of 3: best row 0, worst row 2; token log-probs and the reference's, the last token of row 1 masked
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -9.0], [-3.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.5], [-0.5, -0.5], [-2.0, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    marks = torch.tensor([1.0, 0.0, -1.0])
    objective = rl.Objective("online_dpo", dpo_beta=0.5, group_size=3)
    out = rl.policy_surrogate(logps, logps.detach(), marks, mask, objective, ref)
    # log-ratios: best 0.5 + 0.5 = 1.0, worst -1.0 + 0 = -1.0; margin 2.0; loss -log sigma(0.5 * 2.0)
    expected = -math.log(1 / (1 + math.exp(-1.0)))
    assert out.per_token_loss[0, 0].item() == pytest.approx(expected)
    assert out.per_token_loss.sum().item() == pytest.approx(expected)  # one value per pair, on its best's first token
    totals = rl.Totals(sequences=3, tokens=5, micro_batches=1, max_completion_length=2, pairs=1)
    assert rl.aggregate(out.per_token_loss, mask, "online_dpo", totals).item() == pytest.approx(expected)
    # a group without a pair contributes nothing
    none = rl.policy_surrogate(logps, logps, torch.zeros(3), mask, objective, ref)
    assert none.per_token_loss.abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="reference"):
        rl.policy_surrogate(logps, logps, marks, mask, objective)


def test_behaviour_weights_each_mode_by_hand():
    """TRL 1.16's four importance-sampling modes on log-ratios ln 4, 0, -ln 2 (ratios 4, 1, 1/2), C_max 3."""
    sampler = torch.tensor([[0.0, -1.0, -2.0]])
    old = sampler + torch.tensor([[math.log(4.0), 0.0, -math.log(2.0)]])
    mask = torch.ones(1, 3)
    w, cut = rl.behaviour_weights(old, sampler, mask, "token_truncate", None, 3.0)
    assert w.tolist()[0] == pytest.approx([3.0, 1.0, 0.5]) and cut.tolist() == [[True, False, False]]
    w, _ = rl.behaviour_weights(old, sampler, mask, "token_mask", None, 3.0)
    assert w.tolist()[0] == pytest.approx([0.0, 1.0, 0.5])
    w, cut = rl.behaviour_weights(old, sampler, mask, "token_mask", 0.6, 3.0)  # below C_min masked too
    assert w.tolist()[0] == pytest.approx([0.0, 1.0, 0.0]) and cut.tolist() == [[True, False, True]]
    w, _ = rl.behaviour_weights(old, sampler, mask, "token_truncate", 0.6, None)
    assert w.tolist()[0] == pytest.approx([4.0, 1.0, 0.6])
    w, cut = rl.behaviour_weights(old, sampler, mask, "sequence_truncate", None, 3.0)  # exp(ln 4 - ln 2) = 2
    assert w.shape == (1, 1) and w.item() == pytest.approx(2.0) and not cut.any()
    pad = torch.tensor([[1.0, 1.0, 0.0]])  # the -ln 2 token is padding: exp(ln 4) = 4, cut at 3 / masked
    w, cut = rl.behaviour_weights(old, sampler, pad, "sequence_truncate", None, 3.0)
    assert w.item() == pytest.approx(3.0) and cut.tolist() == [[True, True, False]]
    w, _ = rl.behaviour_weights(old, sampler, pad, "sequence_mask", None, 3.0)
    assert w.item() == 0.0


def test_off_policy_correction_weights_the_policy_term_and_not_the_kl():
    """(loss - beta kl) * w + beta kl, in place, as TRL multiplies before adding its KL term."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(is_correction_mode="token_truncate", is_clip_min=None, is_clip_max=3.0, beta=0.5)
    kl = torch.tensor([[0.2, 0.4]])
    out = rl.SurrogateOutput(torch.tensor([[1.0, -2.0]]) + 0.5 * kl, torch.ones(1, 2), kl)
    old = torch.tensor([[math.log(2.0), math.log(8.0)]])
    weights, cut = rl.correct_off_policy(out, old, [[0.0]], torch.tensor([[1.0, 0.0]]), cfg)  # row 0: one token
    # token 0: ratio 2; token 1 is padding (its sampler log-prob padded 0, masked out of the ratio: weight 1)
    assert weights.tolist() == [[pytest.approx(2.0), 1.0]] and cut.tolist() == [[False, False]]
    assert out.per_token_loss.tolist()[0] == pytest.approx([1.0 * 2 + 0.1, -2.0 + 0.2])
