"""Environments for multi-turn online RL: tools the policy calls through its chat template, rewards at the end.

An environment is a class; the online stage makes one instance per rollout (episode):
- `tools`: the JSON schemas it offers (OpenAI / transformers format); the chat template renders them into the prompt.
- `reset(prompt)`: a new episode from a prompt record, {"id", "messages", "answer"}.
- `step(message)`: the policy's assistant message ({"role", "content", "tool_calls"?}) in, a `Step` out: the
  messages that follow it (tool results, or a user turn) and a per-step reward; `done` or no messages ends the
  episode. The default runs each tool call on the method of the same name and answers with `tool` messages; an
  assistant turn without tool calls ends it.
- `reward()`: a reward at the end (None: the stage's reward functions alone score the final answer). The per-step
  rewards plus this one are the completion's `environment` reward, added to the reward functions' sum.
- `max_turns`: assistant turns per episode (the stage's `max_turns` param when None).
A tool call the environment cannot run (unknown name, bad arguments, the tool raising) gets a `tool` message that
says so, the episode goes on, and the failure is counted: the policy learns from it as TRL's tool loop lets it.

`lockers` (LockerEnv) is the embedded one: the tool task of core/lockers.py (tell a locker's code) with an
`open_locker` tool, which the tiny model can learn to call (`synthetic.tool_demos`) and cannot do without; it
rewards the exact code as the final answer. Your own: `grpo.environment: package.module:Class`.
Tool calls are read in the Hermes / Qwen2.5 format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, which
the embedded template writes and Qwen2.5/3, SmolLM3 and Hermes models emit.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import sys
from dataclasses import dataclass, field

from components.core import lockers
from components.core.ops.callables import import_callable

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict], int]:
    """(content without the calls, OpenAI-style tool calls {"type", "function": {"name", "arguments"}}, how many
    `<tool_call>` blocks could not be read: not JSON, no name, or arguments not an object)."""
    calls, bad = [], 0
    for body in _CALL.findall(text):
        try:
            call = json.loads(body)
            name, arguments = call["name"], call.get("arguments", call.get("parameters", {}))
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            if not isinstance(name, str) or not isinstance(arguments, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        calls.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    return _CALL.sub("", text).strip(), calls, bad


@dataclass
class Step:
    messages: list[dict] = field(default_factory=list)  # what follows the assistant turn; none: the episode ends
    reward: float = 0.0
    done: bool = False


class Environment:
    """The base: tools are the methods named by `tools`' schemas; an assistant turn without tool calls ends."""

    tools: list[dict] = []
    max_turns: int | None = None

    def reset(self, prompt: dict) -> None:
        self.prompt = prompt
        self.tool_calls = 0
        self.tool_failures = 0
        self.final: str | None = None  # the answer: the content of the turn that ended the episode

    def step(self, message: dict) -> Step:
        calls = message.get("tool_calls") or []
        if not calls:
            self.final = message.get("content") or ""
            return Step(done=True)
        return Step([self.call(c["function"]["name"], c["function"]["arguments"]) for c in calls])

    def call(self, name: str, arguments: dict) -> dict:
        """One tool call answered as a `tool` message; a failure is answered too (and counted)."""
        self.tool_calls += 1
        offered = {t.get("function", t)["name"] for t in self.tools}
        try:
            if name not in offered:
                raise ValueError(f"unknown tool {name!r}")
            content = str(getattr(self, name)(**arguments))
        except Exception as e:  # the policy's arguments are untrusted input: report, do not crash the run
            self.tool_failures += 1
            content = f"error: {type(e).__name__}: {e}"
        return {"role": "tool", "name": name, "content": content}

    def reward(self) -> float | None:
        return None


class LockerEnv(Environment):
    """The embedded tool task (core/lockers.py): `open_locker(number)` reads a locker's code (the asked one's is the
    question's answer, the others are fixed per question); reward 1 for the asked locker's code as the final answer."""

    tools = [lockers.OPEN_LOCKER_TOOL]

    def open_locker(self, number: int) -> str:
        if not isinstance(number, int) or isinstance(number, bool):
            raise TypeError("number must be an integer")
        question = self._question()
        if number == lockers.locker_of(question):
            return str(self.prompt["answer"]).strip()
        if not 1 <= number <= lockers.MAX_LOCKER:
            raise ValueError(f"there is no locker {number}")
        return str(lockers.other_code(question, number))

    def reward(self) -> float | None:
        return float(self.final is not None and self.final.strip() == str(self.prompt["answer"]).strip())

    def _question(self) -> str:
        return next((m["content"] for m in reversed(self.prompt["messages"]) if m["role"] == "user"), "")


ENVIRONMENTS = {"lockers": LockerEnv}


def load_environment(spec: str, key: str = "grpo.environment") -> type[Environment] | None:
    """The environment class a params value names: "" = none (single-turn), a registered name, or
    `package.module:Class` (a class with reset / step, like `Environment`)."""
    if not spec:
        return None
    if spec in ENVIRONMENTS:
        return ENVIRONMENTS[spec]
    cls = import_callable(spec, key, f"unknown environment; expected one of {sorted(ENVIRONMENTS)} or "
                                     "'package.module:Class'")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if not isinstance(cls, type) or missing:
        from components.core.ops.callables import CallableSpecError

        raise CallableSpecError(f"{key}={spec!r}: not an environment class (needs reset and step methods)")
    return cls


def environment_identity(spec: str) -> str:
    """Hash of the environment's source module (part of the checkpoint fingerprint and of every rollout row)."""
    cls = load_environment(spec)
    if cls is None:
        return ""
    return hashlib.sha256(inspect.getsource(sys.modules[cls.__module__]).encode()).hexdigest()[:16]
