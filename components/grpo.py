"""Online RL stage with verifiable rewards: GRPO, Dr. GRPO, DAPO and kin (chosen by `grpo.loss_type` & co.).

    accelerate launch --config_file configs/accelerate/cpu.yaml -m components.grpo --params params.yaml

Per generation round: the sampler takes `prompts_per_step` prompts (a seeded permutation per epoch, its position
checkpointed), HF `generate` samples G completions each (seeded per chunk of prompts; chunks split over processes
independently of the world size, so N processes follow one) -- or G multi-turn episodes with an `environment` and
its tools (core/train/episodes.py) --, the reward functions score them, core/algos/rl.py turns rewards into
advantages, and `num_iterations` optimizer steps minimise the surrogate on them. Rounds are sampled in place or,
with `max_staleness` > 0, ahead by a rollout thread (core/train/async_rounds.py).

Every round is written as a rollout table (one row per completion: ids, text, sampler / old / reference log-probs,
each reward, advantage, seed, the sampling weights' hash), beside the run's checkpoints while it trains and in
artifacts/rollouts/ at the end. Checkpoints fall between rounds: N steps uninterrupted == crash + resume, bit for bit
on CPU. Writes models/grpo/, metrics/grpo.json (TRL's names), plots/grpo.csv and one MLflow run.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from components.core.algos import reward_functions, rl
from components.core.config import GRPOConfig, Runtime
from components.core.model import loading, logprobs, sharding
from components.core.model.generation import eos_ids
from components.core.ops import faults, logs, placeholders, tracking
from components.core.ops.io import write_csv, write_json
from components.core.ops.logs import result_line, stage_main
from components.core.train import async_rounds, checkpoints, episodes, heldout, loop, online, rollouts

log = logging.getLogger("alignflow.grpo")


@dataclass(frozen=True)
class Setup:
    """What every round reads, built once before the loop (the sampler's position and the weights move on)."""

    cfg: GRPOConfig
    accelerator: object
    model: torch.nn.Module  # prepared for training: one device, DDP or FSDP2 shards
    ref_model: torch.nn.Module | None  # None with beta 0, or with LoRA (the reference is the base, adapters off)
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    prompts: list[online.Prompt]
    sampler: online.PromptSampler
    sampling: online.Sampling
    scorer: Callable  # scorer(prompt, completions): text and rewards onto each completion (online.score)
    reward_ids: dict[str, str]  # reward function -> code hash
    seed: int
    sharded: bool
    ckpt_dir: Path
    work: Path  # this run's rollout tables, beside its checkpoints


@dataclass(frozen=True)
class Round:
    """One generation round, as sampled."""

    index: int
    policy_hash: str  # the weights that sampled it
    groups: list[dict]  # every group generated (dynamic sampling may drop some)
    kept: list[dict]  # the groups trained on
    first_zero_frac: float  # frac_reward_zero_std of the first batch


@dataclass
class Batch:
    """A round as training data: its rows, advantages and micro-batches, the same for its num_iterations steps."""

    rows: list[tuple[dict, dict]]  # (group, completion) of the kept groups, group-major: (N,)
    rewards: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)
    group_std: torch.Tensor  # (N,) each row's group std
    micro_batches: list[list[int]]  # row indices, whole groups (a prompt is computed once per micro-batch row)
    passes: list[tuple[int, float]]  # this rank's (micro-batch, weight): equal counts on every rank, padding 0
    totals: rl.Totals
    old: dict[int, torch.Tensor]  # micro-batch -> the sampling policy's token log-probs (num_iterations > 1)
    ref: dict[int, torch.Tensor]  # micro-batch -> the reference's token log-probs (beta > 0)


# ----------------------------------------------------------------------------- the stage

