"""Environments and tool calls: parsing the Hermes / Qwen2.5 format, the default step, the embedded lockers,
loading a user's class (hand-written expectations)."""

from __future__ import annotations

import pytest

from components.core.algos import environments
from components.core.algos.environments import (
    Environment,
    LockerEnv,
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


QUESTION = {"id": "1", "messages": [{"role": "user", "content": "Ticket 4821: what is the code of locker 17?"}],
            "answer": "23"}


def test_the_default_step_runs_each_call_and_ends_on_a_turn_without_one():
    env = LockerEnv()
    env.reset(QUESTION)
    assert env.reward() == 0.0  # no answer yet
    step = env.step({"role": "assistant", "content": "", "tool_calls": [_call("open_locker", number=17)]})
    assert step == Step([{"role": "tool", "name": "open_locker", "content": "23"}], 0.0, False)
    assert env.step({"role": "assistant", "content": " 23 "}) == Step([], 0.0, True)
    assert (env.tool_calls, env.tool_failures, env.final, env.reward()) == (1, 0, " 23 ", 1.0)


def test_other_lockers_hold_other_codes_fixed_per_question():
    env = LockerEnv()
    env.reset(QUESTION)
    codes = [env.open_locker(n) for n in range(1, 31) if n != 17]
    assert codes == [env.open_locker(n) for n in range(1, 31) if n != 17]  # the same every time
    assert all(0 <= int(c) <= 30 for c in codes) and len(set(codes)) > 5


@pytest.mark.parametrize("answer,reward", [("23", 1.0), ("22", 0.0), ("23 is it", 0.0), ("", 0.0)])
def test_the_lockers_reward_the_exact_code_only(answer, reward):
    env = LockerEnv()
    env.reset(QUESTION)
    env.step({"role": "assistant", "content": answer})
    assert env.reward() == reward


@pytest.mark.parametrize("call,error", [(_call("open_door", number=1), "unknown tool 'open_door'"),
                                        (_call("open_locker", number="17"), "TypeError: number must be an integer"),
                                        (_call("open_locker", number=True), "TypeError: number must be an integer"),
                                        (_call("open_locker", number=99), "ValueError: there is no locker 99"),
                                        (_call("open_locker", locker=17), "TypeError")])
def test_a_failing_call_is_answered_with_the_error_and_counted(call, error):
    env = LockerEnv()
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
    assert load_environment("lockers") is LockerEnv
    assert load_environment(f"{__name__}:Counter") is Counter
    assert environments.environment_identity("lockers") == environments.environment_identity("lockers")
    assert len(environments.environment_identity("lockers")) == 16 and environments.environment_identity("") == ""


@pytest.mark.parametrize("spec,message", [("nope", "unknown environment"), ("nosuch.module:Env", "cannot import"),
                                          (f"{__name__}:_call", "not an environment class")])
def test_a_bad_environment_names_the_key(spec, message):
    with pytest.raises(CallableSpecError, match=rf"grpo.environment=.*{message}"):
        load_environment(spec)
