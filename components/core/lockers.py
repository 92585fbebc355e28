"""The embedded tool task: tell a locker's code, which only a lookup can give, with an `open_locker` tool.

Why this task: a tool has to be worth calling, and the tiny model has to be able to learn to call it. Two tools came
first and were measured (benchmarks/README.md): `sort` on the sorting task was not worth calling (the model sorts as
well as it copies; GRPO learned to stop calling it), and `multiply` on products of two numbers was worth calling but
not learnable at this size (the model did not learn to copy a rare product token from the tool's answer). Here the
code is drawn at random for each question, so nothing in the prompt tells it: without the tool a model guesses (1 in
31), with it the call copies one number from the prompt and the answer copies one number from the tool's result,
both in the sorting task's range (0 to 30), whose tokens the model knows.

A question: "Ticket 4821: what is the code of locker 17?" (the ticket makes each question its own); its record's
answer is the code. `tool_demos` writes SFT demonstrations in the public formats (TRL `messages` + `tools`, OpenAI
tool calls); the `lockers` environment (core/algos/environments.py) holds the codes and scores the final answer.
"""

from __future__ import annotations

import random
import re

MAX_LOCKER, MAX_CODE = 30, 30

PHRASINGS = (
    "Ticket {t}: what is the code of locker {n}?",
    "Ticket {t}: open locker {n} and tell me its code.",
    "Ticket {t}: which code is in locker {n}?",
)

OPEN_LOCKER_TOOL = {
    "type": "function",
    "function": {
        "name": "open_locker",
        "description": "Open a locker and read the code inside.",
        "parameters": {"type": "object",
                       "properties": {"number": {"type": "integer", "description": "The locker's number."}},
                       "required": ["number"]},
    },
}
TOOLS_LINE = "Tools: open_locker(number)"  # how the embedded template renders [OPEN_LOCKER_TOOL]

_LOCKER = re.compile(r"locker (\d+)")


def make_question(rng: random.Random) -> tuple[str, int, int]:
    """(question, locker, its code)."""
    ticket, locker, code = rng.randint(1000, 9999), rng.randint(1, MAX_LOCKER), rng.randint(0, MAX_CODE)
    return rng.choice(PHRASINGS).format(t=ticket, n=locker), locker, code


def locker_of(question: str) -> int | None:
    found = _LOCKER.search(question)
    return int(found.group(1)) if found else None


def other_code(question: str, locker: int) -> int:
    """The code in a locker the question does not ask about (fixed per question and locker)."""
    return random.Random(f"{question}|{locker}").randint(0, MAX_CODE)


def tool_call_text(locker: int) -> str:
    """An open_locker call as the embedded template renders it (Hermes / Qwen2.5 `<tool_call>` JSON)."""
    return '<tool_call>{"name": "open_locker", "arguments": {"number": ' + str(locker) + "}}</tool_call>"


def tool_demos(n: int, call_share: float, seed: int) -> list[dict]:
    """SFT demonstrations with the tool offered: a share `call_share` opens the locker and copies the code; the rest
    answer directly (with the right code: a demonstrator who knew it, which no model can learn). Its own random
    stream."""
    rng = random.Random(seed * 7 + 3)
    out = []
    for _ in range(n):
        question, locker, code = make_question(rng)
        user = {"role": "user", "content": question}
        if rng.random() < call_share:
            call = {"type": "function", "function": {"name": "open_locker", "arguments": {"number": locker}}}
            messages = [user, {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "name": "open_locker", "content": str(code)},
                        {"role": "assistant", "content": str(code)}]
        else:
            messages = [user, {"role": "assistant", "content": str(code)}]
        out.append({"messages": messages, "tools": [OPEN_LOCKER_TOOL]})
    return out


def corpus(seed: int, n: int = 1000) -> list[str]:
    """Text of the tool task as the embedded template renders it, for the embedded tokenizer."""
    rng = random.Random(seed + 2)
    texts = []
    for _ in range(n):
        question, locker, code = make_question(rng)
        texts += [TOOLS_LINE, question, tool_call_text(locker), f"tool\n{code}"]
    return texts