def run(cfg: GRPOConfig, *, model_path: str = "models/sft", data_dir: str = "data/prepared",
        out_dir: str = "models/grpo", rollouts_dir: str = "artifacts/rollouts", metrics_path: str = "metrics/grpo.json",
        plots_path: str = "plots/grpo.csv", checkpoint_dir: str = "checkpoints/grpo", runtime: Runtime = Runtime(),
        track: bool = True) -> dict:
    accelerator = loop.make_accelerator(runtime.mixed_precision, runtime.deterministic)
    world, seed = accelerator.num_processes, runtime.seed
    torch.manual_seed(seed)

    # ---------------------------------------------------------------- prompts, rewards
    tokenizer = loading.load_tokenizer(model_path, runtime.trust_remote_code)
    prompt_file = online.prompt_file(data_dir, cfg.prompts, "train")
    runner = episodes.runner_for(cfg.environment, tokenizer, cfg.max_turns)  # None: single-turn completions
    tools = runner.tools if runner else None  # an environment's tools are offered in every prompt
    prompts = online.load_prompts(prompt_file, cfg.prompts, tokenizer, runtime.max_prompt_length, tools)
    eval_prompts = online.load_prompts(online.prompt_file(data_dir, cfg.prompts, "eval"), cfg.prompts, tokenizer,
                                       runtime.max_prompt_length, tools)[: cfg.eval_prompts] if cfg.eval_every else []
    reward_fns, reward_weights, reward_ids = reward_functions.load_rewards(cfg.rewards, tokenizer)
    env_ids = episodes.reward_identity(cfg.environment)  # the environment's own reward, weight 1, when there is one
    reward_ids.update(env_ids)
    reward_weights.update(dict.fromkeys(env_ids, 1.0))

    # ---------------------------------------------------------------- models, optimizer, schedule
    model, ref_model = load_models(cfg, model_path, accelerator, runtime)
    model, optimizer = loop.prepare_training(accelerator, model, cfg.learning_rate, cfg.weight_decay,
                                             cfg.optimizer_in_backward)
    schedule = loop.make_scheduler(optimizer, cfg.scheduler, int(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps)
    accelerator.register_for_checkpointing(schedule)

    # ---------------------------------------------------------------- resume
    async_rounds.share_cores(cfg.max_staleness, accelerator.device)  # before: the trainer's threads are compared
    ckpt_dir = Path(checkpoint_dir)
    fp = checkpoints.fingerprint(checkpoints.math_params(cfg.model_dump()), reward_ids,
                                 checkpoints.model_identity(model_path), str(prompt_file), runtime.max_prompt_length,
                                 seed, checkpoints.code_fingerprint("components.grpo"), world)
    step, history, saved = checkpoints.resume(accelerator, ckpt_dir, fp, cfg.max_steps, model, optimizer)
    generated_tokens = int(saved.get("generated_tokens", 0))
    guard = loop.DivergenceGuard(cfg.divergence_factor, ckpt_dir, saved.get("guard"))
    work = ckpt_dir / fp / "rollouts"  # this run's rounds; survives a crash, unlike the DVC out
    if accelerator.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
    reward_functions.seed_caches(reward_fns, work)  # remote rewards: scores already in this run's rollouts
    setup = Setup(cfg, accelerator, model, ref_model, optimizer, schedule, prompts,
                  online.PromptSampler(len(prompts), seed, int(saved.get("sampler_position", 0))),
                  online.Sampling.of(cfg, eos_ids(accelerator.unwrap_model(model), tokenizer), tokenizer.pad_token_id,
                                     episodes=runner),
                  functools.partial(online.score, tokenizer=tokenizer, reward_fns=reward_fns, weights=reward_weights),
                  reward_ids, seed, sharding.is_sharded(model), ckpt_dir, work)
    best = loop.KeepBest(cfg.best_metric if cfg.keep_best else None, cfg.best_mode, ckpt_dir / fp, history, step)
    heldout_eval = heldout.HeldOutEval(cfg.eval_every, eval_prompts, setup.sampling, seed, setup.sharded, setup.scorer,
                                       best, tokenizer, loading.stored_dtype(model_path))

    params = {**cfg.model_dump(), "world_size": world, "seed": seed, "max_prompt_length": runtime.max_prompt_length,
              "reward_hashes": reward_ids, "model": model_path}
    with tracking.stage_tracking(accelerator, "grpo", params, [model_path, str(prompt_file)], track) as mlrun:
        bar = logs.progress(cfg.max_steps, step, f"grpo ({cfg.loss_type})", accelerator.is_local_main_process)
        zero_std, t_start = online.ZeroStdWatch(cfg.zero_std_warning), time.perf_counter()
        rounds = async_rounds.make_rounds(cfg.max_staleness, functools.partial(sample_round, setup),
                                          accelerator.unwrap_model(model), setup.sharded, Round,
                                          (cfg.max_steps - 1) // cfg.num_iterations, saved.get("in_flight", []))
        while step < cfg.max_steps:
            timing = defaultdict(float)  # generate + score (chunks over ranks), here or ahead in the rollout thread
            rnd = rounds.take(step // cfg.num_iterations, timing, accelerator.unwrap_model(model))
            batch = plan_batch(cfg, rnd, accelerator.process_index, world)  # advantages, micro-batches
            reference_logps(setup, batch, timing)  # old (num_iterations > 1) and reference (beta > 0) log-probs
            t0 = time.perf_counter()
            write_round(setup, rnd, batch, step)
            timing["write"] += time.perf_counter() - t0
            round_tokens = sum(len(c["ids"]) for g in rnd.groups for c in g["completions"])
            generated_tokens += round_tokens
            sampled = round_metrics(rnd, batch, list(reward_ids), round_tokens, timing)

            for _ in range(cfg.num_iterations):  # mu optimizer steps on the round
                t0 = time.perf_counter()
                reduced, grad_norm = optimizer_step(setup, batch, guard, step)
                timing["update"] += time.perf_counter() - t0
                step += 1
                faults.maybe_crash(step)
                bar.update(1)
                row = online.step_row(step, reduced, sampled, cfg.beta, schedule.get_last_lr()[0], grad_norm, timing,
                               generated_tokens)
                timing = defaultdict(float)  # phase seconds belong to the round's first step
                heldout_eval(accelerator, model, row)  # eval_every: held-out reward; keep_best: the best model kept
                history.append(row)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    tracking.log_step_metrics(mlrun, row, step)
                    rollouts.log_group_samples(mlrun, rnd.kept, prompts, step)
            zero_std.update(rnd.first_zero_frac)
            if step % cfg.save_every == 0 and step < cfg.max_steps:
                checkpoints.save_checkpoint(accelerator, ckpt_dir, step,
                                            {"fingerprint": fp, "history": history, "guard": guard.state(),
                                             "in_flight": rounds.state(),  # first: it waits for the rollout thread
                                             "sampler_position": setup.sampler.position,
                                             "generated_tokens": generated_tokens},
                                            cfg.keep_checkpoints, model, optimizer)
        bar.close()
        rounds.close()

        # ------------------------------------------------------------ outputs
        kept = best.publish(accelerator, model, tokenizer, out_dir, loading.stored_dtype(model_path))
        final = {**online.final_metrics(history, cfg, generated_tokens, time.perf_counter() - t_start, world,
                                        len(prompts)), **kept}
        rollouts.publish_rollouts(accelerator, work, rollouts_dir, {"grpo": cfg.model_dump(), "reward_hashes": reward_ids,
                                                                  "prompts": str(prompt_file), "seed": seed}, mlrun)
        if accelerator.is_main_process:
            write_csv(plots_path, history)
            write_json(metrics_path, final)
            tracking.log_step_metrics(mlrun, {f"final/{k}": v for k, v in final.items()}, cfg.max_steps)
    checkpoints.clear_checkpoints(accelerator, ckpt_dir)
    return final


def load_models(cfg: GRPOConfig, model_path: str, accelerator, runtime: Runtime):
    """(policy, reference or None): the reference only when needed (beta > 0, online_dpo) and without LoRA."""
    model = loading.load_model(model_path, runtime.trust_remote_code, cfg.lora.model_dump(),
                               mixed_precision=runtime.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing)
    ref_model = None
    if cfg.needs_reference and not cfg.lora.enabled:  # with LoRA: the base with adapters off, no second copy
        ref_model = loading.load_model(model_path, runtime.trust_remote_code, frozen=True,
                                       mixed_precision=runtime.mixed_precision)
        ref_model = sharding.prepare_frozen(accelerator, ref_model)
    return model, ref_model


# ----------------------------------------------------------------------------- the phases of a round


def sample_round(setup: Setup, index: int, timing: dict, policy, group=None) -> Round:
    """Generate and score a round with `policy` in eval mode (DAPO's dynamic sampling may sample more prompts); an
    asynchronous round's policy is the rollout thread's copy, its all-gathers over `group`."""
    cfg = setup.cfg
    policy_hash = online.policy_hash(setup.accelerator, policy, setup.sharded)
    policy.eval()
    groups, kept, first_zero_frac = online.collect_round(functools.partial(sample_groups, setup, policy, index, timing,
                                                                           group),
                                                         cfg.prompts_per_step, cfg.dynamic_sampling,
                                                         cfg.max_resample_rounds, index)
    policy.train()
    return Round(index, policy_hash, groups, kept, first_zero_frac)


def sample_groups(setup: Setup, policy, index: int, timing: dict, group, attempt: int, need: int) -> list[dict]:
    """collect_round's generate_batch: the groups of the sampler's next `need` prompts, each flagged `zero_std`
    (every completion has the same reward: no gradient)."""
    G = setup.sampling.num_generations
    chosen = setup.sampler.take(need)
    batch = online.generate_groups(setup.accelerator, policy, setup.prompts, chosen, setup.sampling, seed=setup.seed,
                                   round_=index, attempt=attempt, sharded=setup.sharded, scorer=setup.scorer,
                                   timing=timing, gather_group=group)
    _, batch_std = rl.group_advantages(torch.tensor([c["reward"] for g in batch for c in g["completions"]]), G, "none")
    for g, zero in zip(batch, rl.zero_std_groups(batch_std, G).tolist(), strict=True):
        g["zero_std"] = zero
    return batch


def plan_batch(cfg: GRPOConfig, rnd: Round, rank: int, world: int) -> Batch:
    """Group-relative advantages (also written onto each completion) and the micro-batches of the kept groups."""
    G = cfg.num_generations
    rows = [(g, c) for g in rnd.kept for c in g["completions"]]
    rewards = torch.tensor([c["reward"] for _, c in rows])
    advantages, group_std = rl.advantages_of(cfg.loss_type, rewards, G, cfg.scale_rewards)
    for (_, c), a in zip(rows, advantages.tolist(), strict=True):
        c["advantage"] = a
    counted = [0 if (cfg.mask_truncated_completions and c["truncated"]) else episodes.trained_tokens(c) for _, c in rows]
    per_mb = max(1, cfg.micro_batch_size // G) * G  # whole groups: each prompt is computed once per row
    mbs = [list(range(i, min(i + per_mb, len(rows)))) for i in range(0, len(rows), per_mb)]
    totals = rl.Totals(sequences=len(rows), tokens=sum(counted), micro_batches=len(mbs),
                       max_completion_length=cfg.max_completion_length, pairs=int((advantages > 0).sum()))
    passes = [(k, 0.0 if padding else 1.0) for k, padding in loop.equal_passes(len(mbs), rank, world)]
    return Batch(rows, rewards, advantages, group_std, mbs, passes, totals, {}, {})


def micro_batch_logps(setup: Setup, batch: Batch, net, k: int, with_entropy: bool = False):
    """(token log-probs, loss mask (truncated completions out if masked), entropy), each (B, T), of micro-batch k."""
    cfg, accelerator, G = setup.cfg, setup.accelerator, setup.sampling.num_generations
    sel = [batch.rows[i] for i in batch.micro_batches[k]]
    group_rows = [sel[i : i + G] for i in range(0, len(sel), G)]
    with accelerator.autocast():
        logps, mask, entropy = logprobs.group_token_logps(
            net, [setup.prompts[grp[0][0]["prompt"]].ids for grp in group_rows],
            [[c["ids"] for _, c in grp] for grp in group_rows], setup.sampling.pad_id, accelerator.device,
            cfg.temperature, with_entropy)
    if cfg.mask_truncated_completions:
        mask = mask & ~torch.tensor([c["truncated"] for _, c in sel], device=mask.device)[:, None]
    return logps, mask & episodes.token_mask([c for _, c in sel], mask.shape, mask.device), entropy


def reference_logps(setup: Setup, batch: Batch, timing: dict) -> None:
    """batch.old (the policy that sampled, before any update; only needed when num_iterations > 1) and batch.ref
    (beta > 0, online_dpo) for this rank's micro-batches."""
    cfg = setup.cfg
    t0 = time.perf_counter()
    with torch.no_grad():
        for k, _ in batch.passes:
            if cfg.num_iterations > 1 and k not in batch.old:
                batch.old[k] = micro_batch_logps(setup, batch, setup.model, k)[0].detach()
            if cfg.needs_reference and k not in batch.ref:
                if setup.ref_model is not None:
                    batch.ref[k] = micro_batch_logps(setup, batch, setup.ref_model, k)[0]
                else:
                    with setup.accelerator.unwrap_model(setup.model).disable_adapter():
                        batch.ref[k] = micro_batch_logps(setup, batch, setup.model, k)[0]
    timing["reference"] += time.perf_counter() - t0


def write_round(setup: Setup, rnd: Round, batch: Batch, step: int) -> None:
    """The round's rollout table (rank 0 writes it; old / reference log-probs are gathered from their ranks)."""
    lengths = [len(c["ids"]) for _, c in batch.rows]
    old_rows, ref_rows = (rollouts.gather_values(setup.accelerator, v, batch.micro_batches, lengths)
                          for v in (batch.old, batch.ref))
    if not setup.accelerator.is_main_process:
        return
    records = [rollouts.rollout_record(rnd.index, step, setup.prompts[g["prompt"]], g, c, old_rows.get(i),
                                       ref_rows.get(i), rnd.policy_hash, setup.reward_ids)
               for i, (g, c) in enumerate(batch.rows)]
    rollouts.write_rollouts(setup.work, rnd.index, records)


def round_metrics(rnd: Round, batch: Batch, reward_names: list[str], round_tokens: int, timing: dict) -> dict:
    """The round's samples, logged with each of its num_iterations steps."""
    rows = batch.rows
    lengths = [len(c["ids"]) for _, c in rows]
    terminated = [n for (_, c), n in zip(rows, lengths, strict=True) if not c["truncated"]]
    per_fn = {name: torch.tensor([c["rewards"][name] for _, c in rows]) for name in reward_names}
    return {
        "reward": batch.rewards.mean().item(), "reward_std": batch.group_std.mean().item(),
        "frac_reward_zero_std": rnd.first_zero_frac,
        **{f"rewards/{name}/mean": v.mean().item() for name, v in per_fn.items()},
        **{f"rewards/{name}/std": rl.unbiased_std(v).item() for name, v in per_fn.items()},
        "completions/mean_length": sum(lengths) / len(lengths), "completions/min_length": min(lengths),
        "completions/max_length": max(lengths),
        "completions/clipped_ratio": sum(c["truncated"] for _, c in rows) / len(rows),
        "completions/mean_terminated_length": sum(terminated) / len(terminated) if terminated else 0.0,
        "groups_generated": len(rnd.groups), "groups_kept": len(rnd.kept), **episodes.metrics([c for _, c in rows]),
        # every rank's tokens over rank 0's generation seconds (the ranks generate side by side)
        "generated_tokens_per_second": round_tokens / max(timing["generate"], 1e-9),
    }


def optimizer_step(setup: Setup, batch: Batch, guard: loop.DivergenceGuard, step: int) -> tuple[dict, object]:
    """One optimizer step on the whole round: the clipped surrogate over this rank's micro-batches, summed over
    ranks. Returns (the summed scalars, the gradient norm)."""
    cfg, accelerator, model = setup.cfg, setup.accelerator, setup.model
    world = accelerator.num_processes
    sums = defaultdict(lambda: torch.zeros((), device=accelerator.device))
    for n, (k, weight) in enumerate(batch.passes):
        adv = batch.advantages[batch.micro_batches[k]].to(accelerator.device)
        with loop.maybe_no_sync(accelerator, model, n == len(batch.passes) - 1):
            logps, mask, entropy = micro_batch_logps(setup, batch, model, k, with_entropy=True)
            old = batch.old.get(k, logps.detach())
            out = rl.policy_surrogate(logps, old, adv, mask, rl.Objective.of(cfg), batch.ref.get(k))
            if cfg.max_staleness:  # sampled by older weights: TRL's importance-sampling correction
                is_w, cut = rl.correct_off_policy(out, old, [batch.rows[i][1]["sampler_logps"]
                                                             for i in batch.micro_batches[k]], mask, cfg)
                sums["is_ratio"] += (is_w * mask * weight).sum()
                sums["is_cut"] += (cut * weight).sum()
            share = rl.aggregate(out.per_token_loss, mask, cfg.loss_type, batch.totals)
            accelerator.backward(share * weight * world)  # * world undoes DDP's averaging
        m = mask.float() * weight
        sums["loss"] += share.detach() * weight
        sums["tokens"] += m.sum()
        sums["entropy"] += (entropy * m).sum()
        if out.per_token_kl is not None:
            sums["kl"] += (out.per_token_kl.detach() * m).sum()
        for key, v in rl.clip_fractions(out.ratio.detach(), adv, mask, cfg.epsilon_low, cfg.epsilon_high,
                                                   cfg.loss_type == "cispo").items():
            sums[key] += v * weight
    reduced = {key: v.item() for key, v in loop.reduce_sums(accelerator, sums).items()}
    loop.guard_finite(torch.tensor(reduced["loss"]), step + 1, setup.ckpt_dir)
    grad_norm = loop.update(accelerator, model, setup.optimizer, cfg.max_grad_norm,
                            functools.partial(guard.check, step + 1, abs(reduced["loss"])))
    setup.schedule.step()
    return reduced, grad_norm


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
    result = run(p.grpo, model_path=args.model, data_dir=args.data_dir, out_dir=args.out, runtime=Runtime.of(p))
    log.info(result_line("grpo", result, ("reward_first", "reward_last_window", "loss", "steps", "generated_tokens_per_second"),
                         "metrics/grpo.json"))


if __name__ == "__main__":
    main()
