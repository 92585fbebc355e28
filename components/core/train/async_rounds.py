"""Where an online stage's generation rounds come from: sampled in place (`SyncRounds`, max_staleness 0) or ahead of
the trainer by a thread with its own copy of the weights (`AsyncRounds`, bounded staleness).

Asynchronous rounds (TRL's AsyncGRPO `max_staleness`, verl's one-step off-policy trainer, OpenRLHF's
`async_enable`): round r is sampled by the weights the trainer held before it trained round r - s
(s = max_staleness; rounds 0..s by the initial weights). When the trainer takes round r, round r + s is submitted
with a snapshot of its current weights, so generation of the next rounds overlaps this round's update and no round
is more than s updates old when it trains. Which weights sample which round depends on the round index alone, never
on timing: the thread runs the rounds in order, each generation chunk is seeded, the prompt sampler is drawn in
round order, and the trainer draws no random numbers meanwhile (`refuse_dropout`). A run is therefore reproducible
bit for bit, like the synchronous loop, and the stage corrects the staleness with truncated importance sampling
against the sampler's log-probs (core/algos/rl.py `behaviour_weights`).

A checkpoint waits for the rounds in flight and stores them (`state`): their weights are not in the checkpoint, so a
resumed run trains on the very rounds the uninterrupted one trained on. With several processes each runs its own
thread on its own copy, and the thread's all-gathers go over a gloo group of their own, never the trainer's.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

# generate(index, timing, model, group) -> the round: the stage's own sampling, given the weights and gather group
Generate = Callable[[int, dict, torch.nn.Module, object], object]
_rollout_threads: int | None = None  # the CPU threads set aside for the rollout thread (`share_cores`)


def share_cores(staleness: int, device) -> None:
    """On CPU with staleness > 0, split the intra-op threads between the trainer and the rollout thread (half each,
    the trainer keeping the odd one): two threads each running every core's worth of OpenMP threads thrash (measured
    in benchmarks/README.md). Called before the run's checkpoints are compared, so the trainer's thread count is the
    same at save and at resume; both counts follow from the process's, so a run stays reproducible."""
    global _rollout_threads
    if not staleness or torch.device(device).type != "cpu":
        return
    total = torch.get_num_threads()
    _rollout_threads = max(1, total // 2)
    torch.set_num_threads(max(1, total - _rollout_threads))


class SyncRounds:
    """max_staleness 0: each round sampled in place by the current weights when the trainer takes it."""

    def __init__(self, generate: Generate):
        self.generate = generate

    def take(self, index: int, timing: dict, policy: torch.nn.Module):
        return self.generate(index, timing, policy, None)

    def state(self) -> list[dict]:
        return []

    def close(self) -> None:
        pass


class AsyncRounds:
    """Rounds sampled ahead by a generator thread, at most `staleness` updates behind the trainer.

    `round_type` is the stage's round dataclass (stored as JSON in checkpoints); `saved` the rounds a checkpoint
    held in flight; `last` the last round the run trains on (nothing is sampled past it)."""

    def __init__(self, policy: torch.nn.Module, staleness: int, generate: Generate, round_type: type, last: int,
                 saved: list[dict] = ()):
        self.staleness, self.generate, self.round_type, self.last = staleness, generate, round_type, last
        self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        self.group = gather_group()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="alignflow-rollouts")
        self.futures: dict[int, Future] = {}
        for item in saved:
            done: Future = Future()
            done.set_result((round_type(**item["round"]), defaultdict(float)))
            self.futures[item["index"]] = done

    def _sample(self, snapshot: dict, index: int):
        if _rollout_threads is not None and torch.get_num_threads() != _rollout_threads:
            torch.set_num_threads(_rollout_threads)  # this thread's own OpenMP team (`share_cores`)
        self.model.load_state_dict(snapshot)
        timing = defaultdict(float)
        return self.generate(index, timing, self.model, self.group), timing

    def take(self, index: int, timing: dict, policy: torch.nn.Module):
        """Round `index` (waiting for it if the thread has not finished it; the wait is timed as `wait`), after
        submitting round index + staleness with the current weights."""
        for r in range(index, min(index + self.staleness, self.last) + 1):
            if r not in self.futures:
                snapshot = {k: v.detach().clone() for k, v in policy.state_dict().items()}
                self.futures[r] = self.pool.submit(self._sample, snapshot, r)
        t0 = time.perf_counter()
        rnd, thread_timing = self.futures.pop(index).result()
        timing["wait"] += time.perf_counter() - t0
        for phase, seconds in thread_timing.items():
            timing[phase] += seconds
        return rnd

    def state(self) -> list[dict]:
        """The rounds in flight, finished, for a checkpoint: [{index, round}] in round order."""
        return [{"index": r, "round": dataclasses.asdict(self.futures[r].result()[0])} for r in sorted(self.futures)]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def gather_group():
    """A gloo process group for the generator threads' all-gathers (None on one process): collectives of two
    threads on one group could interleave differently on each process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    return torch.distributed.new_group(backend="gloo")


def refuse_dropout(model: torch.nn.Module) -> None:
    """Asynchronous rounds need a trainer that draws no random numbers while the thread samples (both use torch's
    global generator): refuse a model with active dropout, naming it."""
    active = sorted({f"{type(m).__name__}(p={m.p})" for m in model.modules()
                     if isinstance(m, torch.nn.Dropout) and m.p > 0})
    config = getattr(model, "config", None)
    attrs = {k: v for k, v in (config.to_dict() if hasattr(config, "to_dict") else {}).items()
             if "dropout" in k and isinstance(v, float) and v > 0}
    if active or attrs:
        raise ValueError(f"grpo.max_staleness > 0 needs a model without dropout (the trainer's dropout masks would "
                         f"race the generator thread for torch's random numbers): found {active or attrs}; set the "
                         "model config's dropout to 0 (as TRL's disable_dropout) or max_staleness: 0")


def make_rounds(staleness: int, generate: Generate, policy: torch.nn.Module, sharded: bool, round_type: type,
                last: int, saved: list[dict]) -> SyncRounds | AsyncRounds:
    """The stage's round source: synchronous with staleness 0, else asynchronous (refused under FSDP, whose
    sharded weights leave no full copy for a thread to sample with)."""
    if not staleness:
        return SyncRounds(generate)
    if sharded:
        raise ValueError("grpo.max_staleness > 0 gives each process a full copy of the weights to sample with; FSDP "
                         "shards them (configs/accelerate/fsdp.yaml): use DDP (multi_gpu.yaml) or max_staleness: 0")
    refuse_dropout(policy)
    return AsyncRounds(policy, staleness, generate, round_type, last, saved)
