"""Evaluation statistics and judges: hand-computed values, no models trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from components.core.algos import stats
from components.core.algos.stats import bootstrap_ci, win_values
from components.core.eval import judges
from components.core.eval.judges import JudgeError, load_judge
from components.core.model import generation

# ----------------------------------------------------------------------------- bootstrap_ci


def test_constant_values_give_a_zero_width_interval():
    assert bootstrap_ci([0.7] * 25, 500, 0.95, seed=0) == pytest.approx((0.7, 0.7, 0.7))


def test_single_value_and_empty():
    assert bootstrap_ci([3.0], 100, 0.9, seed=1) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_ci([], 100, 0.9, seed=1)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], 100, 1.0, seed=1)


def test_mean_is_the_sample_mean_and_seeded():
    values = [0.0, 1.0, 1.0, 0.5, 0.0, 1.0]
    mean, low, high = bootstrap_ci(values, 1000, 0.9, seed=3)
    assert mean == pytest.approx(3.5 / 6)
    assert 0.0 <= low < mean < high <= 1.0
    assert bootstrap_ci(values, 1000, 0.9, seed=3) == (mean, low, high)
    continuous = np.random.default_rng(0).random(30)
    assert bootstrap_ci(continuous, 300, 0.9, seed=4) != bootstrap_ci(continuous, 300, 0.9, seed=5)


def test_interval_matches_the_normal_approximation_for_a_large_sample():
    # mean of 2000 N(0, 1) draws: standard error 1/sqrt(2000); a 95% interval is about +-1.96 SE
    x = np.random.default_rng(0).normal(size=2000)
    mean, low, high = bootstrap_ci(x, 2000, 0.95, seed=0)
    se = x.std() / np.sqrt(len(x))
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert (low + high) / 2 == pytest.approx(mean, abs=0.2 * se)


def test_coverage_of_a_known_mean():
    # 200 samples of 40 Bernoulli(0.3) outcomes: a 90% interval should cover 0.3 in about 90% of them
    rng = np.random.default_rng(42)
    covered = 0
    for i in range(200):
        _, low, high = bootstrap_ci(rng.random(40) < 0.3, 400, 0.9, seed=i)
        covered += low <= 0.3 <= high
    assert 0.80 <= covered / 200 <= 0.97


def test_many_resamples_are_chunked_without_changing_the_answer_shape():
    mean, low, high = bootstrap_ci(np.arange(5000) % 2, 1000, 0.95, seed=0)  # > one chunk of indices
    assert mean == 0.5 and low < 0.5 < high


# ----------------------------------------------------------------------------- win rate and rewards


def test_win_values_with_ties():
    dpo = [0.9, 0.5, 0.2, 0.7, 1.0]
    sft = [0.5, 0.5, 0.3, 0.7 + 1e-12, 0.0]
    assert win_values(dpo, sft) == [1.0, 0.5, 0.0, 0.5, 1.0]
    assert np.mean(win_values(dpo, sft)) == pytest.approx(3.0 / 5)
    with pytest.raises(ValueError):
        win_values([1.0], [1.0, 0.0])


def test_win_rate_interval_of_all_ties_is_one_half():
    assert bootstrap_ci(win_values([0.4] * 10, [0.4] * 10), 200, 0.95, seed=0) == (0.5, 0.5, 0.5)


def test_implicit_rewards_hand_computed():
    policy = torch.tensor([-10.0, -4.0])
    reference = torch.tensor([-12.0, -3.0])
    assert stats.implicit_rewards(policy, reference, beta=0.1).tolist() == pytest.approx([0.2, -0.1])


def test_response_length_excludes_the_closing_eos():
    assert generation.response_length([5, 6, 2], eos=[2]) == 2
    assert generation.response_length([5, 6, 7], eos=[2]) == 3  # ran out of max_new_tokens
    assert generation.response_length([], eos=[2]) == 0


# ----------------------------------------------------------------------------- eval prompts


def test_eval_prompts_dedupes_orders_by_id_and_cuts(tmp_path):
    def rec(rid, text):
        return {"id": rid, "prompt": [{"role": "user", "content": text}],
                "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}

    records = [rec("c", "three"), rec("a", "one"), rec("d", "one"), rec("b", "two")]
    path = tmp_path / "pref_eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [i for i, _ in judges.eval_prompts(str(path), 0)] == ["a", "b", "c"]
    assert judges.eval_prompts(str(path), 2) == [("a", records[1]["prompt"]), ("b", records[3]["prompt"])]


# ----------------------------------------------------------------------------- judges


def test_synthetic_judge_scores_the_last_user_message():
    judge = load_judge("synthetic")
    prompt = [{"role": "system", "content": "Be brief: 9 9"}, {"role": "user", "content": "Sort ascending: 3 1 2"}]
    assert judge(prompt, "1 2 3") == 1.0
    assert judge(prompt, "1 3 2") == pytest.approx(1 / 3)
    assert judge(prompt, "no idea") == 0.0


def test_function_judge_imports_package_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text("def length(prompt, response):\n    return len(response)\nNAME = 'x'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_judge("function", "my_judges:length")([{"role": "user", "content": "hi"}], "abcd") == 4.0
    with pytest.raises(JudgeError, match="my_judges:NAME.*not callable"):
        load_judge("function", "my_judges:NAME")
    with pytest.raises(JudgeError, match="my_judges:missing.*AttributeError"):
        load_judge("function", "my_judges:missing")


@pytest.mark.parametrize(
    ("kind", "path", "message"),
    [
        ("function", "no_such_module_xyz:fn", r"judge_path='no_such_module_xyz:fn': cannot import"),
        ("function", "just_a_module", r"judge_path='just_a_module': a function judge is 'package.module:function'"),
        ("reward_model", "", r"needs evaluate.judge_path"),
        ("reward_model", "/nonexistent/rm", r"judge_path='/nonexistent/rm': cannot load a reward model"),
        ("oracle", "", r"evaluate.judge='oracle'"),
    ],
)
def test_judge_loading_errors_name_the_judge_path(kind, path, message):
    with pytest.raises(JudgeError, match=message):
        load_judge(kind, path)


@pytest.mark.parametrize("num_labels", [1, 2])
def test_reward_model_judge_scores_with_a_sequence_classifier(tmp_path, num_labels):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from components.bootstrap import build_tokenizer
    from components.core import sorting as synthetic

    tok = build_tokenizer(synthetic.corpus(3, 4, 9, 0, n=100), 300)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=num_labels,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = load_judge("reward_model", str(tmp_path))
    prompt = [{"role": "user", "content": "Sort ascending: 3 1 2"}]
    a, b = judge(prompt, "1 2 3"), judge(prompt, "3 2 1")
    assert isinstance(a, float) and np.isfinite(a) and a != b
    assert judge(prompt, "1 2 3") == a  # deterministic (eval mode)


# ----------------------------------------------------------------------------- evaluate.summarise (pure)


def summarise_example(**overrides):
    from components.evaluate import summarise

    kwargs = dict(
        scores={"sft": [0.5, 1.0, 0.0], "dpo": [1.0, 1.0, 0.5]},
        lengths={"sft": [2, 4, 6], "dpo": [3, 3, 6]},
        logps={"sft": (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])),
               "dpo": (torch.tensor([-0.5, -1.0]), torch.tensor([-4.0, -3.0]))},
        ref_chosen=torch.tensor([-1.0, -2.0]), ref_rejected=torch.tensor([-3.0, -1.0]),
        kl_terms=torch.tensor([0.2, 0.4, 0.0]), beta=0.5, bootstrap_samples=200, confidence=0.9, seed=0,
        num_pairs=2, perplexity={"sft": 2.0, "dpo": 1.5}, exact_reward=True,
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


def test_register_maps_the_grpo_candidates_metrics_onto_the_gates_names(tmp_path):
    import json

    from components.register import read_eval_metrics

    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"eval/reward_mean": 0.8, "eval/kl_to_reference": 1.5, "eval/sft/reward_mean": 0.6,
                                "eval/num_prompts": 200, "eval/grpo/reward_mean": 0.7,
                                "eval/grpo/kl_to_reference": 2.5, "eval/grpo/length_ratio": 1.1}))
    assert read_eval_metrics(str(path), "dpo")["eval/reward_mean"] == 0.8
    grpo = read_eval_metrics(str(path), "grpo")
    assert grpo == {"eval/reward_mean": 0.7, "eval/kl_to_reference": 2.5, "eval/length_ratio": 1.1,
                    "eval/sft/reward_mean": 0.6, "eval/num_prompts": 200.0}
    path.write_text(json.dumps({"eval/reward_mean": 0.8}))
    with pytest.raises(FileNotFoundError, match="no eval/grpo"):
        read_eval_metrics(str(path), "grpo")


def test_summarise_without_exact_reward_or_perplexity_and_with_a_mute_sft():
    m = summarise_example(exact_reward=False, perplexity={}, lengths={"sft": [0, 0, 0], "dpo": [3, 3, 6]})
    assert "eval/reward_eq_1" not in m and "eval/perplexity" not in m
    assert m["eval/length_ratio"] == pytest.approx(4.0)  # an SFT length of 0 is floored at one token
