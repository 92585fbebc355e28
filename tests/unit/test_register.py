"""register: the candidate's metrics under the gate's names."""

from __future__ import annotations

import json

import pytest


def test_register_maps_the_grpo_candidates_metrics_onto_the_gates_names(tmp_path):

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
