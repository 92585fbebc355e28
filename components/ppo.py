"""Classic-RLHF online stage: PPO against the reward model, or RLOO (`--mode`; DVC stages ppo@ppo, ppo@rloo).

    accelerate launch --config_file configs/accelerate/cpu.yaml -m components.ppo --mode ppo --params params.yaml

The online machinery is GRPO's (core/train/online.py): the seeded prompt sampler, HF `generate` in world-independent
chunks, rollout tables with the policy hash, checkpoints between rounds. Per round, in both modes:
1. sample completions for `prompts_per_step` prompts: one each (ppo) or G each (rloo);
2. score them: the reward model at the last completion token (`ppo.reward: reward_model`) or the reward
   functions; `missing_eos_penalty` off a completion without an end token; the reward functions (the task's true
   reward) are always computed and logged beside the reward model's score, so reward hacking shows;
3. old log-probs (policy), reference log-probs (the SFT model, when kl_coef > 0) and, in ppo, values;
4. ppo: per-token rewards -kl_coef * KL_t plus the score at the last token, GAE(gamma, lam), whitened
   advantages; rloo: the sequence KL folded into the reward, leave-one-out baseline over the G samples;
5. `num_ppo_epochs` passes over the round in `num_mini_batches` shuffled minibatches, one optimizer step each:
   ppo minimises the clipped token-level policy loss + vf_coef * the clipped value loss (policy and value model
   under one optimizer, one forward, as TRL's PolicyAndValueWrapper); rloo the clipped sequence-level ratio loss.
Losses are token means (sequence means in rloo) over each whole minibatch, on all processes together, so N
processes follow one process. The adaptive KL controller (optional) updates kl_coef after each round.
Writes models/<mode>/, artifacts/rollouts_<mode>/, metrics/<mode>.json (TRL's PPO metric names), plots/<mode>.csv.

Why this file is long: it is one online loop for both modes, top to bottom (generation, scoring, advantages,
minibatch epochs, rollouts, resume); the math is in core/algos/rl.py and the shared machinery in core/train/online.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

from components.core.algos import reward_functions, rl
from components.core.config import PPOConfig
from components.core.model import heads, loading, logprobs, sharding
from components.core.model.generation import eos_ids
from components.core.ops import faults, logs, placeholders, tracking
from components.core.ops.io import write_csv, write_json
from components.core.ops.logs import stage_main
from components.core.train import checkpoints, loop, online

log = logging.getLogger("alignflow.ppo")
MODES = ("ppo", "rloo")


class PolicyAndValue(torch.nn.Module):
    """Policy and value model as one module: one forward (so DDP sees both), one optimizer, as TRL's PPO."""

    def __init__(self, policy, value=None):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, prompts, grouped, pad_id, temperature, with_entropy=False):
        """prompts (B,) and their completions grouped per prompt; rows group-major (as group_token_logps)."""
        device = next(self.policy.parameters()).device
        logps, mask, entropy = logprobs.group_token_logps(self.policy, prompts, grouped, pad_id, device, temperature,
                                                         with_entropy)
        flat_prompts = [p for p, cs in zip(prompts, grouped, strict=True) for _ in cs]
        values = None if self.value is None else heads.response_values(
            self.value, flat_prompts, [c for cs in grouped for c in cs], pad_id, device)
        return logps, mask, entropy, values


