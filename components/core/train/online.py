"""The online-RL machinery every online stage shares (grpo, ppo, rloo).

- prompts: `load_prompts` (one per distinct prompt of a prepared file) and `PromptSampler` (a seeded
  permutation per epoch; its position is the only state, checkpointed);
- generation: `Sampling` (what a stage's section says about sampling, typed), `sample_chunk` (HF generate with
  KV cache, seeded, the sampler's own log-probs; a prompt's prefix is run once for its G completions,
  `shared_prompt_cache`) and `generate_groups` (a round's prompts in world-independent chunks over the
  processes, all-gathered, so N processes sample what one process samples);
- rewards from code: `score` (the weighted reward functions of core/algos/reward_functions.py);
- `collect_round` (DAPO's dynamic sampling), `policy_hash` (which weights sampled a round), `step_row` and
  `final_metrics` (a step's and a run's metrics, TRL's names).
The held-out reward during training (`eval_every`, `keep_best`) is core/train/heldout.py's.
Rollout tables are core/train/rollouts.py's; where rounds come from (in place or ahead), core/train/async_rounds.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components.core.config import GRPOConfig, PPOConfig
from components.core.data.tokens import prompt_ids_for_generation
from components.core.ops.io import read_jsonl
from components.core.train import loop

log = logging.getLogger("alignflow.online")


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict]
    answer: str  # the record's reference answer (chosen / assistant text), for answer-checking rewards
    ids: list[int]


def prompt_file(data_dir: str | Path, kind: str, split: str) -> Path:
    """The prepared file a stage's `prompts` kind reads: pref -> pref_<split>.jsonl, sft and tools -> sft_<split>.jsonl."""
    return Path(data_dir) / f"{'pref' if kind == 'pref' else 'sft'}_{split}.jsonl"


