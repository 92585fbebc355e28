"""Reward-model stage: a Bradley-Terry reward model on the preference pairs, from the SFT model.

    accelerate launch --config_file configs/accelerate/cpu.yaml -m components.reward_model --params params.yaml

The SFT model gets a one-label sequence-classification head (`AutoModelForSequenceClassification`, the layout
TRL's RewardTrainer writes) and learns r(x, y) with TRL's loss: -log σ(r_c - r_r - margin), plus
`center_rewards_coefficient` · (r_c + r_r)² when set (the margin is a pair's `margin` field when the data has
one). Chosen and rejected go through one forward pass, behind one copy of their prompt (a 4D mask); the plan of micro-batches, accumulation, clipping,
checkpoints with exact resume and the divergence guard are the same as dpo's.

Writes models/reward_model/ (loads in TRL, OpenRLHF, `evaluate.judge: reward_model`), metrics/reward_model.json
(held-out accuracy, mean margin, expected calibration error), plots/reward_model_calibration.json (the reliability bins:
σ(r_c - r_r) against the observed order, each pair counted both ways), plots/reward_model.csv and an MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch

from components.core.config import RewardModelConfig, Runtime
from components.core.data import token_store
from components.core.data.tokens import pair_length
from components.core.model import heads, loading, sharding
from components.core.model.generation import generation_eos
from components.core.ops import faults, logs, placeholders, tracking
from components.core.ops.io import write_csv, write_json
from components.core.ops.logs import result_line, stage_main
from components.core.train import checkpoints, loop

log = logging.getLogger("alignflow.reward_model")


def end_at_turn(pair: dict, eos: set[int]) -> dict:
    """Each response cut after its first end-of-turn token: the chat template puts text after it (ChatML's "\n"),
    but a sampled completion stops at it, and the reward model must be read at the same token in training and in
    use (ppo, evaluate)."""
    for key in ("chosen_ids", "rejected_ids"):
        ids = pair[key]
        cut = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        pair[key] = ids[:cut]
    return pair


def margins_of(pairs: list[dict], device) -> torch.Tensor | None:
    if not any("margin" in p for p in pairs):
        return None
    return torch.tensor([float(p.get("margin", 0.0)) for p in pairs], device=device)


@torch.no_grad()
def score_pairs(model, accelerator, pairs: list[dict], batch_size: int, pad_id: int) -> tuple[list[float], list[float]]:
    """Rewards of every pair (all processes, every process gets all; padding batches dropped), in pair order."""
    model.eval()
    batches = loop.sorted_batches([pair_length(p) for p in pairs], batch_size)
    local: dict[int, list[float]] = {}
    for idx, padding in loop.even_shard(batches, accelerator.process_index, accelerator.num_processes):
        rc, rr = heads.pair_end_scores(model, [pairs[i] for i in idx], pad_id, accelerator.device)
        if not padding:
            local.update({i: [c, r] for i, c, r in zip(idx, rc.tolist(), rr.tolist(), strict=True)})
    model.train()
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        merged = {}
        for part in gather_object([local]):
            merged.update(part)
        local = merged
    return [local[i][0] for i in range(len(pairs))], [local[i][1] for i in range(len(pairs))]


def heldout_metrics(chosen: list[float], rejected: list[float], bins: int) -> tuple[dict, dict]:
    diff = torch.tensor(chosen) - torch.tensor(rejected)
    calib = heads.reliability(chosen, rejected, bins)
    metrics = {"eval/accuracy": (diff > 0).float().mean().item(), "eval/margin": diff.mean().item(),
               "eval/reward_chosen": float(torch.tensor(chosen).mean()),
               "eval/reward_rejected": float(torch.tensor(rejected).mean()), "eval/ece": calib["ece"]}
    return metrics, calib


def load_data(cfg: RewardModelConfig, model_path: str, data_dir: str, runtime: Runtime):
    """(tokenizer, train, evals): the tokenised pairs, each response cut at its first end-of-turn token (and
    without their `margin` unless cfg.use_margin)."""
    tokenizer = loading.load_tokenizer(model_path, runtime.trust_remote_code)
    eos = set(generation_eos(model_path, tokenizer))
    splits = {}
    for split in ("train", "eval"):
        pairs = token_store.load_pairs(Path(data_dir) / f"pref_{split}.jsonl", tokenizer, runtime.max_length,
                                       runtime.max_prompt_length)
        splits[split] = [end_at_turn(p, eos) for p in pairs]
        if not cfg.use_margin:
            for pair in splits[split]:
                pair.pop("margin", None)
    if not splits["train"]:
        raise ValueError(f"{data_dir}/pref_train.jsonl: no preference pairs")
    return tokenizer, splits["train"], splits["eval"]


def load_training(cfg: RewardModelConfig, model_path: str, accelerator, pad_id: int, total_steps: int,
                  runtime: Runtime):
    """(model, optimizer, lr schedule): the SFT model with a new score head (seeded by init_seed), for training."""
    torch.manual_seed(runtime.seed if cfg.init_seed is None else cfg.init_seed)  # the head's init
    model = heads.load_scorer(model_path, runtime.trust_remote_code, pad_token_id=pad_id,
                              gradient_checkpointing=cfg.gradient_checkpointing)
    torch.manual_seed(runtime.seed)
    model, optimizer = loop.prepare_training(accelerator, model, cfg.learning_rate, cfg.weight_decay)
    schedule = loop.make_scheduler(optimizer, cfg.scheduler, int(cfg.warmup_ratio * total_steps), total_steps)
    accelerator.register_for_checkpointing(schedule)
    return model, optimizer, schedule


def train_step(model, accelerator, micro_batches: list[list[int]], train: list[dict], pad_id: int,
               center_rewards_coefficient: float | None, window: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Forward and backward over one optimizer step's micro-batches (this process's share of each), adding the
    metric sums to `window`. Returns the mean loss over the step's pairs (all processes) and this process's pairs."""
    world, rank = accelerator.num_processes, accelerator.process_index
    step_pairs = sum(len(mb) for mb in micro_batches)
    step_loss = torch.zeros((), device=accelerator.device)
    pairs = 0
    for k, mb in enumerate(micro_batches):
        mine = [train[i] for i in loop.shard(mb, rank, world)]
        with loop.maybe_no_sync(accelerator, model, k == len(micro_batches) - 1):
            with accelerator.autocast():
                rc, rr = heads.pair_end_scores(model, mine, pad_id, accelerator.device)
            per_pair = heads.bradley_terry_losses(rc, rr, margins_of(mine, rc.device), center_rewards_coefficient)
            accelerator.backward(per_pair.sum() * world / step_pairs)  # global mean; * world undoes DDP
        step_loss += per_pair.detach().sum()
        window["loss"] += per_pair.detach().sum()
        window["accuracy"] += (rc > rr).float().sum().detach()
        window["margin"] += (rc - rr).sum().detach()
        window["mean_reward"] += ((rc + rr) / 2).sum().detach()
        pairs += len(mine)
    return accelerator.reduce(step_loss, reduction="sum") / step_pairs, pairs


def write_outputs(final: dict, history: list[dict], calibration: dict, chosen: list[float], rejected: list[float],
                  *, metrics_path: str, calibration_path: str, plots_path: str) -> None:
    """metrics/reward_model.json, the training curve and the reliability bins with the held-out rewards."""
    write_csv(plots_path, history)
    write_json(metrics_path, final)
    Path(calibration_path).parent.mkdir(parents=True, exist_ok=True)
    write_json(calibration_path, {**calibration, "accuracy": final.get("eval/accuracy"),
                                  "pairs": len(chosen), "eval_chosen": chosen, "eval_rejected": rejected})


def run(cfg: RewardModelConfig, *, model_path: str = "models/sft", data_dir: str = "data/prepared",
        out_dir: str = "models/reward_model", metrics_path: str = "metrics/reward_model.json",
        calibration_path: str = "plots/reward_model_calibration.json", plots_path: str = "plots/reward_model.csv",
        checkpoint_dir: str = "checkpoints/reward_model", runtime: Runtime = Runtime(), track: bool = True) -> dict:
    """Train a reward model with `cfg` (the `reward_model` params section) from model_path on the pairs of data_dir."""
    hyper = {**cfg.model_dump(), "max_length": runtime.max_length, "max_prompt_length": runtime.max_prompt_length,
             "mixed_precision": runtime.mixed_precision, "seed": runtime.seed,
             "trust_remote_code": runtime.trust_remote_code}
    if cfg.lora.enabled:
        raise ValueError("reward_model.lora: not supported (the score head is trained whole); set enabled: false")
    accelerator = loop.make_accelerator(runtime.mixed_precision, runtime.deterministic)
    world = accelerator.num_processes

    # ---------------------------------------------------------------- data
    tokenizer, train, evals = load_data(cfg, model_path, data_dir, runtime)
    plan = loop.preference_plan(train, cfg.batch_size, cfg.grad_accum, cfg.max_steps, cfg.epochs, runtime.seed, world)
    total_steps = len(plan)

    # ---------------------------------------------------------------- model (SFT + a new head), optimizer, resume
    pad_id = tokenizer.pad_token_id
    model, optimizer, schedule = load_training(cfg, model_path, accelerator, pad_id, total_steps, runtime)
    ckpt_dir = Path(checkpoint_dir)
    code = checkpoints.code_fingerprint("components.reward_model")
    fp = checkpoints.fingerprint(checkpoints.math_params(hyper), checkpoints.model_identity(model_path),
                                 str(token_store.tokens_path(Path(data_dir) / "pref_train.jsonl")), code, world)
    start_step, history, saved = checkpoints.resume(accelerator, ckpt_dir, fp, total_steps, model, optimizer)
    guard = loop.DivergenceGuard(cfg.divergence_factor, ckpt_dir, saved.get("guard"))

    # ---------------------------------------------------------------- train
    tracking_params = {**hyper, "world_size": world, "model": model_path}
    scored: tuple[list[float], list[float]] = ([], [])
    with tracking.stage_tracking(accelerator, "reward_model", tracking_params, [model_path, data_dir], track) as mlrun:
        bar = logs.progress(total_steps, start_step, "reward_model", accelerator.is_local_main_process)
        model.train()
        window: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=accelerator.device))
        window_pairs, t0 = 0, time.perf_counter()
        for step in range(start_step, total_steps):
            loss_value, pairs = train_step(model, accelerator, plan[step], train, pad_id,
                                           cfg.center_rewards_coefficient, window)
            window_pairs += pairs
            loop.guard_finite(loss_value, step + 1, ckpt_dir)
            grad_norm = sharding.clip_grad_norm(accelerator, model, cfg.max_grad_norm)
            guard.check(step + 1, loss_value.item(), grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            faults.maybe_crash(step + 1)
            bar.update(1)

            done, row = step + 1, None
            if done % cfg.log_every == 0 or done == total_steps:
                sums = loop.reduce_sums(accelerator, dict(window))
                count = accelerator.reduce(torch.tensor(float(window_pairs), device=accelerator.device), "sum")
                row = {"step": done, **{k: (v / count.clamp_min(1)).item() for k, v in sums.items()},
                       "learning_rate": schedule.get_last_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "pairs_per_second": float(count) / max(time.perf_counter() - t0, 1e-9)}
                window.clear()
                window_pairs, t0 = 0, time.perf_counter()
            if evals and (done % cfg.eval_every == 0 or done == total_steps):
                row = row or {"step": done}
                scored = score_pairs(model, accelerator, evals, cfg.batch_size, pad_id)
                row.update(heldout_metrics(*scored, cfg.calibration_bins)[0])
            if row:
                history.append(row)
                tracking.log_step_metrics(mlrun, row, done)
            if done % cfg.save_every == 0 and done < total_steps:
                checkpoints.save_checkpoint(accelerator, ckpt_dir, done, {"fingerprint": fp, "history": history,
                                                                          "guard": guard.state()},
                                            cfg.keep_checkpoints, model, optimizer)
        bar.close()

        # ------------------------------------------------------------ outputs
        # the final step was evaluated in the loop; score again only when the loop had nothing left to run (resumed
        # from the last step)
        if evals and start_step == total_steps:
            scored = score_pairs(model, accelerator, evals, cfg.batch_size, pad_id)
        chosen, rejected = scored if evals else ([], [])
        loop.save_model_atomic(accelerator, model, tokenizer, out_dir, loading.stored_dtype(model_path))
        last_train = next(r for r in reversed(history) if "loss" in r)
        final = {k: v for k, v in last_train.items() if k not in ("step", "learning_rate", "grad_norm")}
        calibration = {"bins": [], "ece": float("nan")}
        if evals:
            heldout, calibration = heldout_metrics(chosen, rejected, cfg.calibration_bins)
            final.update(heldout)
        final.update({"steps": total_steps, "world_size": world, "train/pairs": len(train), "eval/pairs": len(evals)})
        if accelerator.is_main_process:
            write_outputs(final, history, calibration, chosen, rejected, metrics_path=metrics_path,
                          calibration_path=calibration_path, plots_path=plots_path)
            tracking.log_step_metrics(mlrun, {f"final/{k}": v for k, v in final.items()}, total_steps)
    checkpoints.clear_checkpoints(accelerator, ckpt_dir)
    return final


@stage_main("reward_model")
def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params

    parser = argparse.ArgumentParser(description="Bradley-Terry reward model on the preference pairs")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models/sft", help="initialisation (default: the SFT model)")
    parser.add_argument("--data-dir", default="data/prepared")
    parser.add_argument("--out", default=placeholders.REWARD_MODEL_OUT)
    args = parser.parse_args(argv)
    p = load_params(args.params)
    if not p.reward_model.enabled:
        placeholders.reward_model(args.out)
        return
    result = run(p.reward_model, model_path=args.model, data_dir=args.data_dir, out_dir=args.out,
                 runtime=Runtime.of(p))
    log.info(result_line("reward_model", result, ("eval/accuracy", "eval/loss", "steps"),
                         "metrics/reward_model.json"))


if __name__ == "__main__":
    main()
