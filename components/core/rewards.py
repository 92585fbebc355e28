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


def _function_judge(path: str) -> Judge:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise JudgeError(f"evaluate.judge_path={path!r}: a function judge is 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise JudgeError(f"evaluate.judge_path={path!r}: cannot import it ({type(e).__name__}: {e})") from e
    if not callable(fn):
        raise JudgeError(f"evaluate.judge_path={path!r}: {attr} is not callable")

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
