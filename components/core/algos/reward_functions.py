"""Reward functions for online RL with verifiable rewards (grpo, ppo/rloo with `reward: functions`).

A reward function scores one completion: fn(prompt messages, completion text, answer) -> float, where `answer` is
the record's reference answer (the chosen / assistant text of the prompt's record; "" when none). The online stages
pick and weight them with `<stage>.rewards`. Each has an identity, the hash of its source: it is part of the
checkpoint fingerprint and of every scored rollout row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from components.core.ops.callables import import_callable


def last_user_text(prompt: Sequence[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")

RewardFn = Callable[[list[dict], str, str], float]

_NUMBER = r"-?\d+(?:\.\d+)?"

def sorting_reward(prompt: list[dict], completion: str, answer: str) -> float:
    """The embedded task's score in [0, 1] (components/core/sorting.py): share of positions right."""
    from components.core import sorting

    return sorting.reward(last_user_text(prompt), completion)

def exact_match_reward(prompt: list[dict], completion: str, answer: str) -> float:
    """1.0 when the completion equals the reference answer (surrounding whitespace ignored), else 0.0."""
    return float(bool(answer.strip()) and completion.strip() == answer.strip())

def format_reward(prompt: list[dict], completion: str, answer: str) -> float:
    """1.0 for the DeepSeek-R1 layout `<think>...</think> <answer>...</answer>`, else 0.0."""
    import re

    return float(re.fullmatch(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", completion, re.DOTALL) is not None)

def final_number(text: str) -> str | None:
    """The answer a GSM8K-style text gives: after `####`, else in the last \\boxed{}, else its last number."""
    import re

    for pattern in (r"####\s*(" + _NUMBER + ")", r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"):
        found = re.findall(pattern, text.replace(",", ""))
        if found:
            return found[-1]
    numbers = re.findall(_NUMBER, text.replace(",", ""))
    return numbers[-1] if numbers else None

def numeric_reward(prompt: list[dict], completion: str, answer: str) -> float:
    """1.0 when the completion's final number equals the reference answer's (GSM8K `#### 42`, \\boxed{42}, or
    the last number), else 0.0. Uses `math-verify` for the comparison when it is installed."""
    want, got = final_number(answer), final_number(completion)
    if want is None or got is None:
        return 0.0
    try:
        from math_verify import parse, verify  # optional: symbolic equivalence (1/2 == 0.5, ...)

        return float(verify(parse(want), parse(got)))
    except ImportError:
        return float(abs(float(want) - float(got)) < 1e-9)

REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "sorting": sorting_reward,
    "exact_match": exact_match_reward,
    "format": format_reward,
    "numeric": numeric_reward,
}

def load_reward_function(name: str) -> RewardFn:
    """A registered reward by name, or `package.module:function` (same signature) for your own."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    return import_callable(name, "grpo.rewards", f"unknown reward; expected one of {sorted(REWARD_FUNCTIONS)} "
                                                 "or 'package.module:function'")

def reward_identity(name: str) -> str:
    """Hash of the reward's source (and, for `sorting`, of the task module it scores with)."""
    import hashlib
    import inspect
    import sys

    fn = load_reward_function(name)
    h = hashlib.sha256(inspect.getsource(fn).encode())
    if fn is sorting_reward:
        from components.core import sorting

        h.update(inspect.getsource(sys.modules[sorting.__name__]).encode())
    return h.hexdigest()[:16]


def load_rewards(specs, tokenizer=None) -> tuple[dict[str, RewardFn], dict[str, float], dict[str, str]]:
    """(functions, weights, identities) of a stage's `rewards` entries: a registered or `package.module:function`
    reward by name, or a remote one where the entry has a `url` (core/algos/remote_reward.py; `tokenizer` renders
    its prompts for the OpenRLHF request fields)."""
    from components.core.algos.remote_reward import RemoteReward
    from components.core.data.tokens import render

    fns: dict[str, RewardFn] = {}
    ids: dict[str, str] = {}
    for spec in specs:
        if getattr(spec, "url", None):
            fn = RemoteReward(spec.name, spec.url, spec.timeout_s, spec.retries, spec.batch_size)
            if tokenizer is not None:
                fn.render = lambda prompt: render(tokenizer, prompt, add_generation_prompt=True)
            fns[spec.name], ids[spec.name] = fn, fn.identity
        else:
            fns[spec.name], ids[spec.name] = load_reward_function(spec.name), reward_identity(spec.name)
    return fns, {spec.name: spec.weight for spec in specs}, ids


def seed_caches(reward_fns: dict[str, RewardFn], work_dir) -> None:
    """Remote rewards: keep their scores in this run's rollouts dir and read back what is there (a resume asks
    nothing twice)."""
    for fn in reward_fns.values():
        if hasattr(fn, "attach"):
            fn.attach(work_dir)
