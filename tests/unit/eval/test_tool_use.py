"""eval/tool_use.summarise by hand: success with and without the tool, the gain and the delta vs SFT are paired
over prompts, each with a bootstrap CI."""

from __future__ import annotations

import pytest

from components.core.eval.tool_use import summarise


def test_summarise_by_hand():
    results = {"sft": {"with": [1.0, 0.0, 0.0, 1.0], "without": [0.0, 0.0, 0.0, 1.0], "calls": [1.0, 0.0, 0.0, 2.0]},
               "grpo": {"with": [1.0, 1.0, 1.0, 1.0], "without": [0.0, 1.0, 0.0, 0.0], "calls": [1.0, 1.0, 1.0, 1.0]}}
    m = summarise(results, bootstrap_samples=200, confidence=0.95, seed=0)
    assert m["eval/sft/tool/success"] == 0.5 and m["eval/sft/tool/success_without_tool"] == 0.25
    assert m["eval/sft/tool/tool_gain"] == 0.25 and m["eval/sft/tool/calls_per_episode"] == 0.75
    assert "eval/sft/tool/success_delta_vs_sft" not in m
    assert m["eval/grpo/tool/success"] == 1.0 and m["eval/grpo/tool/success_delta_vs_sft"] == 0.5
    assert m["eval/grpo/tool/success_ci_low"] == m["eval/grpo/tool/success_ci_high"] == 1.0  # no spread
    low, high = m["eval/grpo/tool/success_delta_vs_sft_ci_low"], m["eval/grpo/tool/success_delta_vs_sft_ci_high"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    assert m["eval/grpo/tool/tool_gain"] == pytest.approx(0.75)
