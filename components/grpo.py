"""Online RL stage with verifiable rewards: GRPO, Dr. GRPO and DAPO (chosen by `grpo.loss_type` & co.).

    accelerate launch --config_file configs/accelerate/cpu.yaml -m components.grpo --params params.yaml

Per generation round: the sampler takes `prompts_per_step` prompts (a seeded permutation per epoch; its
position is checkpointed), HF `generate` (KV cache, batched, seeded per chunk of prompts) samples G
completions each, the reward functions score them, core/algos/rl.py turns rewards into group-relative
advantages, and `num_iterations` optimizer steps minimise the clipped surrogate on them. Rounds are
split over processes by chunks that do not depend on the world size, and every process gets the whole
round, so N processes follow one process at the same global batch.

Every round is written as a rollout table (parquet, one row per completion: ids, text, sampler
log-probs, old / reference log-probs when computed, each reward, advantage, seeds, the policy's weights
hash). Rounds are kept next to the run's checkpoints while it trains and land in artifacts/rollouts/ at the
end. Checkpoints fall between rounds, so a resumed run regenerates exactly what it missed: N steps
uninterrupted == crash + resume, bit for bit on CPU. Writes models/grpo/, artifacts/rollouts/,
metrics/grpo.json (TRL's metric names), plots/grpo.csv and one MLflow run with a sample table per log step.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch

from components.core.algos import reward_functions, rl
from components.core.config import GRPOConfig
from components.core.model import loading, logprobs, sharding
from components.core.model.generation import eos_ids
from components.core.ops import faults, logs, placeholders, tracking
from components.core.ops.io import write_csv, write_json
from components.core.ops.logs import stage_main
from components.core.train import checkpoints, loop, online
from components.core.train.online import collect_round, load_prompts

log = logging.getLogger("alignflow.grpo")



# ----------------------------------------------------------------------------- the stage

def run(cfg: GRPOConfig, *, model_path: str = "models/sft", data_dir: str = "data/prepared",
        out_dir: str = "models/grpo", rollouts_dir: str = "artifacts/rollouts", metrics_path: str = "metrics/grpo.json",
        plots_path: str = "plots/grpo.csv", checkpoint_dir: str = "checkpoints/grpo", max_prompt_length: int = 96,
        mixed_precision: str = "auto", seed: int = 1234, trust_remote_code: bool = False, track: bool = True) -> dict:
    accelerator = loop.make_accelerator(mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(seed)
    G = cfg.num_generations

    # ---------------------------------------------------------------- prompts, rewards
    tokenizer = loading.load_tokenizer(model_path, trust_remote_code)
    prompt_file = Path(data_dir) / f"{cfg.prompts}_train.jsonl"
    prompts = load_prompts(prompt_file, cfg.prompts, tokenizer, max_prompt_length)
    reward_fns = {r.name: reward_functions.load_reward_function(r.name) for r in cfg.rewards}
    reward_weights = {r.name: r.weight for r in cfg.rewards}
    reward_ids = {name: reward_functions.reward_identity(name) for name in reward_fns}
    sampler = online.PromptSampler(len(prompts), seed)

    # ---------------------------------------------------------------- models, optimizer, schedule
    model = loading.load_model(model_path, trust_remote_code, cfg.lora.model_dump(), mixed_precision=mixed_precision,
                                gradient_checkpointing=cfg.gradient_checkpointing)
    lora = cfg.lora.enabled
    ref_model = None
    if cfg.beta > 0 and not lora:  # with LoRA the reference is the base with adapters off: no second copy
        ref_model = loading.load_model(model_path, trust_remote_code, frozen=True, mixed_precision=mixed_precision)
        ref_model = sharding.prepare_frozen(accelerator, ref_model)
    model, optimizer = loop.prepare_training(accelerator, model, cfg.learning_rate, cfg.weight_decay)
    schedule = loop.make_scheduler(optimizer, cfg.scheduler, int(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps)
    accelerator.register_for_checkpointing(schedule)
    sharded = sharding.is_sharded(model)
    eos = eos_ids(accelerator.unwrap_model(model), tokenizer)
    pad_id = tokenizer.pad_token_id

    # ---------------------------------------------------------------- resume
    ckpt_dir = Path(checkpoint_dir)
    hyper = checkpoints.math_params(cfg.model_dump())
    code = checkpoints.code_fingerprint("components.grpo")
    fp = checkpoints.fingerprint(hyper, reward_ids, checkpoints.model_identity(model_path), str(prompt_file),
                                 max_prompt_length, seed, code, world)
    step, history, saved = checkpoints.resume(accelerator, ckpt_dir, fp, cfg.max_steps, model, optimizer)
    position = int(saved.get("sampler_position", 0))
    generated_tokens = int(saved.get("generated_tokens", 0))
    guard = loop.DivergenceGuard(cfg.divergence_factor, ckpt_dir, saved.get("guard"))
    work = ckpt_dir / fp / "rollouts"  # this run's rounds; survives a crash, unlike the DVC out
    if accelerator.is_main_process:
        work.mkdir(parents=True, exist_ok=True)

    params = {**cfg.model_dump(), "world_size": world, "seed": seed, "max_prompt_length": max_prompt_length,
              "reward_hashes": reward_ids, "model": model_path}
    with tracking.stage_tracking(accelerator, "grpo", params, [model_path, str(prompt_file)], track) as mlrun:
        bar = logs.progress(cfg.max_steps, step, f"grpo ({cfg.loss_type})", accelerator.is_local_main_process)
        zero_std_streak, t_start = 0, time.perf_counter()
        while step < cfg.max_steps:
            round_ = step // cfg.num_iterations
            timing = defaultdict(float)
            # ------------------------------------------------------------ generate + score (chunks over ranks)
            unwrapped = accelerator.unwrap_model(model)
            policy_hash = online.policy_hash(accelerator, unwrapped, sharded)
            unwrapped.eval()

            def generate_batch(attempt: int, need: int, round_=round_, unwrapped=unwrapped, timing=timing) -> list[dict]:
                nonlocal position
                chosen = sampler.take(position, need)
                position += need
                batch = online.generate_groups(
                    accelerator, unwrapped, tokenizer, prompts, chosen, cfg, seed=seed, round_=round_, attempt=attempt,
                    eos=eos, pad_id=pad_id, sharded=sharded, timing=timing,
                    scorer=lambda p, group: online.score(p, group, tokenizer, reward_fns, reward_weights))
                _, batch_std = rl.group_advantages(
                    torch.tensor([c["reward"] for g in batch for c in g["completions"]]), G, "none")
                for g, zero in zip(batch, rl.zero_std_groups(batch_std, G).tolist(), strict=True):
                    g["zero_std"] = zero
                return batch

            groups, kept, first_zero_frac = collect_round(generate_batch, cfg.prompts_per_step, cfg.dynamic_sampling,
                                                          cfg.max_resample_rounds, round_)
            unwrapped.train()

            # ------------------------------------------------------------ advantages, plan of micro-batches
            rows = [(g, c) for g in kept for c in g["completions"]]
            reward_t = torch.tensor([c["reward"] for _, c in rows])
            advantages, group_std = rl.group_advantages(reward_t, G, cfg.scale_rewards)
            for (_, c), a in zip(rows, advantages.tolist(), strict=True):
                c["advantage"] = a
            counted = [0 if (cfg.mask_truncated_completions and c["truncated"]) else len(c["ids"]) for _, c in rows]
            per_mb = max(1, cfg.micro_batch_size // G) * G  # whole groups: each prompt is computed once per row
            mbs = [list(range(i, min(i + per_mb, len(rows)))) for i in range(0, len(rows), per_mb)]
            totals = rl.Totals(sequences=len(rows), tokens=sum(counted), micro_batches=len(mbs),
                               max_completion_length=cfg.max_completion_length)
            per_rank = -(-len(mbs) // world)  # equal forward/backward counts on every rank (DDP); padding weighs 0
            my_mbs = [(k, 1.0) if k < len(mbs) else (k % len(mbs), 0.0)
                      for k in range(rank, per_rank * world, world)]

            def forward(net, k, with_entropy=False, rows=rows, mbs=mbs):
                sel = [rows[i] for i in mbs[k]]
                group_rows = [sel[i : i + G] for i in range(0, len(sel), G)]
                with accelerator.autocast():
                    logps, mask, entropy = logprobs.group_token_logps(
                        net, [prompts[grp[0][0]["prompt"]].ids for grp in group_rows],
                        [[c["ids"] for _, c in grp] for grp in group_rows], pad_id, accelerator.device,
                        cfg.temperature, with_entropy)
                if cfg.mask_truncated_completions:
                    mask = mask & ~torch.tensor([c["truncated"] for _, c in sel], device=mask.device)[:, None]
                return logps, mask, entropy

            old, ref = {}, {}
            t0 = time.perf_counter()
            with torch.no_grad():
                for k, _ in my_mbs:
                    if cfg.num_iterations > 1 and k not in old:  # the policy that sampled, before any update
                        old[k] = forward(model, k)[0].detach()
                    if cfg.beta > 0 and k not in ref:
                        if ref_model is not None:
                            ref[k] = forward(ref_model, k)[0]
                        else:
                            with accelerator.unwrap_model(model).disable_adapter():
                                ref[k] = forward(model, k)[0]
            timing["reference"] += time.perf_counter() - t0

            # ------------------------------------------------------------ rollouts of this round
            t0 = time.perf_counter()
            _write_round(accelerator, work, round_, step, rows, prompts, mbs, old, ref, reward_ids, policy_hash, world)
            timing["write"] += time.perf_counter() - t0
            round_tokens = sum(len(c["ids"]) for g in groups for c in g["completions"])
            generated_tokens += round_tokens
            lengths = [len(c["ids"]) for _, c in rows]
            terminated = [n for (_, c), n in zip(rows, lengths, strict=True) if not c["truncated"]]
            per_fn = {name: torch.tensor([c["rewards"][name] for _, c in rows]) for name in reward_fns}
            round_metrics = {  # the round's samples: the same for each of its num_iterations steps
                "reward": reward_t.mean().item(), "reward_std": group_std.mean().item(),
                "frac_reward_zero_std": first_zero_frac,
                **{f"rewards/{name}/mean": v.mean().item() for name, v in per_fn.items()},
                **{f"rewards/{name}/std": rl.unbiased_std(v).item() for name, v in per_fn.items()},
                "completions/mean_length": sum(lengths) / len(lengths), "completions/min_length": min(lengths),
                "completions/max_length": max(lengths),
                "completions/clipped_ratio": sum(c["truncated"] for _, c in rows) / len(rows),
                "completions/mean_terminated_length": sum(terminated) / len(terminated) if terminated else 0.0,
                "groups_generated": len(groups), "groups_kept": len(kept),
                # every rank's tokens over rank 0's generation seconds (the ranks generate side by side)
                "generated_tokens_per_second": round_tokens / max(timing["generate"], 1e-9),
            }

            # ------------------------------------------------------------ num_iterations optimizer steps
            for _ in range(cfg.num_iterations):
                t0 = time.perf_counter()
                sums = defaultdict(lambda: torch.zeros((), device=accelerator.device))
                for n, (k, weight) in enumerate(my_mbs):
                    adv = advantages[mbs[k]].to(accelerator.device)
                    with loop.maybe_no_sync(accelerator, model, n == len(my_mbs) - 1):
                        logps, mask, entropy = forward(model, k, with_entropy=True)
                        out = rl.clipped_surrogate(logps, old.get(k, logps.detach()), adv, cfg.epsilon_low,
                                                   cfg.epsilon_high, cfg.beta, ref.get(k))
                        share = rl.aggregate(out.per_token_loss, mask, cfg.loss_type, totals)
                        accelerator.backward(share * weight * world)  # * world undoes DDP's averaging
                    m = mask.float() * weight
                    sums["loss"] += share.detach() * weight
                    sums["tokens"] += m.sum()
                    sums["entropy"] += (entropy * m).sum()
                    if out.per_token_kl is not None:
                        sums["kl"] += (out.per_token_kl.detach() * m).sum()
                    for key, v in rl.clip_fractions(out.ratio.detach(), adv, mask, cfg.epsilon_low,
                                                    cfg.epsilon_high).items():
                        sums[key] += v * weight
                keys = sorted(sums)
                reduced = dict(zip(keys, accelerator.reduce(torch.stack([sums[k] for k in keys]), "sum").tolist(),
                                   strict=True))
                loss_value = torch.tensor(reduced["loss"])
                loop.guard_finite(loss_value, step + 1, ckpt_dir)
                grad_norm = sharding.clip_grad_norm(accelerator, model, cfg.max_grad_norm)
                guard.check(step + 1, abs(reduced["loss"]), grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                timing["update"] += time.perf_counter() - t0
                step += 1
                faults.maybe_crash(step)
                bar.update(1)

                tokens_n = max(reduced["tokens"], 1.0)
                row = {
                    "step": step, "loss": reduced["loss"], **round_metrics,
                    "entropy": reduced["entropy"] / tokens_n,
                    **({"kl": reduced["kl"] / tokens_n} if cfg.beta > 0 else {}),
                    "clip_ratio/low_mean": reduced["clip_ratio/low"] / tokens_n,
                    "clip_ratio/high_mean": reduced["clip_ratio/high"] / tokens_n,
                    "clip_ratio/region_mean": reduced["clip_ratio/region"] / tokens_n,
                    "learning_rate": schedule.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    **{f"time/{phase}": s for phase, s in timing.items()},
                    "num_tokens": generated_tokens,
                }
                timing = defaultdict(float)  # phase seconds belong to the round's first step
                history.append(row)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    tracking.log_step_metrics(mlrun, row, step)
                    _log_samples(mlrun, kept, prompts, step)
            zero_std_streak = zero_std_streak + 1 if first_zero_frac > cfg.zero_std_warning else 0
            if zero_std_streak == 5:
                log.warning("frac_reward_zero_std above %.2f for 5 rounds (now %.2f): most groups carry no "
                            "gradient. Raise num_generations or temperature, or set dynamic_sampling",
                            cfg.zero_std_warning, first_zero_frac)
            if step % cfg.save_every == 0 and step < cfg.max_steps:
                checkpoints.save_checkpoint(accelerator, ckpt_dir, step,
                                            {"fingerprint": fp, "history": history, "guard": guard.state(),
                                             "sampler_position": position, "generated_tokens": generated_tokens},
                                            cfg.keep_checkpoints, model, optimizer)
        bar.close()

        # ------------------------------------------------------------ outputs
        loop.save_model_atomic(accelerator, model, tokenizer, out_dir, loading.stored_dtype(model_path))
        final = online.final_metrics(history, cfg, generated_tokens, time.perf_counter() - t_start, world,
                                     len(prompts))
        online.publish_rollouts(accelerator, work, rollouts_dir, {"grpo": cfg.model_dump(), "reward_hashes": reward_ids,
                                                                  "prompts": str(prompt_file), "seed": seed}, mlrun)
        if accelerator.is_main_process:
            write_csv(plots_path, history)
            write_json(metrics_path, final)
            tracking.log_step_metrics(mlrun, {f"final/{k}": v for k, v in final.items()}, cfg.max_steps)
    checkpoints.clear_checkpoints(accelerator, ckpt_dir)
    return final


def _write_round(accelerator, work: Path, round_: int, step: int, rows, prompts, mbs, old, ref, reward_ids,
                 policy_hash: str, world: int) -> None:
    """The round's rollout table (rank 0 writes it; old / reference log-probs are gathered from their ranks)."""
    def per_row(computed: dict) -> dict[int, list[float]]:
        local = {i: computed[k][j][: len(rows[i][1]["ids"])].tolist() for k in computed for j, i in enumerate(mbs[k])}
        return online.gather_rows(accelerator, local)

    old_rows, ref_rows = per_row(old), per_row(ref)
    if not accelerator.is_main_process:
        return
    records = []
    for i, (g, c) in enumerate(rows):
        p = prompts[g["prompt"]]
        records.append({
            "round": round_, "step": step, "prompt_id": p.id, "prompt_index": g["prompt"], "prompt_ids": p.ids,
            "prompt": json.dumps(p.messages), "answer": p.answer, "completion_ids": c["ids"], "completion": c["text"],
            "truncated": c["truncated"], "sampler_logps": c["sampler_logps"], "old_logps": old_rows.get(i),
            "ref_logps": ref_rows.get(i), "reward": c["reward"], **{f"reward/{k}": v for k, v in c["rewards"].items()},
            "advantage": c["advantage"], "seed": g["seed"], "policy_hash": policy_hash,
            "reward_hashes": json.dumps(reward_ids, sort_keys=True),
        })
    online.write_rollouts(work, round_, records)


def _log_samples(mlrun, kept, prompts, step: int, n_groups: int = 4) -> None:
    online.log_samples(mlrun, [{"prompt": prompts[g["prompt"]].messages[-1]["content"], "completion": c["text"],
                                "reward": c["reward"], "advantage": c["advantage"]}
                               for g in kept[:n_groups] for c in g["completions"]], step)


@stage_main("grpo")
def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params

    parser = argparse.ArgumentParser(description="online RL stage (GRPO / Dr. GRPO / DAPO)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models/sft", help="policy init (default: the SFT model)")
    parser.add_argument("--data-dir", default="data/prepared")
    parser.add_argument("--out", default=placeholders.GRPO_OUT)
    args = parser.parse_args(argv)
    p = load_params(args.params)
    if not p.grpo.enabled:
        placeholders.grpo(args.out)
        return
    result = run(p.grpo, model_path=args.model, data_dir=args.data_dir, out_dir=args.out,
                 max_prompt_length=p.data.max_prompt_length, mixed_precision=p.compute.mixed_precision, seed=p.seed,
                 trust_remote_code=p.model.trust_remote_code)
    log.info("grpo done: %s", json.dumps({k: v for k, v in result.items() if not k.startswith("config/")}))


if __name__ == "__main__":
    main()
