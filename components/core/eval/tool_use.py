"""Task success with and without an environment's tools, per policy: what the tool is worth, and what training
did to its use.

The held-out prompts are the environment's (`grpo.prompts` of the eval split: for `tools`, the held-out SFT records
that offer tools). Each is answered twice by each policy, on the same seeds for every policy:
- with the tools: an episode in the environment (core/train/episodes.py; the tools offered in the prompt, tool
  calls run, up to `max_turns` assistant turns in `max_new_tokens` tokens);
- without: the prompt as it is, one assistant turn of `max_new_tokens`.
Success is the environment's reward at 1 when it gives one (its `reward()`, on the final answer), else the judge's
score at its maximum (1.0: the synthetic judge's exact solve). Metrics per policy
`eval/<name>/tool/`: success and success_without_tool (each with a bootstrap CI), tool_gain (their paired
difference, CI), calls_per_episode; and for every policy but SFT, success_delta_vs_sft (paired over prompts, CI).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.core.algos.stats import bootstrap_ci
from components.core.data.tokens import prompt_ids_for_generation
from components.core.model.generation import eos_ids, load_causal_lm
from components.core.train import episodes, online

EVAL_ROUND = -2  # chunk seeds apart from training rounds (>= 0) and the online stages' held-out reward (-1)
SOLVED = 1.0 - 1e-9


@dataclass(frozen=True)
class ToolEval:
    """What to evaluate: the environment (`grpo.environment`), its turn limit and token budget, its prompts' kind."""

    environment: str
    max_turns: int
    max_new_tokens: int
    prompts: str = "pref"  # grpo.prompts: pref | sft | tools


def heldout_prompts(data_dir: str, spec: ToolEval, n: int) -> list[tuple[list[dict], str]]:
    """The first n held-out prompts of the environment's kind (0: all): (messages, the record's answer)."""
    found = online.read_prompts(online.prompt_file(data_dir, spec.prompts, "eval"), spec.prompts)
    return [(messages, answer) for _, messages, answer in (found[:n] if n else found)]


def succeeded(runner: episodes.EpisodeRunner, prompt: online.Prompt, completion: dict, judge) -> bool:
    """The environment's reward at 1 for the final answer (an episode's, or a direct answer stepped through a fresh
    environment); the judge's maximum when the environment gives no reward."""
    if "turns" in completion:
        reward = completion["end_reward"]
    else:  # a direct answer
        env = runner.env_class()
        env.reset({"id": prompt.id, "messages": prompt.messages, "answer": prompt.answer})
        env.step({"role": "assistant", "content": completion["text"]})
        reward = env.reward() if hasattr(env, "reward") else None
    return (reward if reward is not None else judge(prompt.messages, completion["text"])) >= SOLVED


def sample_policy(model_dir: str, prompts: list[tuple[list[dict], str]], spec: ToolEval, judge, *, temperature: float,
                  top_p: float, batch_size: int, seed: int) -> dict[str, list[float]]:
    """Per prompt: success with the tools, success without, tool calls made."""
    model, tokenizer = load_causal_lm(model_dir)
    runner = episodes.runner_for(spec.environment, tokenizer, spec.max_turns)
    sampling = online.Sampling(1, spec.max_new_tokens, max(temperature, 1e-5), top_p, batch_size,
                               eos_ids(model, tokenizer), tokenizer.pad_token_id)
    out: dict[str, list] = {"with": [], "without": [], "calls": []}
    for tools, key in ((True, "with"), (False, "without")):
        rendered = [online.Prompt(str(i), m, answer, runner.prompt_ids(m) if tools else
                                  prompt_ids_for_generation(tokenizer, m)) for i, (m, answer) in enumerate(prompts)]
        for c in range(0, len(rendered), batch_size):
            chunk, s = rendered[c: c + batch_size], online.chunk_seed(seed, EVAL_ROUND, int(tools), c // batch_size)
            with torch.no_grad():
                done = (runner.sample(model, chunk, sampling, s) if tools else online.sample_chunk(model, chunk, sampling, s))
            for p, completion in zip(chunk, done, strict=True):
                if not tools:
                    completion["text"] = tokenizer.decode(completion["ids"], skip_special_tokens=True).strip()
                out[key].append(float(succeeded(runner, p, completion, judge)))
                if tools:
                    out["calls"].append(float(completion["tool_calls"]))
    return out


def summarise(results: dict[str, dict[str, list[float]]], bootstrap_samples: int, confidence: float,
              seed: int) -> dict[str, float]:
    """eval/<name>/tool/... for every policy in `results` (sft first), CIs by percentile bootstrap over prompts."""
    metrics: dict[str, float] = {}
    sft = results["sft"]
    for name, r in results.items():
        p = f"eval/{name}/tool/"
        series = {"success": r["with"], "success_without_tool": r["without"],
                  "tool_gain": [a - b for a, b in zip(r["with"], r["without"], strict=True)]}
        if name != "sft":
            series["success_delta_vs_sft"] = [a - b for a, b in zip(r["with"], sft["with"], strict=True)]
        for key, values in series.items():
            mean, low, high = bootstrap_ci(values, bootstrap_samples, confidence, seed)
            metrics.update({p + key: mean, p + key + "_ci_low": low, p + key + "_ci_high": high})
        metrics[p + "calls_per_episode"] = sum(r["calls"]) / len(r["calls"])
    return metrics


def evaluate_tools(policies: dict[str, str], prompts: list[tuple[list[dict], str]], spec: ToolEval, judge, *,
                   temperature: float, top_p: float, batch_size: int, seed: int, bootstrap_samples: int,
                   confidence: float) -> dict:
    """Every policy's tool metrics (summarise)."""
    results = {name: sample_policy(d, prompts, spec, judge, temperature=temperature, top_p=top_p,
                                   batch_size=batch_size, seed=seed) for name, d in policies.items()}
    return summarise(results, bootstrap_samples, confidence, seed)

