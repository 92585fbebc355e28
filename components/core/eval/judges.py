"""Judges: callables (prompt messages, response text) -> score, higher is better, and the held-out prompts they judge.

evaluate scores every policy's samples with one, and `alignflow promote` re-scores champion and challenger with
the same one (`score_prompts`: the same samples for the same model, prompts and seed). `load_judge(kind, path)`
builds it from `evaluate.judge` / `judge_path`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from components.core.algos.reward_functions import last_user_text
from components.core.data.tokens import render
from components.core.model.generation import generate_responses, load_causal_lm
from components.core.ops.callables import CallableSpecError, import_callable
from components.core.ops.io import read_jsonl

Judge = Callable[[list[dict], str], float]

class JudgeError(ValueError):
    """The configured judge cannot be loaded; the message names judge / judge_path."""

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
    try:
        fn = import_callable(path, "evaluate.judge_path", "a function judge is 'package.module:function'")
    except CallableSpecError as e:
        raise JudgeError(str(e)) from e

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

def score_prompts(
    model_dir: str, prompts: list[list[dict]], judge: Judge, *, max_new_tokens: int, temperature: float,
    top_p: float, batch_size: int, seed: int,
) -> tuple[list[str], list[float]]:
    """Load the model in model_dir, generate one response per prompt, and judge each."""
    model, tokenizer = load_causal_lm(model_dir)
    texts = generate_responses(model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size, seed,
                               desc=f"generate {Path(model_dir).name}")
    return texts, [judge(p, t) for p, t in zip(prompts, texts, strict=True)]

def eval_prompts(pref_eval_path: str, num_prompts: int) -> list[tuple[str, list[dict]]]:
    """Held-out prompts (id, prompt messages): one per distinct prompt, ordered by record id, first num_prompts.

    Ordering by id (a content hash) makes the subset independent of file order and a fair sample of
    the file when num_prompts is smaller than it; 0 means all.
    """
    seen: set[str] = set()
    out: list[tuple[str, list[dict]]] = []
    for record in sorted(read_jsonl(pref_eval_path), key=lambda r: str(r["id"])):
        key = json.dumps(record["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((str(record["id"]), record["prompt"]))
    return out[:num_prompts] if num_prompts else out
