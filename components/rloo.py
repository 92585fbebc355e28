"""Classic RLHF with RLOO: G samples per prompt against the reward model, a leave-one-out baseline, no value model
(DVC stage rloo; ppo.py is PPO).

    accelerate launch --config_file configs/accelerate/cpu.yaml -m components.rloo --params params.yaml

The online machinery is GRPO's (core/train/online.py): the seeded prompt sampler, HF `generate` in world-independent
chunks, rollout tables with the policy hash, checkpoints between rounds. Per round, as TRL's RLOOTrainer:
1. sample G = `num_generations` completions for each of `prompts_per_step` prompts;
2. score them: the reward model at the last completion token (`ppo.reward: reward_model`) or the reward
   functions; `missing_eos_penalty` off a completion without an end token; the reward functions (the task's true
   reward) are always computed and logged beside the reward model's score, so reward hacking shows;
3. old log-probs (policy) and reference log-probs (the SFT model, when kl_coef > 0);
4. the sequence KL folded into the reward, the leave-one-out baseline over each prompt's G samples;
5. `num_ppo_epochs` passes over the round in `num_mini_batches` shuffled minibatches of whole groups, one optimizer
   step each, minimising the clipped sequence-level ratio loss.
Losses are sequence means over each whole minibatch, on all processes together, so N processes follow one process.
The adaptive KL controller (optional) updates kl_coef after each round. Settings: params.yaml's `ppo` section with
its `rloo:` overrides (PPOConfig.for_mode). Writes models/rloo/, artifacts/rollouts_rloo/, metrics/rloo.json
(TRL's PPO metric names), plots/rloo.csv. The math is in core/algos/rl.py. `eval_every` / `keep_best` as ppo's
(core/train/heldout.py).

Why this file is long: it is the whole RLOO recipe, one file as torchtune's recipes: run() reads as the loop above,
and each phase of a round is a function below it (ppo.py repeats much of it: one readable recipe per method
rather than a shared trainer).
"""

from __future__ import annotations

import argparse
import functools
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from components.core.algos import reward_functions, rl
from components.core.config import PPOConfig, Runtime
from components.core.model import heads, loading, logprobs, sharding
from components.core.model.generation import eos_ids
from components.core.ops import faults, logs, placeholders, tracking
from components.core.ops.io import write_csv, write_json
from components.core.ops.logs import result_line, stage_main
from components.core.train import checkpoints, loop, online, rollouts
from components.core.train.heldout import HeldOutEval

log = logging.getLogger("alignflow.rloo")


@dataclass(frozen=True)
class Setup:
    """What every round reads: built once before the loop (the sampler's position, the weights and the optimizer
    state move on; nothing here is replaced)."""

    cfg: PPOConfig  # the ppo section with its rloo: overrides
    accelerator: object
    model: torch.nn.Module  # the policy, prepared for training: one device, DDP or FSDP2 shards
    ref_model: torch.nn.Module | None  # None when kl_coef is 0 (and not adaptive)
    reward_model: torch.nn.Module | None  # None with reward: functions
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    prompts: list[online.Prompt]
    sampler: online.PromptSampler
    sampling: online.Sampling  # G completions per prompt
    scorer: Callable  # scorer(prompt, completions): text and the reward functions onto each (online.score)
    reward_ids: dict[str, str]  # reward function (and reward_model) -> identity
    seed: int
    sharded: bool
    ckpt_dir: Path
    work: Path  # this run's rollout tables, beside its checkpoints


@dataclass(frozen=True)
class Round:
    """One generation round, sampled and run through the models without gradients."""

    index: int  # the round = the step it starts at
    policy_hash: str  # the weights that sampled it
    groups: list[dict]  # one per prompt, G completions each
    rows: list[tuple[dict, dict]]  # (group, completion), group-major: row k * G + j is completion j of group k
    computed: dict[int, dict]  # row -> old / ref log-probs (per token), rm (the reward model's score)


