"""Classic RLHF with PPO: a policy and a value model against the reward model (DVC stage ppo; rloo.py is RLOO).

    accelerate launch --config_file configs/accelerate/cpu.yaml -m components.ppo --params params.yaml

The online machinery is GRPO's (core/train/online.py): the seeded prompt sampler, HF `generate` in world-independent
chunks, rollout tables with the policy hash, checkpoints between rounds. Per round:
1. sample one completion for each of `prompts_per_step` prompts;
2. score them: the reward model at the last completion token (`ppo.reward: reward_model`) or the reward
   functions; `missing_eos_penalty` off a completion without an end token; the reward functions (the task's true
   reward) are always computed and logged beside the reward model's score, so reward hacking shows;
3. old log-probs and values (policy and value model), reference log-probs (the SFT model, when kl_coef > 0);
4. per-token rewards -kl_coef * KL_t plus the score at the last token, GAE(gamma, lam), whitened advantages;
5. `num_ppo_epochs` passes over the round in `num_mini_batches` shuffled minibatches, one optimizer step each,
   minimising the clipped token-level policy loss + vf_coef * the clipped value loss (policy and value model
   under one optimizer, one forward, as TRL's PolicyAndValueWrapper).
Losses are token means over each whole minibatch, on all processes together, so N processes follow one process.
The adaptive KL controller (optional) updates kl_coef after each round. Settings: params.yaml's `ppo` section (as
rloo's, less its `rloo:` overrides). Writes models/ppo/, artifacts/rollouts_ppo/, metrics/ppo.json (TRL's PPO
metric names), plots/ppo.csv. The math is in core/algos/rl.py. With `eval_every`, a held-out reward (the reward
functions') every N rounds; with `keep_best`, the output is the policy of the best one (core/train/heldout.py).

Why this file is long: it is the whole PPO recipe, one file as torchtune's recipes: run() reads as the loop above,
and each phase of a round is a function below it (rloo.py repeats much of it: one readable recipe per method
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

log = logging.getLogger("alignflow.ppo")


class PolicyAndValue(torch.nn.Module):
    """Policy and value model as one module: one forward (so DDP sees both), one optimizer, as TRL's PPO."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, prompts, grouped, pad_id, temperature, with_entropy=False):
        """prompts (B,) and their completions grouped per prompt; rows group-major (as group_token_logps)."""
        device = next(self.policy.parameters()).device
        logps, mask, entropy = logprobs.group_token_logps(self.policy, prompts, grouped, pad_id, device, temperature,
                                                         with_entropy)
        flat_prompts = [p for p, cs in zip(prompts, grouped, strict=True) for _ in cs]
        values = heads.response_values(self.value, flat_prompts, [c for cs in grouped for c in cs], pad_id, device)
        return logps, mask, entropy, values


@dataclass(frozen=True)
class Setup:
    """What every round reads: built once before the loop (the sampler's position, the weights and the optimizer
    state move on; nothing here is replaced). Nothing is sharded: ppo is refused under FSDP."""

    cfg: PPOConfig
    accelerator: object
    model: torch.nn.Module  # PolicyAndValue, prepared for training (one device or DDP)
    ref_model: torch.nn.Module | None  # None when kl_coef is 0 (and not adaptive)
    reward_model: torch.nn.Module | None  # None with reward: functions
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    prompts: list[online.Prompt]
    sampler: online.PromptSampler
    sampling: online.Sampling  # one completion per prompt
    scorer: Callable  # scorer(prompt, completions): text and the reward functions onto each (online.score)
    reward_ids: dict[str, str]  # reward function (and reward_model) -> identity
    seed: int
    ckpt_dir: Path
    work: Path  # this run's rollout tables, beside its checkpoints


@dataclass(frozen=True)
class Round:
    """One generation round, sampled and run through the models without gradients."""

    index: int  # the round = the step it starts at
    policy_hash: str  # the weights that sampled it
    groups: list[dict]  # one per prompt, one completion each
    rows: list[tuple[dict, dict]]  # (group, completion): row i is group i
    computed: dict[int, dict]  # row -> old / ref log-probs, values (per token), rm (the reward model's score)


