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


def test_heldout_prompts_of_the_tools_kind_stop_before_the_first_assistant_turn(tmp_path):
    import json

    from components.core.eval.tool_use import ToolEval, heldout_prompts

    user = {"role": "user", "content": "Ticket 4821: what is the code of locker 17?"}
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "open_locker", "arguments": {"number": 17}}}]}
    tools = [{"name": "open_locker"}]
    records = [{"id": "a", "messages": [user, call, {"role": "tool", "content": "23"},
                                        {"role": "assistant", "content": "23"}], "tools": tools},
               {"id": "b", "messages": [{"role": "user", "content": "Sort: 2 1"}, {"role": "assistant", "content": "1 2"}]},
               {"id": "c", "messages": [user, {"role": "assistant", "content": "23"}], "tools": tools}]
    (tmp_path / "sft_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert heldout_prompts(str(tmp_path), ToolEval("lockers", 3, 32, "tools"), 0) == [([user], "23")]  # deduplicated
    assert heldout_prompts(str(tmp_path), ToolEval("lockers", 3, 32, "sft"), 1) == [
        ([user, call, records[0]["messages"][2]], "23")]


def test_success_is_the_environments_reward_else_the_judges():
    from components.core.algos.environments import Environment, LockerEnv
    from components.core.eval.tool_use import succeeded
    from components.core.train.episodes import EpisodeRunner
    from components.core.train.online import Prompt

    question = Prompt("q", [{"role": "user", "content": "Ticket 4821: what is the code of locker 17?"}], "23", [])
    lockers, plain = EpisodeRunner(LockerEnv, None, 3), EpisodeRunner(Environment, None, 3)
    never, always = (lambda m, t: 0.0), (lambda m, t: 1.0)
    assert succeeded(lockers, question, {"text": "23"}, never)  # a direct answer, stepped through the env
    assert not succeeded(lockers, question, {"text": "22"}, always)
    assert succeeded(lockers, question, {"text": "x", "turns": [], "end_reward": 1.0}, never)  # an episode's
    assert succeeded(plain, question, {"text": "x"}, always) and not succeeded(plain, question, {"text": "x"}, never)
