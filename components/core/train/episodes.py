"""Multi-turn rollouts: the policy talks to an environment (core/algos/environments.py) and its tools.

A completion here is an episode: the tokens after the prompt, turn after turn. Assistant turns are sampled by the
policy (their tokens trained: mask 1, the sampler's log-probs kept); between them come the environment's messages
(tool results), rendered by the chat template and masked out (mask 0, log-prob 0): the loss sees every
assistant token and nothing else. The episode ends when the environment says so (an assistant turn without a tool
call, by default), at the turn limit, or when `max_completion_length` (all turns' tokens together) runs out, then
it is `truncated`. Its final assistant message is what the reward functions score; the environment's per-step and
final rewards are the `environment` reward.

Each turn's assistant tokens are sampled exactly as a single-turn completion (online.sample_chunk): the first turn
shares each prompt's prefix over its G rows, later turns run each episode's own context; seeds are per chunk and
turn, so an episode is the same on any number of processes and after a resume. Environment messages are the text
the template adds after the turn's end token (render with them minus render without them), tokenised on their own:
the sampled tokens are never re-tokenised.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch

from components.core.algos.environments import environment_identity, load_environment, parse_tool_calls
from components.core.data.tokens import chat_markers, prompt_ids_for_generation, render
from components.core.train import online


@dataclass
class _Episode:
    prompt: online.Prompt
    env: object
    ids: list[int]
    mask: list[int]
    logps: list[float]
    truncated: bool
    start: int = 0  # where the current assistant turn's tokens begin
    turns: list[dict] = field(default_factory=list)
    reward: float = 0.0
    bad_calls: int = 0
    done: bool = False


@dataclass(frozen=True)
class EpisodeRunner:
    """Samples episodes for online.generate_groups (`Sampling.episodes`): one environment instance per row."""

    env_class: type
    tokenizer: object
    max_turns: int

    @property
    def tools(self) -> list[dict]:
        return list(getattr(self.env_class, "tools", []) or [])

    @functools.cached_property
    def turn_end(self) -> str:
        """The text the chat template closes a turn with (`<|im_end|>` in ChatML; "" when it cannot be learned)."""
        return (chat_markers(self.tokenizer) or {}).get("suffix") or ""

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return prompt_ids_for_generation(self.tokenizer, messages, self.tools)

    @torch.no_grad()
    def sample(self, model, prompts: list[online.Prompt], sampling: online.Sampling, seed: int,
               synced: bool = False) -> list[dict]:
        G, budget = sampling.num_generations, sampling.max_completion_length
        first = online.sample_chunk(model, prompts, sampling, seed, synced)
        episodes = []
        for i, c in enumerate(first):
            p = prompts[i // G]
            env = self.env_class()
            env.reset({"id": p.id, "messages": p.messages, "answer": p.answer})
            episodes.append(_Episode(p, env, list(c["ids"]), [1] * len(c["ids"]), list(c["sampler_logps"]),
                                     c["truncated"]))
        max_turns = getattr(self.env_class, "max_turns", None) or self.max_turns
        for turn in range(1, max_turns + 1):
            active = [e for e in episodes if not self._after_turn(e, turn == max_turns, budget)]
            if not active:
                break
            contexts = [online.Prompt(e.prompt.id, [], "", e.prompt.ids + e.ids) for e in active]
            room = max(budget - len(e.ids) for e in active)
            turn_sampling = replace(sampling, num_generations=1, max_completion_length=room)
            for e, c in zip(active, online.sample_chunk(model, contexts, turn_sampling, turn_seed(seed, turn), synced),
                            strict=True):
                new = c["ids"][: budget - len(e.ids)]
                e.start = len(e.ids)
                e.ids += new
                e.mask += [1] * len(new)
                e.logps += c["sampler_logps"][: len(new)]
                e.truncated = not new or new[-1] not in sampling.eos
        return [self._completion(e) for e in episodes]

    def _after_turn(self, e: _Episode, last: bool, budget: int) -> bool:
        """Reads the assistant turn just sampled, steps the environment and appends its messages. Returns whether
        the episode is over."""
        if e.done:
            return True
        segment = e.ids[e.start:]
        content, calls, bad = parse_tool_calls(self.tokenizer.decode(segment, skip_special_tokens=True))
        message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
        e.turns.append(message)
        e.bad_calls += bad
        if e.truncated:  # cut by the length budget mid-turn: no more turns
            e.done = True
            return True
        step = e.env.step(message)
        e.reward += float(step.reward)
        if step.done or not step.messages or last:
            e.done = True
            return True
        suffix = self.suffix_ids(e.prompt.messages + e.turns, step.messages)
        if len(e.ids) + len(suffix) >= budget:  # no room for the results and another turn
            e.truncated = e.done = True
            return True
        e.ids += suffix
        e.mask += [0] * len(suffix)
        e.logps += [0.0] * len(suffix)
        e.turns += step.messages
        return False

    def suffix_ids(self, conversation: list[dict], messages: list[dict]) -> list[int]:
        """The tokens the chat template puts after an assistant turn's end-of-turn text (`<|im_end|>` in ChatML,
        which the sampled turn ended with) up to the next assistant turn: `messages` (the environment's) and the
        generation prompt."""
        before = render(self.tokenizer, conversation, tools=self.tools)
        after = render(self.tokenizer, conversation + messages, add_generation_prompt=True, tools=self.tools)
        if not after.startswith(before):
            raise ValueError("chat template is not prefix-stable: cannot append tool results to an episode")
        turn_end = self.turn_end
        end = before.rfind(turn_end) if turn_end else -1
        tail = after[end + len(turn_end):] if end >= 0 else after[len(before):]
        return self.tokenizer(tail, add_special_tokens=False)["input_ids"]

    def _completion(self, e: _Episode) -> dict:
        final = next((m for m in reversed(e.turns) if m["role"] == "assistant"), {"content": ""})
        end_reward = getattr(e.env, "reward", lambda: None)()  # None: the environment scores nothing at the end
        return {"ids": e.ids, "sampler_logps": e.logps, "truncated": e.truncated, "mask": e.mask, "turns": e.turns,
                "text": final.get("content") or "", "env_reward": e.reward + float(end_reward or 0.0),
                "end_reward": end_reward,
                "tool_calls": sum(len(m.get("tool_calls", [])) for m in e.turns) + e.bad_calls,
                "tool_failures": int(getattr(e.env, "tool_failures", 0)) + e.bad_calls}


def runner_for(spec: str, tokenizer, max_turns: int) -> EpisodeRunner | None:
    """The episode runner of a stage's `environment` param; None for "" (single-turn completions)."""
    env_class = load_environment(spec)
    return None if env_class is None else EpisodeRunner(env_class, tokenizer, max_turns)


def reward_identity(spec: str) -> dict[str, str]:
    """{"environment": the hash of its code} with an environment (its reward is one of the completion's), else {}."""
    return {"environment": environment_identity(spec)} if spec else {}


def turn_seed(seed: int, turn: int) -> int:
    return (seed * 7919 + turn) % (2**63)


def token_mask(completions: list[dict], shape: tuple[int, int], device) -> torch.Tensor:
    """(B, T) bool: which completion tokens the policy sampled (1) and which the environment wrote (0); a
    single-turn completion's are all 1."""
    out = torch.zeros(shape, dtype=torch.bool)
    for i, c in enumerate(completions):
        m = c.get("mask") or [1] * len(c["ids"])
        out[i, : len(m)] = torch.tensor(m[: shape[1]], dtype=torch.bool)
    return out.to(device)


def trained_tokens(completion: dict) -> int:
    """How many of a completion's tokens carry loss: the policy's own."""
    return sum(completion["mask"]) if "mask" in completion else len(completion["ids"])


def metrics(completions: list[dict]) -> dict:
    """A round's tool use (TRL's names): tool calls and failed calls per completion, turns per episode. Empty for
    single-turn rounds."""
    if not completions or "turns" not in completions[0]:
        return {}
    n = len(completions)
    return {"tools/call_frequency": sum(c["tool_calls"] for c in completions) / n,
            "tools/failure_frequency": sum(c["tool_failures"] for c in completions) / n,
            "turns/mean": sum(sum(m["role"] == "assistant" for m in c["turns"]) for c in completions) / n}
