"""Environments and tool calls: parsing the Hermes / Qwen2.5 format, the default step, the embedded sort tool,
loading a user's class (hand-written expectations)."""

from __future__ import annotations

import pytest

from components.core.algos import environments
from components.core.algos.environments import (
    Environment,
    SortToolEnv,
    Step,
    load_environment,
    parse_tool_calls,
)
from components.core.ops.callables import CallableSpecError


def test_parse_reads_calls_and_strips_them_from_the_content():
    text = 'Let me sort.<tool_call>{"name": "sort", "arguments": {"items": [3, 1]}}</tool_call>'
    content, calls, bad = parse_tool_calls(text)
    assert content == "Let me sort." and bad == 0
    assert calls == [{"type": "function", "function": {"name": "sort", "arguments": {"items": [3, 1]}}}]


def test_parse_accepts_json_string_arguments_newlines_and_several_calls():
    text = ('<tool_call>\n{"name": "a", "arguments": "{\\"x\\": 1}"}\n</tool_call>'
            '<tool_call>{"name": "b", "parameters": {}}</tool_call>')
    content, calls, bad = parse_tool_calls(text)
    assert content == "" and bad == 0
    assert [c["function"] for c in calls] == [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]


@pytest.mark.parametrize("body", ['{"name": "sort", "arguments": {"items": [3, 1]}', '{"arguments": {}}',
                                  '{"name": "sort", "arguments": [1, 2]}', 'sort 3 1'])
def test_unreadable_calls_are_counted_not_run(body):
    content, calls, bad = parse_tool_calls(f"x <tool_call>{body}</tool_call>")
    assert (content, calls, bad) == ("x", [], 1)


def test_plain_text_has_no_calls():
    assert parse_tool_calls("  1 2 3 ") == ("1 2 3", [], 0)


def _call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def test_the_default_step_runs_each_call_and_ends_on_a_turn_without_one():
    env = SortToolEnv()
    env.reset({"id": "1", "messages": [{"role": "user", "content": "Sort ascending: 3 1 2"}], "answer": "1 2 3"})
    step = env.step({"role": "assistant", "content": "", "tool_calls": [_call("sort", numbers="3 1 2")]})
    assert step == Step([{"role": "tool", "name": "sort", "content": "1 2 3"}], 0.0, False)
    assert env.step({"role": "assistant", "content": "1 2 3"}) == Step([], 0.0, True)
    assert (env.tool_calls, env.tool_failures, env.reward()) == (1, 0, None)


@pytest.mark.parametrize("call,error", [(_call("shuffle", numbers="1"), "unknown tool 'shuffle'"),
                                        (_call("sort", numbers="3 a"), "TypeError: numbers must be integers"),
                                        (_call("sort", numbers=[3, 1]), "TypeError: numbers must be integers"),
                                        (_call("sort", values="1"), "TypeError")])
def test_a_failing_call_is_answered_with_the_error_and_counted(call, error):
    env = SortToolEnv()
    env.reset({"id": "1", "messages": [], "answer": ""})
    (message,) = env.step({"role": "assistant", "content": "", "tool_calls": [call]}).messages
    assert message["role"] == "tool" and message["content"].startswith("error: ") and error in message["content"]
    assert (env.tool_calls, env.tool_failures) == (1, 1)


class Counter(Environment):
    tools = []

    def step(self, message):
        return Step([{"role": "user", "content": "again"}], reward=1.0)


def test_load_environment_by_name_or_module_path():
    assert load_environment("") is None
    assert load_environment("sort_tool") is SortToolEnv
    assert load_environment(f"{__name__}:Counter") is Counter
    assert environments.environment_identity("sort_tool") == environments.environment_identity("sort_tool")
    assert len(environments.environment_identity("sort_tool")) == 16 and environments.environment_identity("") == ""


@pytest.mark.parametrize("spec,message", [("nope", "unknown environment"), ("nosuch.module:Env", "cannot import"),
                                          (f"{__name__}:_call", "not an environment class")])
def test_a_bad_environment_names_the_key(spec, message):
    with pytest.raises(CallableSpecError, match=rf"grpo.environment=.*{message}"):
        load_environment(spec)
