"""evaluate.summarise: the metrics of every policy, hand-computed."""

from __future__ import annotations

import pytest
import torch


def summarise_example(**overrides):
    from components.evaluate import summarise

    kwargs = dict(
        scores={"sft": [0.5, 1.0, 0.0], "dpo": [1.0, 1.0, 0.5]},
        lengths={"sft": [2, 4, 6], "dpo": [3, 3, 6]},
        logps={"sft": (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])),
               "dpo": (torch.tensor([-0.5, -1.0]), torch.tensor([-4.0, -3.0]))},
        reference_logps=(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])),
        kl_terms=torch.tensor([0.2, 0.4, 0.0]), beta=0.5, bootstrap_samples=200, confidence=0.9, seed=0,
        perplexity={"sft": 2.0, "dpo": 1.5}, exact_reward=True,
    )
    return summarise(**{**kwargs, **overrides})


def test_summarise_hand_computed_metrics():
    m = summarise_example()
    expected = {
        # implicit rewards 0.5 * (policy - reference): chosen (0.25, 0.5), rejected (-0.5, -1.0)
        "eval/rewards/chosen": 0.375, "eval/rewards/rejected": -0.75,
        "eval/rewards/margins": 1.125, "eval/rewards/accuracies": 1.0,
        # log p(chosen) - log p(rejected): DPO (3.5, 2.0), SFT (2.0, -1.0)
        "eval/logp_accuracy": 1.0, "eval/sft/logp_accuracy": 0.5,
        "eval/logp_margin": 2.75, "eval/sft/logp_margin": 0.5,
        "eval/reward_mean": 2.5 / 3, "eval/sft/reward_mean": 0.5, "eval/reward_delta": 1 / 3,
        "eval/win_rate_vs_sft": 2.5 / 3,  # win, tie, win
        "eval/kl_to_reference": 0.2, "eval/length_mean": 4.0, "eval/sft/length_mean": 4.0, "eval/length_ratio": 1.0,
        "eval/num_prompts": 3, "eval/num_pairs": 2,
        "eval/reward_eq_1": 2 / 3, "eval/sft/reward_eq_1": 1 / 3,
        "eval/perplexity": 1.5, "eval/sft/perplexity": 2.0,
    }
    assert {k: m[k] for k in expected} == pytest.approx(expected)
    for key in ("eval/reward_mean", "eval/sft/reward_mean", "eval/reward_delta"):
        assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"]
    assert m["eval/win_rate_ci_low"] <= m["eval/win_rate_vs_sft"] <= m["eval/win_rate_ci_high"]


def test_summarise_reports_grpo_beside_dpo_by_hand():
    m = summarise_example(
        scores={"sft": [0.5, 1.0, 0.0], "dpo": [1.0, 1.0, 0.5], "grpo": [1.0, 0.5, 1.0]},
        lengths={"sft": [2, 4, 6], "dpo": [3, 3, 6], "grpo": [4, 4, 4]},
        logps={"sft": (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])),
               "dpo": (torch.tensor([-0.5, -1.0]), torch.tensor([-4.0, -3.0])),
               "grpo": (torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -0.5]))},
        kl_terms={"dpo": torch.tensor([0.2, 0.4, 0.0]), "grpo": torch.tensor([1.0, 2.0, 3.0])},
    )
    expected = {
        "eval/grpo/reward_mean": 2.5 / 3, "eval/grpo/reward_delta": 1 / 3,
        "eval/grpo/win_rate_vs_sft": 2 / 3,  # win, loss, win
        "eval/grpo/win_rate_vs_dpo": 0.5,  # tie, loss, win
        "eval/grpo/kl_to_reference": 2.0, "eval/grpo/length_mean": 4.0, "eval/grpo/length_ratio": 1.0,
        "eval/grpo/logp_accuracy": 0.5,  # margins 1.0, -0.5
        "eval/grpo/reward_eq_1": 2 / 3, "eval/grpo/reward_eq_1_delta": 1 / 3,  # solved (1,0,1) vs SFT (0,1,0)
        "eval/reward_eq_1_delta": 1 / 3,  # DPO solved (1,1,0) vs SFT (0,1,0)
        "eval/reward_mean": 2.5 / 3,  # DPO's keys unchanged
    }
    assert {k: m[k] for k in expected} == pytest.approx(expected)
    assert m["eval/grpo/win_rate_vs_dpo_ci_low"] <= 0.5 <= m["eval/grpo/win_rate_vs_dpo_ci_high"]