@dataclass(frozen=True)
class Scored:
    """A round's rewards and advantages, the same on every process: N rows, T = the longest completion."""

    mask: torch.Tensor  # (N, T) completion tokens
    old: torch.Tensor  # (N, T) the sampling policy's log-probs
    true_reward: torch.Tensor  # (N,) the reward functions'
    score: torch.Tensor  # (N,) trained on: the reward model's (or the functions'), less the missing-EOS penalty
    truncated: torch.Tensor  # (N,)
    kl_coef: float
    mean_kl: float  # of the sequence KL
    rlhf_reward: torch.Tensor  # (N,) score - kl_coef * sequence KL
    advantages: torch.Tensor  # (N,) leave-one-out, per sequence


# ----------------------------------------------------------------------------- the stage

def run(cfg: PPOConfig, *, model_path: str = "models/sft", reward_model_path: str = "models/reward_model",
        data_dir: str = "data/prepared", out_dir: str = "models/rloo", rollouts_dir: str = "artifacts/rollouts_rloo",
        metrics_path: str = "metrics/rloo.json", plots_path: str = "plots/rloo.csv",
        checkpoint_dir: str = "checkpoints/rloo", runtime: Runtime = Runtime(), track: bool = True) -> dict:
    """`cfg`: the ppo section as the rloo stage reads it (`PPOConfig.for_mode("rloo")`)."""
    accelerator = loop.make_accelerator(runtime.mixed_precision, runtime.deterministic)
    world, seed = accelerator.num_processes, runtime.seed
    torch.manual_seed(seed)
    G = cfg.num_generations

    # ---------------------------------------------------------------- prompts, rewards
    tokenizer = loading.load_tokenizer(model_path, runtime.trust_remote_code)
    prompt_file = Path(data_dir) / "pref_train.jsonl"
    prompts = online.load_prompts(prompt_file, "pref", tokenizer, runtime.max_prompt_length)
    eval_prompts = online.load_prompts(Path(data_dir) / "pref_eval.jsonl", "pref", tokenizer,
                                       runtime.max_prompt_length)[: cfg.eval_prompts] if cfg.eval_every else []
    reward_fns, reward_weights, reward_ids = reward_functions.load_rewards(cfg.rewards, tokenizer)
    use_rm = cfg.reward == "reward_model"
    if use_rm and not (Path(reward_model_path) / "config.json").exists():
        raise ValueError(f"{reward_model_path}: no reward model (is reward_model.enabled false?); set "
                         "ppo.reward: functions, or enable the reward_model stage")
    rm_identity = checkpoints.model_identity(reward_model_path) if use_rm else None
    if use_rm:
        reward_ids["reward_model"] = rm_identity

    # ---------------------------------------------------------------- models, optimizer, schedule
    model, ref_model, reward_model = load_models(cfg, model_path, reward_model_path, accelerator, runtime,
                                                 tokenizer.pad_token_id)
    model, optimizer = loop.prepare_training(accelerator, model, cfg.learning_rate, cfg.weight_decay)
    updates = cfg.max_steps * cfg.num_ppo_epochs * cfg.num_mini_batches
    schedule = loop.make_scheduler(optimizer, cfg.scheduler, int(cfg.warmup_ratio * updates), updates)
    accelerator.register_for_checkpointing(schedule)

    # ---------------------------------------------------------------- resume
    ckpt_dir = Path(checkpoint_dir)
    hyper = {**checkpoints.math_params(cfg.model_dump()), "mode": "rloo"}
    code = checkpoints.code_fingerprint("components.rloo")
    fp = checkpoints.fingerprint(hyper, reward_ids, rm_identity, checkpoints.model_identity(model_path),
                                 str(prompt_file), runtime.max_prompt_length, seed, code, world)
    step, history, saved = checkpoints.resume(accelerator, ckpt_dir, fp, cfg.max_steps, model, optimizer)
    generated_tokens = int(saved.get("generated_tokens", 0))
    kl_ctl = rl.AdaptiveKLController(float(saved.get("kl_coef", cfg.kl_coef)), cfg.target_kl, cfg.kl_horizon)
    guard = loop.DivergenceGuard(cfg.divergence_factor, ckpt_dir, saved.get("guard"))
    work = ckpt_dir / fp / "rollouts"
    if accelerator.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
    reward_functions.seed_caches(reward_fns, work)  # remote rewards: scores already in this run's rollouts
    setup = Setup(cfg, accelerator, model, ref_model, reward_model, optimizer, schedule, prompts,
                  online.PromptSampler(len(prompts), seed, int(saved.get("sampler_position", 0))),
                  online.Sampling.of(cfg, eos_ids(accelerator.unwrap_model(model), tokenizer), tokenizer.pad_token_id),
                  functools.partial(online.score, tokenizer=tokenizer, reward_fns=reward_fns, weights=reward_weights),
                  reward_ids, seed, sharding.is_sharded(model), ckpt_dir, work)
    heldout_eval = HeldOutEval(cfg.eval_every, eval_prompts, setup.sampling, seed, setup.sharded, setup.scorer,
                                 loop.KeepBest(cfg.best_metric if cfg.keep_best else None, cfg.best_mode, ckpt_dir / fp,
                                               history, step), tokenizer, loading.stored_dtype(model_path))

    params = {**cfg.model_dump(), "mode": "rloo", "world_size": world, "seed": seed,
              "max_prompt_length": runtime.max_prompt_length, "reward_hashes": reward_ids, "model": model_path}
    with tracking.stage_tracking(accelerator, "rloo", params, [model_path, reward_model_path, str(prompt_file)],
                                 track) as mlrun:
        bar = logs.progress(cfg.max_steps, step, "rloo", accelerator.is_local_main_process)
        t_start = time.perf_counter()
        while step < cfg.max_steps:
            timing = defaultdict(float)
            rnd = sample_round(setup, step, timing)  # generate + the reward functions, chunks over ranks
            rnd = compute_round(setup, rnd, timing)  # old / ref log-probs, reward model scores
            scored = score_round(cfg, rnd, kl_ctl.value, ref_model is not None)  # rewards, KL, leave-one-out
            t0 = time.perf_counter()
            if accelerator.is_main_process:
                rollouts.write_rollouts(work, step, rollout_records(setup, rnd, scored))
            timing["write"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            sums, grad_norm = ppo_epochs(setup, rnd, scored)  # num_ppo_epochs x num_mini_batches optimizer steps
            timing["update"] += time.perf_counter() - t0
            guard.check(step + 1, abs(sums["loss/total"] / sums["updates"]), grad_norm)
            if cfg.adaptive_kl:
                kl_ctl.update(scored.mean_kl, cfg.prompts_per_step * G)
            step += 1
            faults.maybe_crash(step)
            bar.update(1)

            generated_tokens += sum(len(c["ids"]) for _, c in rnd.rows)
            row = round_row(step, setup.sampler.position * G, rnd, scored, sums, list(reward_fns),
                            schedule.get_last_lr()[0], grad_norm, timing, generated_tokens)
            heldout_eval(accelerator, model, row)  # eval_every, keep_best
            history.append(row)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                tracking.log_step_metrics(mlrun, row, step)
                rollouts.log_samples(mlrun, [{"prompt": prompts[g["prompt"]].messages[-1]["content"],
                                            "completion": c["text"], "score": c["score"], "true_reward": c["reward"],
                                            "advantage": c["advantage"]} for g, c in rnd.rows[:16]], step)
            if step % cfg.save_every == 0 and step < cfg.max_steps:
                checkpoints.save_checkpoint(accelerator, ckpt_dir, step,
                                            {"fingerprint": fp, "history": history, "guard": guard.state(),
                                             "sampler_position": setup.sampler.position,
                                             "generated_tokens": generated_tokens, "kl_coef": kl_ctl.value},
                                            cfg.keep_checkpoints, model, optimizer)
        bar.close()

        # ------------------------------------------------------------ outputs
        kept = heldout_eval.best.publish(accelerator, model, tokenizer, out_dir, loading.stored_dtype(model_path))
        final = {"mode": "rloo", **kept, **online.final_metrics(history, cfg, generated_tokens, time.perf_counter() - t_start,
                                                        world, len(prompts),
                                                        ("reward", "true_reward", "objective/scores"))}
        rollouts.publish_rollouts(accelerator, work, rollouts_dir, {"ppo": cfg.model_dump(), "mode": "rloo",
                                                                  "reward_hashes": reward_ids,
                                                                  "prompts": str(prompt_file), "seed": seed}, mlrun)
        if accelerator.is_main_process:
            write_csv(plots_path, history)
            write_json(metrics_path, final)
            tracking.log_step_metrics(mlrun, {f"final/{k}": v for k, v in final.items()
                                              if not isinstance(v, str)}, cfg.max_steps)
    checkpoints.clear_checkpoints(accelerator, ckpt_dir)
    return final


def load_models(cfg: PPOConfig, model_path: str, reward_model_path: str, accelerator, runtime: Runtime, pad_id: int):
    """(policy, reference or None, reward model or None); the policy not yet prepared."""
    reward_model = None
    if cfg.reward == "reward_model":
        reward_model = heads.load_scorer(reward_model_path, runtime.trust_remote_code, pad_token_id=pad_id,
                                         frozen=True, dtype=loading.frozen_dtype(runtime.mixed_precision))
        reward_model = sharding.prepare_frozen(accelerator, reward_model)
    ref_model = None
    if cfg.kl_coef > 0 or cfg.adaptive_kl:
        ref_model = loading.load_model(model_path, runtime.trust_remote_code, frozen=True,
                                       mixed_precision=runtime.mixed_precision)
        ref_model = sharding.prepare_frozen(accelerator, ref_model)
    policy = loading.load_model(model_path, runtime.trust_remote_code, mixed_precision=runtime.mixed_precision,
                                gradient_checkpointing=cfg.gradient_checkpointing)
    for module in policy.modules():  # as TRL: no dropout, so old and new log-probs are the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return policy, ref_model, reward_model


def _inputs(setup: Setup, groups: list[dict], selected: list[int]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(prompt ids, completion ids grouped per prompt) of the selected groups."""
    return ([setup.prompts[groups[g]["prompt"]].ids for g in selected],
            [[c["ids"] for c in groups[g]["completions"]] for g in selected])


def _rows_of(groups: list[int], G: int) -> list[int]:
    """The rows of the given groups (rows are group-major)."""
    return [k * G + j for k in groups for j in range(G)]


def _micro_batches(groups: list[int], micro_batch_size: int, G: int) -> list[list[int]]:
    """Micro-batches of whole groups (a group's G completions share one row behind their prompt)."""
    per_mb = max(1, micro_batch_size // G)
    return [groups[i : i + per_mb] for i in range(0, len(groups), per_mb)]


# ----------------------------------------------------------------------------- the phases of a round


def sample_round(setup: Setup, step: int, timing: dict) -> Round:
    """The round's completions, sampled by the policy in eval mode and scored by the reward functions."""
    policy = setup.accelerator.unwrap_model(setup.model)
    policy_hash = online.policy_hash(setup.accelerator, policy, setup.sharded)
    policy.eval()
    chosen = setup.sampler.take(setup.cfg.prompts_per_step)
    groups = online.generate_groups(setup.accelerator, policy, setup.prompts, chosen, setup.sampling, seed=setup.seed,
                                    round_=step, attempt=0, sharded=setup.sharded, scorer=setup.scorer, timing=timing)
    return Round(step, policy_hash, groups, [(g, c) for g in groups for c in g["completions"]], {})


def compute_round(setup: Setup, rnd: Round, timing: dict) -> Round:
    """The round with, for every row, its old log-probs, reference log-probs (kl_coef > 0) and the reward model's
    score (reward: reward_model): this rank's micro-batches, gathered on every rank. The policy is back in train
    mode afterwards."""
    cfg, accelerator, G = setup.cfg, setup.accelerator, setup.sampling.num_generations
    t0 = time.perf_counter()
    mbs = _micro_batches(list(range(len(rnd.groups))), cfg.micro_batch_size, G)
    local: dict[int, dict] = {}
    with torch.no_grad():
        for k, padding in loop.equal_passes(len(mbs), accelerator.process_index, accelerator.num_processes):
            if padding and not setup.sharded:  # under FSDP a padding pass runs too: each forward is a collective
                continue
            group_prompts, grouped = _inputs(setup, rnd.groups, mbs[k])
            with accelerator.autocast():
                # without FSDP not through DDP: a process whose micro-batch is padding skips it, and DDP's buffer
                # broadcast in a forward is a collective
                policy = setup.model if setup.sharded else accelerator.unwrap_model(setup.model)
                old = logprobs.group_token_logps(policy, group_prompts, grouped, setup.sampling.pad_id,
                                                 accelerator.device, cfg.temperature, False)[0]
                ref = (logprobs.group_token_logps(setup.ref_model, group_prompts, grouped, setup.sampling.pad_id,
                                                  accelerator.device, cfg.temperature, False)[0]
                       if setup.ref_model is not None else None)
                rm = (heads.group_end_scores(setup.reward_model, group_prompts, grouped, setup.sampling.pad_id,
                                             accelerator.device) if setup.reward_model is not None else None)
            if padding:
                continue
            for j, i in enumerate(_rows_of(mbs[k], G)):
                L = len(rnd.rows[i][1]["ids"])
                local[i] = {"old": old[j, :L].tolist(), "ref": ref[j, :L].tolist() if ref is not None else None,
                            "rm": float(rm[j]) if rm is not None else None}
    computed = rollouts.gather_rows(accelerator, local)
    timing["reference"] += time.perf_counter() - t0
    accelerator.unwrap_model(setup.model).train()  # checkpointing acts in train mode
    return Round(rnd.index, rnd.policy_hash, rnd.groups, rnd.rows, computed)


def _padded(computed: dict[int, dict], key: str, width: int) -> torch.Tensor:
    """(N, width): each row's per-token `key`, zero-padded."""
    return torch.tensor([computed[i][key] + [0.0] * (width - len(computed[i][key])) for i in range(len(computed))])


def score_round(cfg: PPOConfig, rnd: Round, kl_coef: float, has_ref: bool) -> Scored:
    """Rewards and advantages of the round (also written onto each completion: `score`, `advantage`): the
    sequence KL folded into the reward, the leave-one-out baseline over each prompt's G samples."""
    rows, computed = rnd.rows, rnd.computed
    completions = [c["ids"] for _, c in rows]
    width = max(max(len(c) for c in completions), 1)
    mask = torch.tensor([[t < len(c) for t in range(width)] for c in completions])
    old = _padded(computed, "old", width)
    ref = _padded(computed, "ref", width) if has_ref else old.clone()
    true_reward = torch.tensor([c["reward"] for _, c in rows])
    score = (torch.tensor([computed[i]["rm"] for i in range(len(rows))]) if cfg.reward == "reward_model"
             else true_reward.clone())
    truncated = torch.tensor([c["truncated"] for _, c in rows])
    if cfg.missing_eos_penalty is not None:
        score = score - cfg.missing_eos_penalty * truncated.float()
    kl = rl.token_kl(old, ref, cfg.kl_estimator) * mask
    rlhf_reward = score - kl_coef * kl.sum(-1)
    advantages = rl.rloo_advantages(rlhf_reward, cfg.num_generations)
    if cfg.normalize_advantages:
        advantages = (advantages - advantages.mean()) / (rl.unbiased_std(advantages) + rl.STD_EPS)
    mean_kl = kl.sum(-1).mean().item()
    for i, (_, c) in enumerate(rows):
        c["advantage"] = float(advantages[i])
        c["score"] = float(score[i])
    return Scored(mask, old, true_reward, score, truncated, kl_coef, mean_kl, rlhf_reward, advantages)


def rollout_records(setup: Setup, rnd: Round, scored: Scored) -> list[dict]:
    """The round's rollout table rows (ppo's columns; those of the value model and GAE are empty)."""
    records = []
    for i, (g, c) in enumerate(rnd.rows):
        row = rnd.computed[i]
        rlhf = rollouts.RLHFColumns(values=None, rm_score=row["rm"], score=c["score"],
                                  rlhf_reward=float(scored.rlhf_reward[i]), token_advantages=None, returns=None,
                                  kl_coef=scored.kl_coef)
        records.append(rollouts.rollout_record(rnd.index, rnd.index, setup.prompts[g["prompt"]], g, c, row["old"],
                                             row["ref"], rnd.policy_hash, setup.reward_ids, rlhf))
    return records


def ppo_epochs(setup: Setup, rnd: Round, scored: Scored) -> tuple[dict[str, float], object]:
    """num_ppo_epochs passes over the round, each in num_mini_batches shuffled minibatches of whole groups, one
    optimizer step each. Returns (the minibatches' summed metrics and their count `updates`, the last gradient
    norm)."""
    cfg = setup.cfg
    sums = defaultdict(float)
    rng = random.Random((setup.seed * 1_000_003 + rnd.index) * 7 + 1)
    n_groups = len(rnd.groups)
    per_minibatch = -(-n_groups // cfg.num_mini_batches)
    grad_norm = None
    for _epoch in range(cfg.num_ppo_epochs):
        order = list(range(n_groups))  # shuffled by group: a group keeps its one row behind the prompt
        rng.shuffle(order)
        for start in range(0, n_groups, per_minibatch):
            reduced, grad_norm = minibatch_step(setup, rnd, scored, order[start : start + per_minibatch])
            for key, v in reduced.items():
                sums[key] += v
            sums["updates"] += 1
    return sums, grad_norm


def minibatch_step(setup: Setup, rnd: Round, scored: Scored, groups: list[int]) -> tuple[dict[str, float], object]:
    """One optimizer step on a minibatch of groups: the clipped ratio of summed sequence log-probs, a mean over the
    minibatch's sequences, its micro-batches spread over the processes. Returns (summed metrics, gradient norm)."""
    cfg, accelerator, model, G = setup.cfg, setup.accelerator, setup.model, setup.sampling.num_generations
    world = accelerator.num_processes
    sequences = len(_rows_of(groups, G))
    tokens = max(int(scored.mask[_rows_of(groups, G)].sum()), 1)
    micro = _micro_batches(groups, cfg.micro_batch_size, G)
    passes = loop.equal_passes(len(micro), accelerator.process_index, world)
    acc = defaultdict(lambda: torch.zeros((), device=accelerator.device))
    for m, (k, padding) in enumerate(passes):
        sel, weight = _rows_of(micro[k], G), 0.0 if padding else 1.0
        L = max(max(len(rnd.rows[i][1]["ids"]) for i in sel), 1)
        with loop.maybe_no_sync(accelerator, model, m == len(passes) - 1):
            with accelerator.autocast():
                logps, mask, entropy = logprobs.group_token_logps(model, *_inputs(setup, rnd.groups, micro[k]),
                                                                  setup.sampling.pad_id, accelerator.device,
                                                                  cfg.temperature, True)
            dev = logps.device
            mask_f = mask.float()
            old = scored.old[sel, :L].to(dev)
            seq_logps, seq_old = (logps * mask_f).sum(-1), (old * mask_f).sum(-1)
            pg, pg_clipped = rl.ppo_policy_losses(seq_logps, seq_old, scored.advantages[sel].to(dev), cfg.cliprange)
            loss = pg.sum() / sequences
            clip_frac = pg_clipped.float().sum() / sequences
            approx_kl = (0.5 * (seq_logps - seq_old) ** 2).sum() / sequences
            accelerator.backward(loss * weight * world)  # * world undoes DDP's averaging
        acc["loss/policy_avg"] += loss.detach() * weight
        acc["loss/total"] += loss.detach() * weight
        acc["policy/clipfrac_avg"] += clip_frac.detach() * weight
        acc["policy/approxkl_avg"] += approx_kl.detach() * weight
        acc["policy/entropy_avg"] += (entropy * mask_f).sum() / tokens * weight
    reduced = {key: v.item() for key, v in loop.reduce_sums(accelerator, acc).items()}
    loop.guard_finite(torch.tensor(reduced["loss/total"]), rnd.index + 1, setup.ckpt_dir)
    grad_norm = sharding.clip_grad_norm(accelerator, model, cfg.max_grad_norm)
    setup.optimizer.step()
    setup.schedule.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return reduced, grad_norm


def round_row(step: int, episode: int, rnd: Round, scored: Scored, sums: dict[str, float], reward_names: list[str],
              learning_rate: float, grad_norm, timing: dict, generated_tokens: int) -> dict:
    """A round's metrics, TRL's PPO names."""
    rows, n = rnd.rows, len(rnd.rows)
    lengths = [len(c["ids"]) for _, c in rows]
    rm = [rnd.computed[i]["rm"] for i in range(n)]
    return {
        "step": step, "episode": episode,
        "reward": scored.rlhf_reward.mean().item(),  # the reward the policy maximises (score - KL penalty)
        "objective/scores": scored.score.mean().item(), "objective/rlhf_reward": scored.rlhf_reward.mean().item(),
        "objective/kl": scored.mean_kl, "objective/non_score_reward": -scored.kl_coef * scored.mean_kl,
        "objective/entropy": sums["policy/entropy_avg"] / sums["updates"] * (sum(lengths) / n),
        **{k: v / sums["updates"] for k, v in sums.items() if k not in ("updates", "loss/total")},
        "true_reward": scored.true_reward.mean().item(),  # the reward functions: the task's own score
        **({"reward_model/score": torch.tensor(rm).mean().item()} if rm[0] is not None else {}),  # reward_model
        **{f"rewards/{name}/mean": sum(c["rewards"][name] for _, c in rows) / n for name in reward_names},
        "kl_coef": scored.kl_coef, "val/num_eos_tokens": int((~scored.truncated).sum()),
        "completions/mean_length": sum(lengths) / n,
        "completions/clipped_ratio": scored.truncated.float().mean().item(),
        "learning_rate": learning_rate,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        **{f"time/{phase}": s for phase, s in timing.items()},
        "generated_tokens_per_second": sum(lengths) / max(timing["generate"], 1e-9),
        "num_tokens": generated_tokens,
    }


@stage_main("rloo")
def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params

    parser = argparse.ArgumentParser(description="classic-RLHF online stage: RLOO against the reward model")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models/sft", help="policy init and reference (default: the SFT model)")
    parser.add_argument("--reward-model", default="models/reward_model")
    parser.add_argument("--data-dir", default="data/prepared")
    parser.add_argument("--max-steps", type=int, default=None, help="override ppo.max_steps (rounds)")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    if not p.ppo.enabled:
        placeholders.rloo()
        return
    cfg = p.ppo.for_mode("rloo")
    if args.max_steps:
        cfg = cfg.model_copy(update={"max_steps": args.max_steps})
    result = run(cfg, model_path=args.model, reward_model_path=args.reward_model, data_dir=args.data_dir,
                 runtime=Runtime.of(p))
    log.info(result_line("rloo", result, ("reward_first", "reward_last_window", "kl", "steps"),
                         "metrics/rloo.json"))


if __name__ == "__main__":
    main()
