"""Pieces the training loops share: the accelerator, model placement, optimizer + schedule, the deterministic
step plan, equal batch counts on every rank, the non-finite-loss and divergence guards, and the final model write.

Functions, not a Trainer class: each stage's loop stays explicit and readable top to bottom in its own file
(sft.py, dpo.py, grpo.py, ...); only the parts that must behave identically live here. Loading and precision are
`model/loading.py`; checkpoints and resume are `train/checkpoints.py`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from components.core.data.tokens import bucketed_batches
from components.core.model.loading import resolve_mixed_precision
from components.core.model.sharding import active, clip_grad_norm, gradient_sync, is_sharded, shard_model
from components.core.ops import determinism
from components.core.ops.io import atomic_dir
from components.core.train.in_backward import InBackwardOptimizer, check_launch

log = logging.getLogger(__name__)

class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; no update was applied and the last checkpoint is intact."""

class DivergenceError(RuntimeError):
    """The loss or gradient norm exploded without going NaN; no update was applied, the last checkpoint is kept."""

def make_accelerator(mixed_precision: str, deterministic: bool = True):
    """The Accelerator of a stage: process group, device, autocast, RNG/scheduler state in checkpoints, with
    deterministic kernels on unless `compute.deterministic: false` (ops/determinism.py).

    Under an FSDP launch config alignflow shards the model itself with torch's FSDP2 `fully_shard`
    (`prepare_training`), the same code on GPUs (NCCL) and on CPU (gloo; accelerate ignores FSDP on CPU),
    so the sharded path is the tested one. accelerate is therefore built without its FSDP plugin.
    """
    import os

    from accelerate import Accelerator

    determinism.apply(deterministic)
    mp = resolve_mixed_precision(mixed_precision)
    if mp != "no" and not torch.cuda.is_available():
        log.warning("mixed_precision=%s requested without a GPU; training in fp32", mp)
        mp = "no"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError("DeepSpeed launch configs are not supported (its engine steps the optimizer on every "
                         "backward, which breaks alignflow's accumulation and clipping): use "
                         "compute.accelerate_config: fsdp, which shards parameters, gradients and optimizer state "
                         "as ZeRO-3 does")
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved

def prepare_training(accelerator, model, learning_rate: float, weight_decay: float,
                     in_backward: bool = False):
    """(model, optimizer) ready for the loop: DDP / single device through accelerate, or FSDP2 shards
    (the optimizer is built over the sharded parameters, as FSDP2 requires). in_backward: per-parameter
    optimizers stepped in backward (train/in_backward.py), one process; registered for checkpointing, since
    accelerate saves only the optimizers it prepared."""
    if in_backward:
        check_launch(accelerator)
        model = accelerator.prepare(model)
        optimizer = make_optimizer(model, learning_rate, weight_decay, in_backward=True)
        accelerator.register_for_checkpointing(optimizer)
        return model, optimizer
    if active(accelerator):
        if hasattr(model, "peft_config"):
            raise ValueError("LoRA under FSDP is not supported: a LoRA run keeps the frozen base whole on each "
                             "device anyway; use compute.accelerate_config: multi_gpu (DDP)")
        model = shard_model(model, accelerator.device)
        return model, make_optimizer(model, learning_rate, weight_decay)
    optimizer = make_optimizer(model, learning_rate, weight_decay)
    return accelerator.prepare(model, optimizer)

def make_optimizer(model, learning_rate: float, weight_decay: float,
                   in_backward: bool = False) -> torch.optim.Optimizer:
    """AdamW; in_backward: one AdamW per parameter (same settings, same update), each stepped in backward."""
    # no decay on norms and biases (standard practice since GPT-2)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append((name, p))

    def adamw(groups: list[dict]) -> torch.optim.AdamW:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)

    if in_backward:
        groups = ((decay, weight_decay), (no_decay, 0.0))
        return InBackwardOptimizer({name: adamw([{"params": [p], "weight_decay": wd}])
                                    for members, wd in groups for name, p in members})
    return adamw([{"params": [p for _, p in decay], "weight_decay": weight_decay},
                  {"params": [p for _, p in no_decay], "weight_decay": 0.0}])