def run(cfg: PPOConfig, mode: str = "ppo", *, model_path: str = "models/sft", reward_model_path: str = "models/reward_model",
        data_dir: str = "data/prepared", out_dir: str | None = None, rollouts_dir: str | None = None,
        metrics_path: str | None = None, plots_path: str | None = None, checkpoint_dir: str | None = None,
        max_prompt_length: int = 96, mixed_precision: str = "auto", seed: int = 1234, trust_remote_code: bool = False,
        track: bool = True) -> dict:
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: expected ppo or rloo")
    out_dir = out_dir or f"models/{mode}"
    rollouts_dir = rollouts_dir or f"artifacts/rollouts_{mode}"
    metrics_path, plots_path = metrics_path or f"metrics/{mode}.json", plots_path or f"plots/{mode}.csv"
    checkpoint_dir = checkpoint_dir or f"checkpoints/{mode}"
    accelerator = loop.make_accelerator(mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    if mode == "ppo" and sharding.active(accelerator):
        raise ValueError("ppo mode under FSDP is not supported yet (policy and value model in one module); use "
                         "compute.accelerate_config: multi_gpu (DDP), or --mode rloo, which has no value model")
    torch.manual_seed(seed)
    G = cfg.num_generations if mode == "rloo" else 1
    gen_cfg = cfg.model_copy(update={"num_generations": G})  # what online.sample_chunk reads

    # ---------------------------------------------------------------- prompts, rewards
    tokenizer = loading.load_tokenizer(model_path, trust_remote_code)
    pad_id = tokenizer.pad_token_id
    prompt_file = Path(data_dir) / "pref_train.jsonl"
    prompts = online.load_prompts(prompt_file, "pref", tokenizer, max_prompt_length)
    reward_fns = {r.name: reward_functions.load_reward_function(r.name) for r in cfg.rewards}
    reward_weights = {r.name: r.weight for r in cfg.rewards}
    reward_ids = {name: reward_functions.reward_identity(name) for name in reward_fns}
    use_rm = cfg.reward == "reward_model"
    needs_rm = use_rm or (mode == "ppo" and cfg.value_init == "reward_model")
    if needs_rm and not (Path(reward_model_path) / "config.json").exists():
        raise ValueError(f"{reward_model_path}: no reward model (is reward_model.enabled false?); set "
                         "ppo.reward: functions and ppo.value_init: sft, or enable the reward_model stage")
    rm_identity = checkpoints.model_identity(reward_model_path) if needs_rm else None  # reward, or the value init
    if use_rm:
        reward_ids["reward_model"] = rm_identity
    sampler = online.PromptSampler(len(prompts), seed)

    # ---------------------------------------------------------------- models, optimizer, schedule
    dtype = loading.frozen_dtype(mixed_precision)
    reward_model = None
    if use_rm:
        reward_model = heads.load_scorer(reward_model_path, trust_remote_code, pad_token_id=pad_id, frozen=True,
                                           dtype=dtype)
        reward_model = sharding.prepare_frozen(accelerator, reward_model)
    ref_model = None
    if cfg.kl_coef > 0 or cfg.adaptive_kl:
        ref_model = loading.load_model(model_path, trust_remote_code, frozen=True, mixed_precision=mixed_precision)
        ref_model = sharding.prepare_frozen(accelerator, ref_model)
    policy = loading.load_model(model_path, trust_remote_code, mixed_precision=mixed_precision,
                                 gradient_checkpointing=cfg.gradient_checkpointing)
    value = None
    if mode == "ppo":
        torch.manual_seed(seed)  # a fresh head when starting from the SFT model
        value = heads.load_scorer(reward_model_path if cfg.value_init == "reward_model" else model_path,
                                    trust_remote_code, pad_token_id=pad_id,
                                    gradient_checkpointing=cfg.gradient_checkpointing)
    model = PolicyAndValue(policy, value) if value is not None else policy
    for module in model.modules():  # as TRL's PPO: no dropout, so old and new log-probs are the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model, optimizer = loop.prepare_training(accelerator, model, cfg.learning_rate, cfg.weight_decay)
    updates = cfg.max_steps * cfg.num_ppo_epochs * cfg.num_mini_batches
    schedule = loop.make_scheduler(optimizer, cfg.scheduler, int(cfg.warmup_ratio * updates), updates)
    accelerator.register_for_checkpointing(schedule)
    sharded = sharding.is_sharded(model)

    def policy_of(m):
        inner = accelerator.unwrap_model(m)
        return inner.policy if isinstance(inner, PolicyAndValue) else inner

    eos = eos_ids(policy_of(model), tokenizer)

    # ---------------------------------------------------------------- resume
    ckpt_dir = Path(checkpoint_dir)
    hyper = {**checkpoints.math_params(cfg.model_dump()), "mode": mode}
    code = checkpoints.code_fingerprint("components.ppo")
    fp = checkpoints.fingerprint(hyper, reward_ids, rm_identity, checkpoints.model_identity(model_path),
                                 str(prompt_file), max_prompt_length, seed, code, world)
    step, history, saved = checkpoints.resume(accelerator, ckpt_dir, fp, cfg.max_steps, model, optimizer)
    position = int(saved.get("sampler_position", 0))
    generated_tokens = int(saved.get("generated_tokens", 0))
    kl_ctl = rl.AdaptiveKLController(float(saved.get("kl_coef", cfg.kl_coef)), cfg.target_kl, cfg.kl_horizon)
    guard = loop.DivergenceGuard(cfg.divergence_factor, ckpt_dir, saved.get("guard"))
    work = ckpt_dir / fp / "rollouts"
    if accelerator.is_main_process:
        work.mkdir(parents=True, exist_ok=True)

    def scorer(prompt, group):  # text and the reward functions (the true reward), on the process that sampled
        online.score(prompt, group, tokenizer, reward_fns, reward_weights)

    params = {**cfg.model_dump(), "mode": mode, "world_size": world, "seed": seed,
              "max_prompt_length": max_prompt_length, "reward_hashes": reward_ids, "model": model_path}
    with tracking.stage_tracking(accelerator, mode, params, [model_path, reward_model_path, str(prompt_file)],
                                 track) as mlrun:
        bar = logs.progress(cfg.max_steps, step, mode, accelerator.is_local_main_process)
        t_start = time.perf_counter()
        while step < cfg.max_steps:
            timing = defaultdict(float)
            # ------------------------------------------------------------ generate
            unwrapped = policy_of(model)
            policy_hash = online.policy_hash(accelerator, unwrapped, sharded)
            unwrapped.eval()
            chosen = sampler.take(position, cfg.prompts_per_step)
            position += cfg.prompts_per_step
            groups = online.generate_groups(accelerator, unwrapped, tokenizer, prompts, chosen, gen_cfg, seed=seed,
                                            round_=step, attempt=0, eos=eos, pad_id=pad_id, sharded=sharded,
                                            scorer=scorer, timing=timing)
            rows = [(g, c) for g in groups for c in g["completions"]]
            n = len(rows)
            row_completions = [c["ids"] for _, c in rows]
            # micro-batches of whole groups (a group's G completions share one row behind their prompt), spread
            # over processes (equal counts: padding weighs 0)
            per_mb = max(1, cfg.micro_batch_size // G)
            mbs = [list(range(i, min(i + per_mb, len(groups)))) for i in range(0, len(groups), per_mb)]

            def rows_of(group_sel):
                return [k * G + j for k in group_sel for j in range(G)]

            def policy_logps(net, group_sel, with_entropy=False, groups=groups):
                return logprobs.group_token_logps(net, [prompts[groups[k]["prompt"]].ids for k in group_sel],
                                                 [[c["ids"] for c in groups[k]["completions"]] for k in group_sel],
                                                 pad_id, accelerator.device, cfg.temperature, with_entropy)

            # ------------------------------------------------------------ score, old / ref log-probs, values
            t0 = time.perf_counter()
            local: dict[int, dict] = {}
            with torch.no_grad():
                for (k,), padding in loop.even_shard([[k] for k in range(len(mbs))], rank, world):
                    if padding and not sharded:
                        continue
                    sel = rows_of(mbs[k])
                    group_prompts = [prompts[groups[g]["prompt"]].ids for g in mbs[k]]
                    grouped = [[c["ids"] for c in groups[g]["completions"]] for g in mbs[k]]
                    with accelerator.autocast():
                        inner = accelerator.unwrap_model(model)
                        if isinstance(inner, PolicyAndValue):
                            old, mask, _, values = inner(group_prompts, grouped, pad_id, cfg.temperature)
                        else:
                            # without FSDP not through DDP: a process whose micro-batch is padding skips it,
                            # and DDP's buffer broadcast in a forward is a collective
                            old, mask, _ = policy_logps(model if sharded else inner, mbs[k])
                            values = None
                        ref = policy_logps(ref_model, mbs[k])[0] if ref_model is not None else None
                        rm = (heads.group_end_scores(reward_model, group_prompts, grouped, pad_id, accelerator.device)
                              if reward_model is not None else None)
                    if padding:
                        continue
                    for j, i in enumerate(sel):
                        L = len(row_completions[i])
                        local[i] = {"old": old[j, :L].tolist(), "ref": ref[j, :L].tolist() if ref is not None else None,
                                    "values": values[j, :L].tolist() if values is not None else None,
                                    "rm": float(rm[j]) if rm is not None else None}
            per_row = online.gather_rows(accelerator, local)
            timing["reference"] += time.perf_counter() - t0
            accelerator.unwrap_model(model).train()  # policy and value model (checkpointing acts in train mode)

            # ------------------------------------------------------------ rewards and advantages (every process)
            width = max(max(len(c) for c in row_completions), 1)

            def padded(key, per_row=per_row, width=width, n=n):
                return torch.tensor([per_row[i][key] + [0.0] * (width - len(per_row[i][key])) for i in range(n)])

            resp_mask = torch.tensor([[t < len(c) for t in range(width)] for c in row_completions])
            old_t = padded("old")
            ref_t = padded("ref") if ref_model is not None else old_t.clone()
            true_reward = torch.tensor([c["reward"] for _, c in rows])
            score = torch.tensor([per_row[i]["rm"] for i in range(n)]) if use_rm else true_reward.clone()
            truncated = torch.tensor([c["truncated"] for _, c in rows])
            if cfg.missing_eos_penalty is not None:
                score = score - cfg.missing_eos_penalty * truncated.float()
            kl = rl.token_kl(old_t, ref_t, cfg.kl_estimator) * resp_mask
            kl_coef = kl_ctl.value
            if mode == "ppo":
                values_t = padded("values")
                token_rewards = rl.ppo_token_rewards(score, kl, resp_mask, kl_coef)
                if cfg.whiten_rewards:
                    token_rewards = rl.masked_whiten(token_rewards, resp_mask, shift_mean=False) * resp_mask
                adv_t, returns_t = rl.gae(token_rewards, values_t, resp_mask, cfg.gamma, cfg.lam)
                adv_t = rl.masked_whiten(adv_t, resp_mask) * resp_mask
                seq_adv = adv_t.sum(-1) / resp_mask.sum(-1).clamp(min=1)
                rlhf_reward = score - kl_coef * kl.sum(-1)
            else:
                rlhf_reward = score - kl_coef * kl.sum(-1)
                seq_adv = rl.rloo_advantages(rlhf_reward, G)
                if cfg.normalize_advantages:
                    seq_adv = (seq_adv - seq_adv.mean()) / (rl.unbiased_std(seq_adv) + rl.STD_EPS)
            mean_kl = kl.sum(-1).mean().item()
            for i, (_, c) in enumerate(rows):
                c["advantage"] = float(seq_adv[i])
                c["score"] = float(score[i])

            # ------------------------------------------------------------ rollouts of this round
            t0 = time.perf_counter()
            if accelerator.is_main_process:
                online.write_rollouts(work, step, [{
                    "round": step, "step": step, "prompt_id": prompts[g["prompt"]].id, "prompt_index": g["prompt"],
                    "prompt_ids": prompts[g["prompt"]].ids, "prompt": json.dumps(prompts[g["prompt"]].messages),
                    "answer": prompts[g["prompt"]].answer, "completion_ids": c["ids"], "completion": c["text"],
                    "truncated": c["truncated"], "sampler_logps": c["sampler_logps"], "old_logps": per_row[i]["old"],
                    "ref_logps": per_row[i]["ref"], "values": per_row[i]["values"],
                    "rm_score": per_row[i]["rm"], "score": c["score"], "reward": c["reward"],
                    **{f"reward/{k}": v for k, v in c["rewards"].items()}, "rlhf_reward": float(rlhf_reward[i]),
                    "advantage": c["advantage"],
                    "token_advantages": adv_t[i, : len(c["ids"])].tolist() if mode == "ppo" else None,
                    "returns": returns_t[i, : len(c["ids"])].tolist() if mode == "ppo" else None,
                    "seed": g["seed"], "policy_hash": policy_hash, "kl_coef": kl_coef,
                    "reward_hashes": json.dumps(reward_ids, sort_keys=True),
                } for i, (g, c) in enumerate(rows)])
            timing["write"] += time.perf_counter() - t0

            # ------------------------------------------------------------ PPO epochs over minibatches
            t0 = time.perf_counter()
            sums = defaultdict(float)
            rng = random.Random((seed * 1_000_003 + step) * 7 + 1)
            n_groups = len(groups)
            per_minibatch = -(-n_groups // cfg.num_mini_batches)
            grad_norm = None
            for _epoch in range(cfg.num_ppo_epochs):
                order = list(range(n_groups))  # shuffled by group: a group keeps its one row behind the prompt
                rng.shuffle(order)
                for start in range(0, n_groups, per_minibatch):
                    mb_groups = order[start : start + per_minibatch]
                    mb_rows = rows_of(mb_groups)
                    mb_tokens = int(resp_mask[mb_rows].sum())
                    micro = [mb_groups[i : i + per_mb] for i in range(0, len(mb_groups), per_mb)]
                    per_rank = -(-len(micro) // world)
                    mine = [(micro[k], 1.0) if k < len(micro) else (micro[k % len(micro)], 0.0)
                            for k in range(rank, per_rank * world, world)]
                    acc = defaultdict(lambda: torch.zeros((), device=accelerator.device))
                    for m, (group_sel, weight) in enumerate(mine):
                        sel = rows_of(group_sel)
                        L = max(max(len(row_completions[i]) for i in sel), 1)
                        with loop.maybe_no_sync(accelerator, model, m == len(mine) - 1):
                            with accelerator.autocast():
                                if mode == "ppo":
                                    logps, mask, entropy, vpred = model(
                                        [prompts[groups[g]["prompt"]].ids for g in group_sel],
                                        [[c["ids"] for c in groups[g]["completions"]] for g in group_sel],
                                        pad_id, cfg.temperature, True)
                                else:
                                    logps, mask, entropy = policy_logps(model, group_sel, with_entropy=True)
                            dev = logps.device
                            mask_f = mask.float()
                            old_mb = old_t[sel, :L].to(dev)
                            if mode == "ppo":
                                pg, pg_clipped = rl.ppo_policy_losses(logps, old_mb, adv_t[sel, :L].to(dev),
                                                                      cfg.cliprange)
                                vf, vf_clipped = rl.ppo_value_losses(vpred, values_t[sel, :L].to(dev),
                                                                     returns_t[sel, :L].to(dev), cfg.cliprange_value)
                                pg_share = (pg * mask_f).sum() / max(mb_tokens, 1)
                                vf_share = (vf * mask_f).sum() / max(mb_tokens, 1)
                                loss = pg_share + cfg.vf_coef * vf_share
                                acc["loss/value_avg"] += vf_share.detach() * weight
                                acc["val/clipfrac_avg"] += (vf_clipped.float() * mask_f).sum() / max(mb_tokens, 1) * weight
                                clip_frac = (pg_clipped.float() * mask_f).sum() / max(mb_tokens, 1)
                                approx_kl = (0.5 * (logps - old_mb) ** 2 * mask_f).sum() / max(mb_tokens, 1)
                            else:  # sequence-level ratio of summed log-probs, mean over the minibatch's sequences
                                seq_logps, seq_old = (logps * mask_f).sum(-1), (old_mb * mask_f).sum(-1)
                                pg, pg_clipped = rl.ppo_policy_losses(seq_logps, seq_old,
                                                                      seq_adv[sel].to(dev), cfg.cliprange)
                                pg_share = pg.sum() / len(mb_rows)
                                loss = pg_share
                                clip_frac = pg_clipped.float().sum() / len(mb_rows)
                                approx_kl = (0.5 * (seq_logps - seq_old) ** 2).sum() / len(mb_rows)
                            accelerator.backward(loss * weight * world)  # * world undoes DDP's averaging
                        acc["loss/policy_avg"] += pg_share.detach() * weight
                        acc["loss/total"] += loss.detach() * weight
                        acc["policy/clipfrac_avg"] += clip_frac.detach() * weight
                        acc["policy/approxkl_avg"] += approx_kl.detach() * weight
                        acc["policy/entropy_avg"] += (entropy * mask_f).sum() / max(mb_tokens, 1) * weight
                    keys = sorted(acc)
                    reduced = dict(zip(keys, accelerator.reduce(torch.stack([acc[k] for k in keys]), "sum").tolist(),
                                       strict=True))
                    loop.guard_finite(torch.tensor(reduced["loss/total"]), step + 1, ckpt_dir)
                    grad_norm = sharding.clip_grad_norm(accelerator, model, cfg.max_grad_norm)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                    for key, v in reduced.items():
                        sums[key] += v
                    sums["updates"] += 1
            timing["update"] += time.perf_counter() - t0
            guard.check(step + 1, abs(sums["loss/total"] / sums["updates"]), grad_norm)
            if cfg.adaptive_kl:
                kl_ctl.update(mean_kl, cfg.prompts_per_step * G)
            step += 1
            faults.maybe_crash(step)
            bar.update(1)

            round_tokens = sum(len(c) for c in row_completions)
            generated_tokens += round_tokens
            lengths = [len(c) for c in row_completions]
            row = {
                "step": step, "episode": position * G,
                "reward": rlhf_reward.mean().item(),  # the reward the policy maximises (score - KL penalty)
                "objective/scores": score.mean().item(), "objective/rlhf_reward": rlhf_reward.mean().item(),
                "objective/kl": mean_kl, "objective/non_score_reward": -kl_coef * mean_kl,
                "objective/entropy": sums["policy/entropy_avg"] / sums["updates"] * (sum(lengths) / n),
                **{k: v / sums["updates"] for k, v in sums.items() if k not in ("updates", "loss/total")},
                "true_reward": true_reward.mean().item(),  # the reward functions: the task's own score
                **({"reward_model/score": torch.tensor([per_row[i]["rm"] for i in range(n)]).mean().item()}
                   if use_rm else {}),
                **{f"rewards/{name}/mean": sum(c["rewards"][name] for _, c in rows) / n for name in reward_fns},
                "kl_coef": kl_coef, "val/num_eos_tokens": int((~truncated).sum()),
                "completions/mean_length": sum(lengths) / n, "completions/clipped_ratio": truncated.float().mean().item(),
                "learning_rate": schedule.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                **{f"time/{phase}": s for phase, s in timing.items()},
                "generated_tokens_per_second": round_tokens / max(timing["generate"], 1e-9),
                "num_tokens": generated_tokens,
            }
            history.append(row)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                tracking.log_step_metrics(mlrun, row, step)
                online.log_samples(mlrun, [{"prompt": prompts[g["prompt"]].messages[-1]["content"],
                                            "completion": c["text"], "score": c["score"], "true_reward": c["reward"],
                                            "advantage": c["advantage"]} for g, c in rows[:16]], step)
            if step % cfg.save_every == 0 and step < cfg.max_steps:
                checkpoints.save_checkpoint(accelerator, ckpt_dir, step,
                                            {"fingerprint": fp, "history": history, "guard": guard.state(),
                                             "sampler_position": position, "generated_tokens": generated_tokens,
                                             "kl_coef": kl_ctl.value},
                                            cfg.keep_checkpoints, model, optimizer)
        bar.close()

        # ------------------------------------------------------------ outputs
        final_policy = model if not isinstance(accelerator.unwrap_model(model), PolicyAndValue) else policy_of(model)
        loop.save_model_atomic(accelerator, final_policy, tokenizer, out_dir, loading.stored_dtype(model_path))
        final = {"mode": mode, **online.final_metrics(history, cfg, generated_tokens, time.perf_counter() - t_start,
                                                      world, len(prompts), ("reward", "true_reward", "objective/scores"))}
        online.publish_rollouts(accelerator, work, rollouts_dir, {"ppo": cfg.model_dump(), "mode": mode,
                                                                  "reward_hashes": reward_ids,
                                                                  "prompts": str(prompt_file), "seed": seed}, mlrun)
        if accelerator.is_main_process:
            write_csv(plots_path, history)
            write_json(metrics_path, final)
            tracking.log_step_metrics(mlrun, {f"final/{k}": v for k, v in final.items()
                                              if not isinstance(v, str)}, cfg.max_steps)
    checkpoints.clear_checkpoints(accelerator, ckpt_dir)
    return final


@stage_main("ppo")
def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params

    parser = argparse.ArgumentParser(description="classic-RLHF online stage: PPO or RLOO against the reward model")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--mode", choices=MODES, default="ppo")
    parser.add_argument("--model", default="models/sft", help="policy init and reference (default: the SFT model)")
    parser.add_argument("--reward-model", default="models/reward_model")
    parser.add_argument("--data-dir", default="data/prepared")
    parser.add_argument("--max-steps", type=int, default=None, help="override ppo.max_steps (rounds)")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    if not p.ppo.enabled:
        placeholders.ppo(args.mode)
        return
    cfg = p.ppo.for_mode(args.mode)
    if args.max_steps:
        cfg = cfg.model_copy(update={"max_steps": args.max_steps})
    result = run(cfg, args.mode, model_path=args.model, reward_model_path=args.reward_model, data_dir=args.data_dir,
                 max_prompt_length=p.data.max_prompt_length, mixed_precision=p.compute.mixed_precision, seed=p.seed,
                 trust_remote_code=p.model.trust_remote_code)
    log.info("%s done: %s", args.mode, json.dumps({k: v for k, v in result.items() if not k.startswith("config/")}))


if __name__ == "__main__":
    main()