@dataclass(frozen=True)
class Scored:
    """A round's rewards and advantages, the same on every process: N rows, T = the longest completion."""

    mask: torch.Tensor  # (N, T) completion tokens
    old: torch.Tensor  # (N, T) the sampling policy's log-probs
    values: torch.Tensor  # (N, T) the value model's
    true_reward: torch.Tensor  # (N,) the reward functions'
    score: torch.Tensor  # (N,) trained on: the reward model's (or the functions'), less the missing-EOS penalty
    truncated: torch.Tensor  # (N,)
    kl_coef: float
    mean_kl: float  # of the sequence KL
    rlhf_reward: torch.Tensor  # (N,) score - kl_coef * sequence KL
    advantages: torch.Tensor  # (N, T) whitened GAE advantages
    returns: torch.Tensor  # (N, T)


# ----------------------------------------------------------------------------- the stage

def run(cfg: PPOConfig, *, model_path: str = "models/sft", reward_model_path: str = "models/reward_model",
        data_dir: str = "data/prepared", out_dir: str = "models/ppo", rollouts_dir: str = "artifacts/rollouts_ppo",
        metrics_path: str = "metrics/ppo.json", plots_path: str = "plots/ppo.csv",
        checkpoint_dir: str = "checkpoints/ppo", runtime: Runtime = Runtime(), track: bool = True) -> dict:
    accelerator = loop.make_accelerator(runtime.mixed_precision, runtime.deterministic)
    world, seed = accelerator.num_processes, runtime.seed
    if sharding.active(accelerator):
        raise ValueError("ppo under FSDP is not supported yet (policy and value model in one module); use "
                         "compute.accelerate_config: multi_gpu (DDP), or the rloo stage, which has no value model")
    torch.manual_seed(seed)

    # ---------------------------------------------------------------- prompts, rewards
    tokenizer = loading.load_tokenizer(model_path, runtime.trust_remote_code)
    prompt_file = Path(data_dir) / "pref_train.jsonl"
    prompts = online.load_prompts(prompt_file, "pref", tokenizer, runtime.max_prompt_length)
    eval_prompts = online.load_prompts(Path(data_dir) / "pref_eval.jsonl", "pref", tokenizer,
                                       runtime.max_prompt_length)[: cfg.eval_prompts] if cfg.eval_every else []
    reward_fns, reward_weights, reward_ids = reward_functions.load_rewards(cfg.rewards, tokenizer)
    use_rm = cfg.reward == "reward_model"
    needs_rm = use_rm or cfg.value_init == "reward_model"
    if needs_rm and not (Path(reward_model_path) / "config.json").exists():
        raise ValueError(f"{reward_model_path}: no reward model (is reward_model.enabled false?); set "
                         "ppo.reward: functions and ppo.value_init: sft, or enable the reward_model stage")
    rm_identity = checkpoints.model_identity(reward_model_path) if needs_rm else None  # reward, or the value init
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
    hyper = {**checkpoints.math_params(cfg.model_dump()), "mode": "ppo"}
    code = checkpoints.code_fingerprint("components.ppo")
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
                  online.Sampling.of(cfg, eos_ids(_policy(accelerator, model), tokenizer), tokenizer.pad_token_id,
                                     num_generations=1),
                  functools.partial(online.score, tokenizer=tokenizer, reward_fns=reward_fns, weights=reward_weights),
                  reward_ids, seed, ckpt_dir, work)
    heldout_eval = HeldOutEval(cfg.eval_every, eval_prompts, setup.sampling, seed, False, setup.scorer,
                                 loop.KeepBest(cfg.best_metric if cfg.keep_best else None, cfg.best_mode, ckpt_dir / fp,
                                               history, step), tokenizer, loading.stored_dtype(model_path))

    params = {**cfg.model_dump(), "mode": "ppo", "world_size": world, "seed": seed,
              "max_prompt_length": runtime.max_prompt_length, "reward_hashes": reward_ids, "model": model_path}
    with tracking.stage_tracking(accelerator, "ppo", params, [model_path, reward_model_path, str(prompt_file)],
                                 track) as mlrun:
        bar = logs.progress(cfg.max_steps, step, "ppo", accelerator.is_local_main_process)
        t_start = time.perf_counter()
        while step < cfg.max_steps:
            timing = defaultdict(float)
            rnd = sample_round(setup, step, timing)  # generate + the reward functions, chunks over ranks
            rnd = compute_round(setup, rnd, timing)  # old / ref log-probs, values, reward model scores
            scored = score_round(cfg, rnd, kl_ctl.value, ref_model is not None)  # rewards, KL, GAE advantages
            t0 = time.perf_counter()
            if accelerator.is_main_process:
                rollouts.write_rollouts(work, step, rollout_records(setup, rnd, scored))
            timing["write"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            sums, grad_norm = ppo_epochs(setup, rnd, scored)  # num_ppo_epochs x num_mini_batches optimizer steps
            timing["update"] += time.perf_counter() - t0
            guard.check(step + 1, abs(sums["loss/total"] / sums["updates"]), grad_norm)
            if cfg.adaptive_kl:
                kl_ctl.update(scored.mean_kl, cfg.prompts_per_step)
            step += 1
            faults.maybe_crash(step)
            bar.update(1)

            generated_tokens += sum(len(c["ids"]) for _, c in rnd.rows)
            row = round_row(step, setup.sampler.position, rnd, scored, sums, list(reward_fns),
                            schedule.get_last_lr()[0], grad_norm, timing, generated_tokens)
            heldout_eval(accelerator, _policy(accelerator, model), row)  # eval_every, keep_best
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
        kept = heldout_eval.best.publish(accelerator, _policy(accelerator, model), tokenizer, out_dir,
                                    loading.stored_dtype(model_path))
        final = {"mode": "ppo", **kept, **online.final_metrics(history, cfg, generated_tokens, time.perf_counter() - t_start,
                                                       world, len(prompts),
                                                       ("reward", "true_reward", "objective/scores"))}
        rollouts.publish_rollouts(accelerator, work, rollouts_dir, {"ppo": cfg.model_dump(), "mode": "ppo",
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
    """(PolicyAndValue, reference or None, reward model or None); the trained ones not yet prepared."""
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
    torch.manual_seed(runtime.seed)  # a fresh head when starting from the SFT model
    value = heads.load_scorer(reward_model_path if cfg.value_init == "reward_model" else model_path,
                              runtime.trust_remote_code, pad_token_id=pad_id,
                              gradient_checkpointing=cfg.gradient_checkpointing)
    model = PolicyAndValue(policy, value)
    for module in model.modules():  # as TRL's PPO: no dropout, so old and new log-probs are the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, ref_model, reward_model


def _policy(accelerator, model) -> torch.nn.Module:
    return accelerator.unwrap_model(model).policy


def _inputs(setup: Setup, groups: list[dict], selected: list[int]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(prompt ids, completion ids grouped per prompt) of the selected groups."""
    return ([setup.prompts[groups[g]["prompt"]].ids for g in selected],
            [[c["ids"] for c in groups[g]["completions"]] for g in selected])


# ----------------------------------------------------------------------------- the phases of a round


def sample_round(setup: Setup, step: int, timing: dict) -> Round:
    """The round's completions, sampled by the policy in eval mode and scored by the reward functions."""
    policy = _policy(setup.accelerator, setup.model)
    policy_hash = online.policy_hash(setup.accelerator, policy, False)
    policy.eval()
    chosen = setup.sampler.take(setup.cfg.prompts_per_step)
    groups = online.generate_groups(setup.accelerator, policy, setup.prompts, chosen, setup.sampling, seed=setup.seed,
                                    round_=step, attempt=0, sharded=False, scorer=setup.scorer, timing=timing)
    return Round(step, policy_hash, groups, [(g, c) for g in groups for c in g["completions"]], {})


def compute_round(setup: Setup, rnd: Round, timing: dict) -> Round:
    """The round with, for every row, its old log-probs and values, reference log-probs (kl_coef > 0) and the
    reward model's score (reward: reward_model): this rank's micro-batches, gathered on every rank. The policy and
    value model are back in train mode afterwards."""
    cfg, accelerator = setup.cfg, setup.accelerator
    t0 = time.perf_counter()
    mbs = _micro_batches(list(range(len(rnd.groups))), cfg.micro_batch_size)
    local: dict[int, dict] = {}
    with torch.no_grad():
        for k, padding in loop.equal_passes(len(mbs), accelerator.process_index, accelerator.num_processes):
            if padding:  # nothing is sharded: a process short of micro-batches just skips
                continue
            group_prompts, grouped = _inputs(setup, rnd.groups, mbs[k])
            with accelerator.autocast():
                old, _, _, values = accelerator.unwrap_model(setup.model)(group_prompts, grouped,
                                                                          setup.sampling.pad_id, cfg.temperature)
                ref = (logprobs.group_token_logps(setup.ref_model, group_prompts, grouped, setup.sampling.pad_id,
                                                  accelerator.device, cfg.temperature, False)[0]
                       if setup.ref_model is not None else None)
                rm = (heads.group_end_scores(setup.reward_model, group_prompts, grouped, setup.sampling.pad_id,
                                             accelerator.device) if setup.reward_model is not None else None)
            for j, i in enumerate(mbs[k]):  # one completion per group: row i is group i
                L = len(rnd.rows[i][1]["ids"])
                local[i] = {"old": old[j, :L].tolist(), "ref": ref[j, :L].tolist() if ref is not None else None,
                            "values": values[j, :L].tolist(), "rm": float(rm[j]) if rm is not None else None}
    computed = rollouts.gather_rows(accelerator, local)
    timing["reference"] += time.perf_counter() - t0
    accelerator.unwrap_model(setup.model).train()  # policy and value model (checkpointing acts in train mode)
    return Round(rnd.index, rnd.policy_hash, rnd.groups, rnd.rows, computed)


def _micro_batches(groups: list[int], micro_batch_size: int) -> list[list[int]]:
    return [groups[i : i + micro_batch_size] for i in range(0, len(groups), micro_batch_size)]


def _padded(computed: dict[int, dict], key: str, width: int) -> torch.Tensor:
    """(N, width): each row's per-token `key`, zero-padded."""
    return torch.tensor([computed[i][key] + [0.0] * (width - len(computed[i][key])) for i in range(len(computed))])


def score_round(cfg: PPOConfig, rnd: Round, kl_coef: float, has_ref: bool) -> Scored:
    """Rewards and advantages of the round (also written onto each completion: `score`, sequence `advantage`):
    per-token rewards -kl_coef * KL_t plus the score at the last token, GAE, whitened advantages."""
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
    values = _padded(computed, "values", width)
    token_rewards = rl.ppo_token_rewards(score, kl, mask, kl_coef)
    if cfg.whiten_rewards:
        token_rewards = rl.masked_whiten(token_rewards, mask, shift_mean=False) * mask
    advantages, returns = rl.gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
    advantages = rl.masked_whiten(advantages, mask) * mask
    sequence_advantages = advantages.sum(-1) / mask.sum(-1).clamp(min=1)  # logged and written, not trained on
    rlhf_reward = score - kl_coef * kl.sum(-1)
    mean_kl = kl.sum(-1).mean().item()
    for i, (_, c) in enumerate(rows):
        c["advantage"] = float(sequence_advantages[i])
        c["score"] = float(score[i])
    return Scored(mask, old, values, true_reward, score, truncated, kl_coef, mean_kl, rlhf_reward, advantages,
                  returns)


def rollout_records(setup: Setup, rnd: Round, scored: Scored) -> list[dict]:
    """The round's rollout table rows."""
    records = []
    for i, (g, c) in enumerate(rnd.rows):
        row = rnd.computed[i]
        rlhf = rollouts.RLHFColumns(values=row["values"], rm_score=row["rm"], score=c["score"],
                                  rlhf_reward=float(scored.rlhf_reward[i]),
                                  token_advantages=scored.advantages[i, : len(c["ids"])].tolist(),
                                  returns=scored.returns[i, : len(c["ids"])].tolist(), kl_coef=scored.kl_coef)
        records.append(rollouts.rollout_record(rnd.index, rnd.index, setup.prompts[g["prompt"]], g, c, row["old"],
                                             row["ref"], rnd.policy_hash, setup.reward_ids, rlhf))
    return records


def ppo_epochs(setup: Setup, rnd: Round, scored: Scored) -> tuple[dict[str, float], object]:
    """num_ppo_epochs passes over the round, each in num_mini_batches shuffled minibatches, one optimizer step
    each. Returns (the minibatches' summed metrics and their count `updates`, the last gradient norm)."""
    cfg = setup.cfg
    sums = defaultdict(float)
    rng = random.Random((setup.seed * 1_000_003 + rnd.index) * 7 + 1)
    n_groups = len(rnd.groups)
    per_minibatch = -(-n_groups // cfg.num_mini_batches)
    grad_norm = None
    for _epoch in range(cfg.num_ppo_epochs):
        order = list(range(n_groups))
        rng.shuffle(order)
        for start in range(0, n_groups, per_minibatch):
            reduced, grad_norm = minibatch_step(setup, rnd, scored, order[start : start + per_minibatch])
            for key, v in reduced.items():
                sums[key] += v
            sums["updates"] += 1
    return sums, grad_norm


def minibatch_step(setup: Setup, rnd: Round, scored: Scored, rows: list[int]) -> tuple[dict[str, float], object]:
    """One optimizer step on a minibatch: clipped policy loss + vf_coef * clipped value loss, token means over
    the whole minibatch, its micro-batches spread over the processes. Returns (summed metrics, gradient norm)."""
    cfg, accelerator, model = setup.cfg, setup.accelerator, setup.model
    world = accelerator.num_processes
    tokens = max(int(scored.mask[rows].sum()), 1)
    micro = _micro_batches(rows, cfg.micro_batch_size)
    passes = loop.equal_passes(len(micro), accelerator.process_index, world)
    acc = defaultdict(lambda: torch.zeros((), device=accelerator.device))
    for m, (k, padding) in enumerate(passes):
        sel, weight = micro[k], 0.0 if padding else 1.0
        L = max(max(len(rnd.rows[i][1]["ids"]) for i in sel), 1)
        with loop.maybe_no_sync(accelerator, model, m == len(passes) - 1):
            with accelerator.autocast():
                logps, mask, entropy, vpred = model(*_inputs(setup, rnd.groups, sel), setup.sampling.pad_id,
                                                    cfg.temperature, True)
            dev = logps.device
            mask_f = mask.float()
            old = scored.old[sel, :L].to(dev)
            pg, pg_clipped = rl.ppo_policy_losses(logps, old, scored.advantages[sel, :L].to(dev), cfg.cliprange)
            vf, vf_clipped = rl.ppo_value_losses(vpred, scored.values[sel, :L].to(dev),
                                                 scored.returns[sel, :L].to(dev), cfg.cliprange_value)
            pg_share = (pg * mask_f).sum() / tokens
            vf_share = (vf * mask_f).sum() / tokens
            loss = pg_share + cfg.vf_coef * vf_share
            acc["loss/value_avg"] += vf_share.detach() * weight
            acc["val/clipfrac_avg"] += (vf_clipped.float() * mask_f).sum() / tokens * weight
            clip_frac = (pg_clipped.float() * mask_f).sum() / tokens
            approx_kl = (0.5 * (logps - old) ** 2 * mask_f).sum() / tokens
            accelerator.backward(loss * weight * world)  # * world undoes DDP's averaging
        acc["loss/policy_avg"] += pg_share.detach() * weight
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


@stage_main("ppo")
def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params

    parser = argparse.ArgumentParser(description="classic-RLHF online stage: PPO against the reward model")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models/sft", help="policy init and reference (default: the SFT model)")
    parser.add_argument("--reward-model", default="models/reward_model")
    parser.add_argument("--data-dir", default="data/prepared")
    parser.add_argument("--max-steps", type=int, default=None, help="override ppo.max_steps (rounds)")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    if not p.ppo.enabled:
        placeholders.ppo()
        return
    cfg = p.ppo.for_mode("ppo")
    if args.max_steps:
        cfg = cfg.model_copy(update={"max_steps": args.max_steps})
    result = run(cfg, model_path=args.model, reward_model_path=args.reward_model, data_dir=args.data_dir,
                 runtime=Runtime.of(p))
    log.info(result_line("ppo", result, ("reward_first", "reward_last_window", "kl", "steps"),
                         "metrics/ppo.json"))


if __name__ == "__main__":
    main()