def make_scheduler(optimizer, scheduler: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if scheduler == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # decays to 10%
        if scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

def plan_steps(
    lengths: Sequence[int], global_batch: int, grad_accum: int, max_steps: int, epochs: int, seed: int, world: int
) -> list[list[list[int]]]:
    """The whole run as data: plan[step] = the micro-batches (global example indices) of that step.

    Fixed by (data, seed, batch sizes) alone, so a resumed run replays exactly the steps it missed and
    N processes see the same global batches as one. Batches smaller than the world size are dropped.
    """
    micro: list[list[int]] = []
    epoch = 0
    steps_per_epoch = None
    while True:
        batches = [b for b in bucketed_batches(lengths, global_batch, seed, epoch) if len(b) >= world]
        if not batches:
            raise ValueError(f"not enough training examples ({len(lengths)}) for {world} processes")
        micro += batches
        steps_per_epoch = steps_per_epoch or max(1, len(batches) // grad_accum)
        epoch += 1
        total = max_steps or steps_per_epoch * epochs
        if len(micro) >= total * grad_accum:
            return [micro[s * grad_accum : (s + 1) * grad_accum] for s in range(total)]

def preference_plan(pairs: Sequence[dict], batch_size: int, grad_accum: int, max_steps: int, epochs: int, seed: int,
                    world: int) -> list[list[list[int]]]:
    """The dpo stage's plan over its tokenised pairs (`batch_size` per device). The reference stage computes the
    same plan to score only the pairs a run shorter than an epoch will see."""
    from components.core.data.tokens import pair_length

    return plan_steps([pair_length(p) for p in pairs], batch_size * world, grad_accum, max_steps, epochs, seed, world)

def planned_indices(plan: list[list[list[int]]]) -> list[int]:
    return sorted({i for step in plan for mb in step for i in mb})

def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    return list(indices[rank::world])

def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches in length order (little padding) for passes without gradients (evaluation, reference)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]

def equal_passes(n: int, rank: int, world: int) -> list[tuple[int, bool]]:
    """This rank's share of n passes (batch numbers 0..n-1), round-robin, as (k, is_padding): every rank runs
    ceil(n / world) of them, a short rank repeats pass 0 flagged as padding (run, then weighed 0 or left out).

    Every rank must run the same number of forwards and backwards: under FSDP each forward is a collective, and
    under DDP each synced backward is, so a rank with one pass fewer hangs the others.
    """
    per_rank = -(-n // world)
    mine = [(k, False) for k in range(rank, n, world)]
    return mine + [(0, True)] * (per_rank - len(mine))


def even_shard(batches: Sequence[list[int]], rank: int, world: int) -> list[tuple[list[int], bool]]:
    """This rank's batches as (indices, is_padding), by `equal_passes`."""
    return [(list(batches[k]), padding) for k, padding in equal_passes(len(batches), rank, world)]

def reduce_sums(accelerator, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each named scalar summed over all processes, in one all-reduce. Keys are stacked in sorted order, so every
    rank sends the same layout whatever order it filled its dict in."""
    keys = sorted(sums)
    stacked = accelerator.reduce(torch.stack([sums[k].float() for k in keys]), reduction="sum")
    return dict(zip(keys, stacked, strict=True))


def update(accelerator, model, optimizer, max_grad_norm: float, check: Callable[[float | None], None]) -> float | None:
    """The end of an optimizer step, after its backward passes: the gradient norm (clipped to max_grad_norm), then
    `check(norm)` (the divergence guard), then the update. An optimizer that stepped in backward
    (train/in_backward.py) has updated already: its norm is the one its hooks summed, and nothing is left to do."""
    if isinstance(optimizer, InBackwardOptimizer):
        grad_norm = optimizer.grad_norm()
        check(grad_norm)
        return grad_norm
    grad_norm = clip_grad_norm(accelerator, model, max_grad_norm)
    check(grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ----------------------------------------------------------------------------- guards


def guard_finite(loss: torch.Tensor, step: int, ckpt_dir: Path) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at step {step}; no update applied. "
            f"Last good checkpoint (if any) is kept under {ckpt_dir}. Lower the learning rate, "
            f"check the data, or use mixed_precision=bf16 instead of fp16."
        )

class DivergenceGuard:
    """Stops a run whose loss or gradient norm exceeds `factor` x its first-step value (floored at 1.0).

    The first-step values travel with the checkpoints (`state()`), so a resumed run keeps its baseline.
    """

    def __init__(self, factor: float, ckpt_dir: Path, state: dict | None = None):
        self.factor, self.ckpt_dir = factor, ckpt_dir
        self.first_loss = (state or {}).get("first_loss")
        self.first_grad_norm = (state or {}).get("first_grad_norm")

    def state(self) -> dict:
        return {"first_loss": self.first_loss, "first_grad_norm": self.first_grad_norm}

    def check(self, step: int, loss: float, grad_norm: float | None) -> None:
        if self.first_loss is None:
            self.first_loss = loss
            self.first_grad_norm = grad_norm
            return
        for name, value, first in (("loss", loss, self.first_loss), ("gradient norm", grad_norm, self.first_grad_norm)):
            if value is None or first is None:
                continue
            limit = self.factor * max(abs(first), 1.0)
            if value > limit:
                raise DivergenceError(
                    f"training diverged at step {step}: {name} {value:.4g} > {self.factor:g} x its first-step "
                    f"value {first:.4g}; no update applied. Last good checkpoint (if any) is kept under "
                    f"{self.ckpt_dir}. Lower the learning rate (or raise *.divergence_factor if this is expected)."
                )

def save_model_atomic(accelerator, model, tokenizer, out_dir: str, dtype: torch.dtype | None = None) -> None:
    """Write the final model (LoRA merged) into a temp dir and swap it in only when complete; in `dtype` when
    given (the dtype the input model was stored in: a bf16 base gives a bf16 model, not fp32 master weights)."""
    import json

    accelerator.wait_for_everyone()
    if is_sharded(model):  # every rank takes part in the gather; rank 0 receives the full weights on CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # tied parameters (embeddings = LM head) come back under every name: keep the first, as HF saves them
        seen: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                state_dict.pop(name, None)
            seen.setdefault(id(param), name)
        unwrapped = model
    else:
        unwrapped = accelerator.unwrap_model(model)
        state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    with atomic_dir(out_dir) as tmp:
        if hasattr(unwrapped, "merge_and_unload"):  # peft (never sharded: refused under FSDP): a plain model
            unwrapped = unwrapped.merge_and_unload()
            state_dict = None
        unwrapped.config.use_cache = True
        if dtype is not None and dtype != torch.float32:
            if state_dict is None:
                state_dict = unwrapped.state_dict()
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        unwrapped.save_pretrained(tmp, state_dict=state_dict, save_function=accelerator.save)
        tokenizer.save_pretrained(tmp)
        # save_pretrained names the live model's class and dtype; the weights written may differ in both
        fixes = {"dtype": str(dtype).removeprefix("torch.")} if dtype is not None and dtype != torch.float32 else {}
        if is_sharded(unwrapped):  # FSDP2 renames the class (FSDPLlamaForCausalLM): keep the model's own name
            from torch.distributed.fsdp import FSDPModule

            fixes["architectures"] = [next(c.__name__ for c in type(unwrapped).__mro__[1:] if c is not FSDPModule)]
        if fixes:
            config = json.loads((tmp / "config.json").read_text())
            (tmp / "config.json").write_text(json.dumps({**config, **fixes}, indent=2, sort_keys=True) + "\n")

def maybe_no_sync(accelerator, model, sync: bool):
    """Skip the gradient all-reduce (FSDP: reduce-scatter) on all but the last micro-batch of a step."""
    if sync or accelerator.num_processes == 1:
        return contextlib.nullcontext()
    return gradient_sync(model, False) if is_sharded(model) else accelerator.no_sync(model)


class KeepBest:
    """`<stage>.keep_best` (OpenRLHF's `--ckpt.best_metric_key`): the model at the best held-out value of `metric` so
    far is kept in `<run_dir>/best/` (the run's checkpoint dir `checkpoints/<stage>/<fingerprint>`; a plain HF dir, written atomically when a held-out row improves on it), and
    becomes the stage's output instead of the last step's; `best/step` and `best/<metric>` go to its metrics.

    Resume: the best so far is read from the checkpoint's history; a `best/` saved after the checkpoint resumed
    from (by the run that crashed) is dropped, since this run will reach, and judge, those steps again."""

    META = "alignflow_best.json"

    def __init__(self, metric: str | None, mode: str, run_dir: Path, history: list[dict], start_step: int):
        """metric None: off (publish saves the last model)."""
        self.metric, self.sign, self.dir = metric, (1.0 if mode == "min" else -1.0), Path(run_dir) / "best"
        # step 0 (sft's row of the base model) is the input, not something training made: never kept
        rows = [r for r in history if metric and metric in r and 0 < r["step"] <= start_step]
        self.best = min(rows, key=lambda r: self.sign * r[metric]) if rows else None
        meta = self.dir / self.META
        saved = json.loads(meta.read_text()) if meta.exists() else None
        if saved and (saved["step"] > start_step or self.best is None or saved["step"] != self.best["step"]):
            shutil.rmtree(self.dir, ignore_errors=True)

    def update(self, accelerator, model, tokenizer, row: dict, dtype) -> None:
        """Every rank calls it with the same row (held-out metrics are reduced over ranks)."""
        if not self.metric or self.metric not in row:
            return
        if self.best is not None and self.sign * row[self.metric] >= self.sign * self.best[self.metric]:
            return
        self.best = {"step": row["step"], self.metric: row[self.metric]}
        config = accelerator.unwrap_model(model).config
        use_cache = config.use_cache
        save_model_atomic(accelerator, model, tokenizer, str(self.dir), dtype)
        config.use_cache = use_cache  # save_model_atomic sets it for inference; training goes on
        if accelerator.is_main_process:
            (self.dir / self.META).write_text(json.dumps({"step": row["step"], "metric": self.metric,
                                                          "value": row[self.metric]}))

    def publish(self, accelerator, model, tokenizer, out_dir: str, dtype) -> dict:
        """The stage's output: the best model when there is one, else the last. Returns its metrics."""
        if not self.metric or self.best is None or not (self.dir / self.META).exists():
            save_model_atomic(accelerator, model, tokenizer, out_dir, dtype)
            return {}
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with atomic_dir(out_dir) as tmp:
                for f in self.dir.iterdir():
                    if f.name != self.META:
                        shutil.copy2(f, tmp / f.name)
        log.info("output: the model of step %d, best %s %.6g", self.best["step"], self.metric, self.best[self.metric])
        return {"best/step": self.best["step"], f"best/{self.metric}": self.best[self.metric]}
