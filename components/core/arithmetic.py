"""The embedded tool task: multiply two 2-digit numbers, which the tiny model cannot do alone, with a calculator.

Why this task: a tool has to be worth calling. The sorting task's `sort` tool was not: the model sorts as well as it
copies, so its trained policy learned to stop calling the tool (benchmarks/README.md). A product of two numbers in
[12, 99] is a calculation a million-parameter model does not learn from a few thousand examples, while the call
(`multiply(a, b)`: two numbers copied from the prompt) and the answer (the tool's result copied) are easy. Success
with the tool against success without it is then what the tool is worth, and what RL makes of it.

`tool_demos` writes SFT demonstrations in the public formats (TRL `messages` + `tools`, OpenAI tool calls); the
`calculator` environment (core/algos/environments.py) offers the tool and scores the final answer with `correct`.
"""

from __future__ import annotations

import random
import re

LOW, HIGH = 12, 99  # factors: 2-digit, products of 3 or 4 digits

PHRASINGS = (
    "What is {a} times {b}?",
    "Multiply {a} by {b}.",
    "Compute {a} x {b}.",
)

MULTIPLY_TOOL = {
    "type": "function",
    "function": {
        "name": "multiply",
        "description": "Multiply two integers.",
        "parameters": {"type": "object",
                       "properties": {"a": {"type": "integer", "description": "The first factor."},
                                      "b": {"type": "integer", "description": "The second factor."}},
                       "required": ["a", "b"]},
    },
}
TOOLS_LINE = "Tools: multiply(a, b)"  # how the embedded template renders [MULTIPLY_TOOL]

_NUMBER = re.compile(r"-?\d+")


def make_prompt(rng: random.Random) -> tuple[str, int, int]:
    a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
    return rng.choice(PHRASINGS).format(a=a, b=b), a, b


def factors(prompt: str) -> tuple[int, int] | None:
    """The two numbers a task prompt asks to multiply; None when it is not one."""
    numbers = [int(x) for x in _NUMBER.findall(prompt)]
    return (numbers[0], numbers[1]) if len(numbers) == 2 else None


def correct(prompt: str, answer: str) -> bool:
    """The answer is exactly the product (surrounding whitespace ignored)."""
    ab = factors(prompt)
    return ab is not None and answer.strip() == str(ab[0] * ab[1])


def tool_call_text(a: int, b: int) -> str:
    """A multiply call as the embedded template renders it (Hermes / Qwen2.5 `<tool_call>` JSON)."""
    return '<tool_call>{"name": "multiply", "arguments": {"a": ' + str(a) + ', "b": ' + str(b) + "}}</tool_call>"


def tool_demos(n: int, call_share: float, seed: int) -> list[dict]:
    """SFT demonstrations with the calculator offered: a share `call_share` calls it and copies its result; the rest
    answer directly (the right product: what a model that guesses would have to know). Its own random stream."""
    rng = random.Random(seed * 7 + 3)
    out = []
    for _ in range(n):
        prompt, a, b = make_prompt(rng)
        user = {"role": "user", "content": prompt}
        if rng.random() < call_share:
            call = {"type": "function", "function": {"name": "multiply", "arguments": {"a": a, "b": b}}}
            messages = [user, {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "name": "multiply", "content": str(a * b)},
                        {"role": "assistant", "content": str(a * b)}]
        else:
            messages = [user, {"role": "assistant", "content": str(a * b)}]
        out.append({"messages": messages, "tools": [MULTIPLY_TOOL]})
    return out


def corpus(seed: int, n: int = 1000) -> list[str]:
    """Text of the tool task as the embedded template renders it, for the embedded tokenizer."""
    rng = random.Random(seed + 2)
    texts = []
    for _ in range(n):
        prompt, a, b = make_prompt(rng)
        texts += [TOOLS_LINE, prompt, tool_call_text(a, b), f"tool\n{a * b}"]
    return texts
