"""The embedded default task: sort a short list of integers, and its programmatic reward.

Why this task: a model of a million parameters learns the *format* (numbers from the prompt, space
separated, then end of turn) within a few hundred SFT steps, and the reward is exact and cheap.
The task's definition lives here, apart from the stages that use it: `synthesize` writes data from it,
`bootstrap` trains the embedded tokenizer on its text, and the evaluation judge scores with `reward`.
"""

from __future__ import annotations

import random
import re

PHRASINGS = (
    "Sort ascending: {items}",
    "Sort these numbers from smallest to largest: {items}",
    "Put in increasing order: {items}",
    "Order the list {items} from low to high.",
)


MISTAKES = ("swap", "drop", "duplicate", "off_by_one", "unsorted")


_NUMBER = re.compile(r"-?\d+")


def make_prompt(rng: random.Random, min_items: int, max_items: int, max_value: int) -> tuple[str, list[int]]:
    items = [rng.randint(0, max_value) for _ in range(rng.randint(min_items, max_items))]
    text = rng.choice(PHRASINGS).format(items=" ".join(map(str, items)))
    return text, items


def solve(items: list[int]) -> str:
    return " ".join(map(str, sorted(items)))


def corrupt(items: list[int], rng: random.Random, max_value: int) -> str:
    """A wrong answer of a kind a small model makes; always differs from the correct one."""
    target = sorted(items)
    for _ in range(20):
        kind = rng.choice(MISTAKES)
        out = list(target)
        i = rng.randrange(len(out))
        if kind == "swap" and len(out) > 1:
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
        elif kind == "drop" and len(out) > 1:
            del out[i]
        elif kind == "duplicate":
            out.insert(i, out[i])
        elif kind == "off_by_one":
            out[i] = out[i] + 1 if out[i] < max_value else out[i] - 1
        elif kind == "unsorted":
            out = list(items)
        if out != target:
            return " ".join(map(str, out))
    return " ".join(map(str, target + [target[-1]]))  # duplicated last item: always wrong


def parse_items(prompt: str) -> list[int]:
    """The list in a task prompt (the numbers after the instruction)."""
    body = prompt.split(":", 1)[1] if ":" in prompt else prompt.replace("Order the list", "").split("from")[0]
    return [int(x) for x in _NUMBER.findall(body)]


def reward(prompt: str, response: str) -> float:
    """Programmatic reward in [0, 1]: share of positions matching the sorted list.

    Divided by the longer of the two lists, so dropped or extra items cost as much as wrong ones.
    1.0 only for the exact answer; anything unparsable (words, empty) scores 0.
    """
    target = sorted(parse_items(prompt))
    tokens = response.strip().split()
    if not target or not tokens or not all(_NUMBER.fullmatch(t) for t in tokens):
        return 0.0
    answer = [int(t) for t in tokens]
    hits = sum(a == b for a, b in zip(answer, target, strict=False))
    return hits / max(len(answer), len(target))


def generate(
    n_sft: int, n_preference: int, min_items: int, max_items: int, max_value: int, demo_noise: float, seed: int
) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    sft = []
    for _ in range(n_sft):
        prompt, items = make_prompt(rng, min_items, max_items, max_value)
        answer = corrupt(items, rng, max_value) if rng.random() < demo_noise else solve(items)
        sft.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    preferences = []
    for _ in range(n_preference):
        prompt, items = make_prompt(rng, min_items, max_items, max_value)
        preferences.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": solve(items)}],
                "rejected": [{"role": "assistant", "content": corrupt(items, rng, max_value)}],
            }
        )
    return sft, preferences


def corpus(min_items: int, max_items: int, max_value: int, seed: int, n: int = 2000) -> list[str]:
    """Text the embedded tokenizer is trained on: prompts and answers of the task."""
    sft, _ = generate(n, 0, min_items, max_items, max_value, 0.5, seed + 1)
    return [m["content"] for record in sft for m in record["messages"]]