def read_prompts(path: Path, kind: str) -> list[tuple[str, list[dict], str]]:
    """(id, prompt messages, reference answer) per distinct prompt of a prepared file, in file order. kind pref: the
    pairs' prompts (answer: chosen); sft: the turns before the last assistant turn (answer: its text); tools: the SFT
    records that offer tools, the turns before the first assistant turn (answer: the last assistant text)."""
    seen, out = set(), []
    for r in read_jsonl(path):
        if kind == "pref":
            messages, answer = r["prompt"], r["chosen"][-1]["content"]
        else:
            if kind == "tools" and not r.get("tools"):
                continue
            turns = r["messages"]
            assistant = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
            messages = turns[: assistant[0] if kind == "tools" else assistant[-1]]
            answer = turns[assistant[-1]]["content"] or ""
        key = json.dumps(messages, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((str(r["id"]), messages, answer))
    return out


def load_prompts(path: Path, kind: str, tokenizer, max_prompt_length: int, tools: list[dict] | None = None) -> list[Prompt]:
    """read_prompts' prompts, rendered with `tools` offered (an environment's). Prompts longer than
    max_prompt_length are skipped with a warning that counts them; a file left with none is refused."""
    out, too_long = [], 0
    for id_, messages, answer in read_prompts(path, kind):
        ids = prompt_ids_for_generation(tokenizer, messages, tools)
        if len(ids) > max_prompt_length:
            too_long += 1
            continue
        out.append(Prompt(id_, messages, answer, ids))
    if too_long:
        log.warning("%s: %d prompts longer than data.max_prompt_length=%d tokens skipped", path, too_long,
                    max_prompt_length)
    if not out:
        raise ValueError(f"{path}: no prompts to train on" + (" (no record offers tools)" if kind == "tools" else ""))
    return out


class PromptSampler:
    """Prompt i of the run = a seeded permutation of the prompts for epoch i // n, at i % n. The position
    (prompts taken so far) is all the state there is: it goes into every checkpoint, and a resumed run starts
    the sampler there."""

    def __init__(self, n: int, seed: int, position: int = 0):
        self.n, self.seed, self.position, self._perms = n, seed, position, {}

    def take(self, k: int) -> list[int]:
        """The next k prompts (indices); the position moves past them."""
        out = []
        for i in range(self.position, self.position + k):
            epoch = i // self.n
            if epoch not in self._perms:
                perm = list(range(self.n))
                random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
                self._perms[epoch] = perm
            out.append(self._perms[epoch][i % self.n])
        self.position += k
        return out


def chunk_seed(seed: int, round_: int, attempt: int, chunk: int) -> int:
    return (((seed * 1_000_003 + round_) * 101 + attempt) * 4099 + chunk) % (2**63)


def policy_hash(accelerator, model, sharded: bool) -> str:
    """The policy weights that sampled a round: one process's hash of the whole model, or under FSDP the hash of
    every process's shard hashes (no gather of the full weights per round; stable for a given world size)."""
    if not sharded:
        return weights_hash(model) if accelerator.is_main_process else ""
    from accelerate.utils import gather_object

    shards = gather_object([weights_hash(model)])
    return f"fsdp{len(shards)}:" + hashlib.sha256("".join(shards).encode()).hexdigest()[:16]


def weights_hash(model) -> str:
    """Hash of the model's weights as this process holds them (an FSDP DTensor: its local shard)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        local = p.to_local() if hasattr(p, "to_local") else p
        h.update(local.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- generation and scoring


@dataclass(frozen=True)
class Sampling:
    """How a stage samples its completions: G per prompt, the length limit, temperature / top-p, prompts per
    generate() call, the tokenizer's end and pad ids, and with an environment, its episodes (core/train/episodes.py:
    multi-turn completions instead of sample_chunk's single turn)."""

    num_generations: int  # G: completions per prompt
    max_completion_length: int
    temperature: float
    top_p: float
    generation_batch_size: int  # prompts per generate() call (x G rows)
    eos: list[int]  # a completion ends at the first of these (it is kept)
    pad_id: int
    episodes: object = None  # an EpisodeRunner: .sample(model, prompts, sampling, seed, synced) like sample_chunk

    @classmethod
    def of(cls, cfg: GRPOConfig | PPOConfig, eos: list[int], pad_id: int, num_generations: int | None = None,
           episodes: object = None) -> Sampling:
        """A section's sampling settings; `num_generations` overrides its G (ppo samples one completion a prompt)."""
        return cls(cfg.num_generations if num_generations is None else num_generations, cfg.max_completion_length,
                   cfg.temperature, cfg.top_p, cfg.generation_batch_size, eos, pad_id, episodes)


@torch.no_grad()
def shared_prompt_cache(model, input_ids: torch.Tensor, attention: torch.Tensor, repeats: int, synced: bool = False):
    """The KV cache of each prompt but its last token, computed once and repeated for its `repeats` rows.

    A prompt's G completions share its prefix, and generate's own prefill would run it G times: most of a
    chunk's compute when completions are short. generate then runs only the last prompt token and the new
    ones. Positions are generate's own (from the left-padded mask). None (generate prefills as usual) for
    one-token prompts, a model whose generation config picks its own cache (Gemma-2/3's hybrid, static), or
    a cache with layers other than plain or sliding-window key/value layers (linear-attention states cannot be
    repeated this way). Under FSDP (`synced`) every process takes the same decision: each forward is a collective.
    """
    import inspect

    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    width = torch.tensor([input_ids.shape[1]], device=input_ids.device)
    if synced and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MIN)
    if width.item() < 2 or getattr(getattr(model, "generation_config", None), "cache_implementation", None):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft passes kwargs on
    accepted = inspect.signature(base.forward).parameters
    mask = attention[:, :-1]
    extra = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    if "position_ids" in accepted:
        extra["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(input_ids=input_ids[:, :-1], attention_mask=mask, use_cache=True, **extra)
    cache = getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return None
    cache.batch_repeat_interleave(repeats)
    return cache


@torch.no_grad()
def sample_chunk(model, prompts: list[Prompt], sampling: Sampling, seed: int, synced: bool = False) -> list[dict]:
    """G = sampling.num_generations completions for each prompt in one generate() call: ids (up to and including
    the first end token), the sampler's per-token log-probs (after temperature / top-p), and whether the length
    limit cut it."""
    G, eos, pad_id = sampling.num_generations, sampling.eos, sampling.pad_id
    width = max(len(p.ids) for p in prompts)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad_id] * (width - len(p.ids)) + p.ids for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in prompts], device=device)
    torch.manual_seed(seed)
    cache = shared_prompt_cache(model, input_ids, attention, G, synced) if G > 1 else None
    out = model.generate(
        input_ids=input_ids.repeat_interleave(G, 0), attention_mask=attention.repeat_interleave(G, 0),
        past_key_values=cache, max_new_tokens=sampling.max_completion_length, min_new_tokens=0,
        do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0, num_beams=1,
        repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos, pad_token_id=pad_id, use_cache=True,
        output_scores=True, return_dict_in_generate=True, synced_gpus=synced,
    )
    new = out.sequences[:, width:]  # (B, new)
    scores = torch.stack(out.scores, dim=1).float()  # (B, new, V): the processed logits it sampled from
    sampler_logps = (scores.gather(-1, new.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scores, dim=-1))
    completions = []
    for i, row in enumerate(new.tolist()):
        cut = next((j + 1 for j, t in enumerate(row) if t in eos), None)
        ids = row[:cut] if cut else row
        completions.append({"ids": ids, "sampler_logps": sampler_logps[i, : len(ids)].tolist(),
                            "truncated": cut is None})
    return completions