def test_summarise_reports_what_sft_did_to_the_base_model_by_hand():
    m = summarise_example(
        scores={"sft": [0.5, 1.0, 0.0], "dpo": [1.0, 1.0, 0.5], "base": [0.0, 0.5, 0.0]},
        lengths={"sft": [2, 4, 6], "dpo": [3, 3, 6], "base": [8, 8, 8]},
        logps={"sft": (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])),
               "dpo": (torch.tensor([-0.5, -1.0]), torch.tensor([-4.0, -3.0])),
               "base": (torch.tensor([-3.0, -3.0]), torch.tensor([-2.0, -2.0]))},
        kl_terms={"dpo": torch.tensor([0.2, 0.4, 0.0]), "base": torch.tensor([1.0, 1.0, 1.0])},
    )
    expected = {
        "eval/base/reward_mean": 0.5 / 3, "eval/base/reward_delta": -1 / 3,  # base minus SFT: -0.5, -0.5, 0
        "eval/sft/reward_delta_vs_base": 1 / 3,  # what SFT did: the same, the other way round
        "eval/base/win_rate_vs_sft": 0.5 / 3,  # loss, loss, tie
        "eval/base/length_ratio": 2.0, "eval/base/logp_accuracy": 0.0,
        "eval/reward_mean": 2.5 / 3,  # DPO's keys unchanged
    }
    assert {k: m[k] for k in expected} == pytest.approx(expected)
    # the CI flips with the sign: SFT's gain over base is the base's loss against SFT
    assert m["eval/sft/reward_delta_vs_base_ci_low"] == pytest.approx(-m["eval/base/reward_delta_ci_high"])
    assert m["eval/sft/reward_delta_vs_base_ci_high"] == pytest.approx(-m["eval/base/reward_delta_ci_low"])
    assert m["eval/sft/reward_delta_vs_base_ci_low"] <= 1 / 3 <= m["eval/sft/reward_delta_vs_base_ci_high"]


def test_summarise_reports_ppo_with_the_reward_models_score_beside_the_judges():
    """The reward-hacking view: every policy's mean reward-model score next to its judge reward."""
    m = summarise_example(
        scores={"sft": [0.5, 1.0, 0.0], "dpo": [1.0, 1.0, 0.5], "ppo": [0.0, 0.5, 0.0]},
        lengths={"sft": [2, 4, 6], "dpo": [3, 3, 6], "ppo": [8, 8, 8]},
        logps={"sft": (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])),
               "dpo": (torch.tensor([-0.5, -1.0]), torch.tensor([-4.0, -3.0])),
               "ppo": (torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -0.5]))},
        kl_terms={"dpo": torch.tensor([0.2, 0.4, 0.0]), "ppo": torch.tensor([3.0, 3.0, 3.0])},
        rm_scores={"sft": [0.0, 1.0, 2.0], "dpo": [1.0, 1.0, 1.0], "ppo": [5.0, 6.0, 7.0]},
    )
    expected = {
        "eval/ppo/reward_mean": 0.5 / 3, "eval/ppo/reward_delta": -1 / 3, "eval/ppo/win_rate_vs_sft": 0.5 / 3,
        "eval/ppo/rm_score_mean": 6.0, "eval/sft/rm_score_mean": 1.0, "eval/rm_score_mean": 1.0,
        "eval/ppo/kl_to_reference": 3.0, "eval/ppo/length_ratio": 2.0, "eval/ppo/win_rate_vs_dpo": 0.0,
    }
    assert {k: m[k] for k in expected} == pytest.approx(expected)
    assert not any(k.startswith("eval/grpo/") for k in m)  # a policy not evaluated has no keys


def test_summarise_without_exact_reward_or_perplexity_and_with_a_mute_sft():
    m = summarise_example(exact_reward=False, perplexity={}, lengths={"sft": [0, 0, 0], "dpo": [3, 3, 6]})
    assert "eval/reward_eq_1" not in m and "eval/perplexity" not in m
    assert m["eval/length_ratio"] == pytest.approx(4.0)  # an SFT length of 0 is floored at one token
