"""Judges: callables (prompt messages, response text) -> score, higher is better.

evaluate scores every policy's samples with one, and `alignflow promote` re-scores champion and
challenger with the same one. `load_judge(kind, path)` builds it from `evaluate.judge` / `judge_path`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch

from components.core.tokens import render

Judge = Callable[[list[dict], str], float]


class JudgeError(ValueError):
    """The configured judge cannot be loaded; the message names judge / judge_path."""


def last_user_text(prompt: Sequence[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def _synthetic_judge(prompt: list[dict], response: str) -> float:
    from components.core import sorting

    return sorting.reward(last_user_text(prompt), response)


def _reward_model_judge(path: str) -> Judge:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not path:
        raise JudgeError("evaluate.judge=reward_model needs evaluate.judge_path (a sequence-classification checkpoint dir)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # OSError, ValueError, ... : whatever it is, say which path failed
        raise JudgeError(f"evaluate.judge_path={path!r}: cannot load a reward model from it ({type(e).__name__}: {e})") from e
    num_labels = model.config.num_labels
    if num_labels not in (1, 2):
        raise JudgeError(f"evaluate.judge_path={path!r}: reward model has {num_labels} labels; expected 1 (score) or 2")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    column = 0 if num_labels == 1 else 1  # 2 labels: the logit of the positive ("preferred") class

    @torch.no_grad()
    def judge(prompt: list[dict], response: str) -> float:
        text = render(tokenizer, list(prompt) + [{"role": "assistant", "content": response}])
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt", truncation=True)
        return float(model(**enc.to(device)).logits[0, column])

    return judge


def import_callable(spec: str, key: str, malformed: str) -> Callable:
    """`package.module:function` imported; a JudgeError naming the params key `key` otherwise."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise JudgeError(f"{key}={spec!r}: {malformed}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise JudgeError(f"{key}={spec!r}: cannot import it ({type(e).__name__}: {e})") from e
    if not callable(fn):
        raise JudgeError(f"{key}={spec!r}: {attr} is not callable")
    return fn


def _function_judge(path: str) -> Judge:
    fn = import_callable(path, "evaluate.judge_path", "a function judge is 'package.module:function'")

    def judge(prompt: list[dict], response: str) -> float:
        return float(fn(prompt, response))

    return judge


def load_judge(kind: str, path: str = "") -> Judge:
    """A callable (prompt messages, response text) -> score, higher is better.

    synthetic: the embedded task's programmatic reward in [0, 1] (on the last user message).
    reward_model: an AutoModelForSequenceClassification dir; scores the conversation rendered with its
      tokenizer's chat template; logit 0 (one label) or the positive-class logit (two labels).
    function: `package.module:function` taking (prompt_messages, response_text).
    """
    if kind == "synthetic":
        return _synthetic_judge
    if kind == "reward_model":
        return _reward_model_judge(path)
    if kind == "function":
        return _function_judge(path)
    raise JudgeError(f"evaluate.judge={kind!r}: expected synthetic, reward_model or function")


# ----------------------------------------------------------------------------- reward functions (online RL)
#
# A reward function scores one completion: fn(prompt messages, completion text, answer) -> float, where
# `answer` is the record's reference answer (the chosen / assistant text of the prompt's record; "" when
# none). The grpo stage picks and weights them with `grpo.rewards`. Each has an identity, the hash of its
# source: it is part of the grpo checkpoint fingerprint and of every scored rollout row.

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