def score(prompt: Prompt, completions: list[dict], tokenizer, reward_fns: dict, weights: dict[str, float]) -> None:
    """Text and rewards onto each completion of a group; a reward with `score_batch` (a remote one) gets the
    group in one call."""
    for c in completions:
        if "turns" not in c:  # an episode's text is its final assistant message, set by its runner
            c["text"] = tokenizer.decode(c["ids"], skip_special_tokens=True).strip()
        c["rewards"] = {} if "env_reward" not in c else {"environment": c["env_reward"]}
    texts, n = [c["text"] for c in completions], len(completions)
    for name, fn in reward_fns.items():
        if hasattr(fn, "score_batch"):
            values = fn.score_batch([prompt.messages] * n, texts, [prompt.answer] * n)
        else:
            values = [fn(prompt.messages, t, prompt.answer) for t in texts]
        for c, v in zip(completions, values, strict=True):
            c["rewards"][name] = float(v)
    for c in completions:
        c["reward"] = sum(weights[name] * v for name, v in c["rewards"].items())


def collect_round(generate_batch, prompts_per_step: int, dynamic: bool, max_resample_rounds: int,
                  round_: int = 0) -> tuple[list[dict], list[dict], float]:
    """The groups a round trains on: (every group generated, the kept ones, frac_reward_zero_std of the first
    batch). generate_batch(attempt, n) samples n more prompts' groups, each with a `zero_std` flag.

    Without dynamic sampling every group is kept. With it (DAPO), zero-std groups are dropped and more
    prompts are sampled until `prompts_per_step` groups have reward variance, at most max_resample_rounds
    extra times; then it trains on the first prompts_per_step kept (fewer, with a warning, if it ran out;
    the last batch, with a warning, if none had any variance).
    """
    batch = generate_batch(0, prompts_per_step)
    groups, first_zero_frac = list(batch), sum(g["zero_std"] for g in batch) / len(batch)
    if not dynamic:
        return groups, batch, first_zero_frac
    kept = [g for g in batch if not g["zero_std"]]
    attempt = 0
    while len(kept) < prompts_per_step and attempt < max_resample_rounds:
        attempt += 1
        batch = generate_batch(attempt, prompts_per_step - len(kept))
        groups += batch
        kept += [g for g in batch if not g["zero_std"]]
    if not kept:
        log.warning("round %d: every group has equal rewards after %d resampling rounds; training on the last "
                    "batch (zero advantages)", round_, attempt)
        return groups, batch, first_zero_frac
    if len(kept) < prompts_per_step:
        log.warning("round %d: only %d of %d groups with reward variance after %d resampling rounds", round_,
                    len(kept), prompts_per_step, attempt)
    return groups, kept[:prompts_per_step], first_zero_frac


