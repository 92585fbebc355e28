"""The held-out reward of an online stage while it trains (`eval_every`) and the best policy by it (`keep_best`).

`heldout_reward` samples one completion per held-out prompt with seeds that are the same at every evaluation (their
own round index in the chunk seeds), so two steps' values differ by the weights alone; `HeldOutEval` is a stage's
`eval_every` + `keep_best`, the rows going through the same `loop.KeepBest` as sft's and dpo's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from components.core.train import loop
from components.core.train.online import Prompt, Sampling, generate_groups

HELDOUT_ROUND = -1  # held-out sampling's chunk seeds: the same at every evaluation, apart from every training round's


def heldout_reward(accelerator, policy, prompts: list[Prompt], sampling: Sampling, *, seed: int, sharded: bool,
                   scorer) -> dict:
    """The held-out reward of `policy`: one completion per prompt (`sampling`'s settings, G = 1) with the same seeds
    at every call, so two steps' values differ by the weights alone; scored by `scorer`. Returns {eval/reward,
    eval/reward/<fn>}, the same on every process."""
    was_training = policy.training
    policy.eval()
    groups = generate_groups(accelerator, policy, prompts, list(range(len(prompts))), replace(sampling, num_generations=1),
                             seed=seed, round_=HELDOUT_ROUND, attempt=0, sharded=sharded, scorer=scorer,
                             timing=defaultdict(float))
    policy.train(was_training)
    completions = [g["completions"][0] for g in groups]
    out = {"eval/reward": sum(c["reward"] for c in completions) / len(completions)}
    for name in completions[0]["rewards"]:
        out[f"eval/reward/{name}"] = sum(c["rewards"][name] for c in completions) / len(completions)
    return out


@dataclass(frozen=True)
class HeldOutEval:
    """An online stage's `eval_every` and `keep_best`: every `every` steps the held-out reward goes into the step's
    row (heldout_reward: `prompts`, one completion each, the same seeds every time) and `best` (loop.KeepBest)
    keeps the policy of the best row."""

    every: int
    prompts: list[Prompt]
    sampling: Sampling
    seed: int
    sharded: bool
    scorer: object
    best: loop.KeepBest
    tokenizer: object
    dtype: object

    def __call__(self, accelerator, model, row: dict) -> None:
        """`model`: the policy as the stage saves it (prepared: DDP / FSDP); it samples unwrapped."""
        if self.every and row["step"] % self.every == 0:
            row.update(heldout_reward(accelerator, accelerator.unwrap_model(model), self.prompts, self.sampling,
                                      seed=self.seed, sharded=self.sharded, scorer=self.scorer))
            self.best.update(accelerator, model, self.tokenizer, row, self.dtype)