def generate_groups(accelerator, model, prompts: list[Prompt], chosen: list[int], sampling: Sampling, *, seed: int,
                    round_: int, attempt: int, sharded: bool, scorer, timing: dict, gather_group=None) -> list[dict]:
    """The groups of G completions for prompts[chosen], in a fixed order, on every process.

    The prompts are cut into chunks of `sampling.generation_batch_size` that do not depend on the world size; each
    process samples its chunks (seeded per chunk), `scorer(prompt, completions)` scores them, and the groups are
    all-gathered. Under FSDP every process runs the same generate() calls, each forward a collective: a process
    short of chunks samples chunk 0 again and drops it, and synced_gpus keeps the calls in step. `gather_group`: the
    process group to all-gather over (an asynchronous round's, core/train/async_rounds.py; None: the default group).
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    G, size = sampling.num_generations, sampling.generation_batch_size
    chunks = [chosen[i : i + size] for i in range(0, len(chosen), size)]
    mine = []
    for c, padding in loop.equal_passes(len(chunks), rank, world):
        if padding and not sharded:
            continue
        s = chunk_seed(seed, round_, attempt, c)
        t0 = time.perf_counter()
        sample = sampling.episodes.sample if sampling.episodes is not None else sample_chunk
        completions = sample(model, [prompts[i] for i in chunks[c]], sampling, s, synced=sharded)
        timing["generate"] += time.perf_counter() - t0
        if padding:
            continue
        t0 = time.perf_counter()
        for j, idx in enumerate(chunks[c]):
            group = completions[j * G : (j + 1) * G]
            scorer(prompts[idx], group)
            mine.append({"order": (attempt, c, j), "prompt": idx, "seed": s, "completions": group})
        timing["score"] += time.perf_counter() - t0
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine, group=gather_group)
        mine = [g for part in parts for g in part]
    return sorted(mine, key=lambda g: g["order"])


class ZeroStdWatch:
    """Warns once frac_reward_zero_std has stayed above `threshold` for 5 rounds in a row."""

    def __init__(self, threshold: float):
        self.threshold, self.streak = threshold, 0

    def update(self, frac: float) -> None:
        self.streak = self.streak + 1 if frac > self.threshold else 0
        if self.streak == 5:
            log.warning("frac_reward_zero_std above %.2f for 5 rounds (now %.2f): most groups carry no gradient. "
                        "Raise num_generations or temperature, or set dynamic_sampling", self.threshold, frac)


def step_row(step: int, reduced: dict, sampled: dict, beta: float, learning_rate: float, grad_norm, timing: dict,
             generated_tokens: int) -> dict:
    """A step's metrics (TRL's names): loss, entropy, KL, clip ratios over the round's tokens; the round's samples."""
    tokens_n = max(reduced["tokens"], 1.0)
    return {
        "step": step, "loss": reduced["loss"], **sampled,
        "entropy": reduced["entropy"] / tokens_n,
        **({"kl": reduced["kl"] / tokens_n} if beta > 0 else {}),
        **({"sampling/importance_sampling_ratio/mean": reduced["is_ratio"] / tokens_n,
            "sampling/is_cut_fraction": reduced["is_cut"] / tokens_n} if "is_ratio" in reduced else {}),
        "clip_ratio/low_mean": reduced["clip_ratio/low"] / tokens_n,
        "clip_ratio/high_mean": reduced["clip_ratio/high"] / tokens_n,
        "clip_ratio/region_mean": reduced["clip_ratio/region"] / tokens_n,
        "learning_rate": learning_rate,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        **{f"time/{phase}": s for phase, s in timing.items()},
        "num_tokens": generated_tokens,
    }


def final_metrics(history: list[dict], cfg, generated_tokens: int, seconds: float, world: int, num_prompts: int,
                  windowed: tuple[str, ...] = ("reward",)) -> dict:
    """A run's metrics file: the last row, each `windowed` key's first value and mean over the last log window,
    totals per phase, and the resolved config with every default spelled out (`config/<key>`)."""
    last = history[-1]
    tail = history[-min(len(history), cfg.log_every):]
    final = {k: v for k, v in last.items() if not k.startswith("time/") and k != "step"}
    for key in windowed:
        final[f"{key}_last_window"] = sum(r[key] for r in tail) / len(tail)
        final[f"{key}_first"] = history[0][key]
    final.update({"steps": cfg.max_steps, "world_size": world, "train/prompts": num_prompts,
                  "generated_tokens": generated_tokens, "seconds": round(seconds, 2)})
    for phase in ("generate", "score", "reference", "update", "write"):
        final[f"time/{phase}_total"] = sum(r.get(f"time/{phase}", 0.0) for r in history)
    for key, value in cfg.model_dump().items():
        final[f"config/{key}"] = value if isinstance(value, int | float | str | bool) or value is None else json.dumps(value)
    return final


