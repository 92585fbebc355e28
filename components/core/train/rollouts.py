"""Rollout tables, the online stages' artifacts: `rollout_record` (one row per completion, the same columns in every
online stage, ppo and rloo adding theirs), `write_rollouts` (a round's parquet, written aside and renamed),
`publish_rollouts` (the run's tables into the DVC out), `log_samples` (MLflow sample tables), and `gather_rows`
(values computed on each process for its micro-batches, merged for the table's writer).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from components.core.ops import determinism
from components.core.ops.io import atomic_dir, write_json
from components.core.train.online import Prompt


def gather_rows(accelerator, local: dict[int, list[float]]) -> dict[int, list[float]]:
    """{row: values} computed on each process for its micro-batches, merged on every process."""
    if accelerator.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    merged = {}
    for part in gather_object([local]):
        merged.update(part)
    return merged


def gather_values(accelerator, computed: dict, micro_batches: list[list[int]], lengths: list[int]) -> dict[int, list[float]]:
    """{row: its completion's values}, merged from every process's micro-batches (`computed`: micro-batch -> (B, T)
    tensor; a row keeps its first lengths[row] values)."""
    local = {i: computed[k][j][: lengths[i]].tolist() for k in computed for j, i in enumerate(micro_batches[k])}
    return gather_rows(accelerator, local)


@dataclass(frozen=True)
class RLHFColumns:
    """What a ppo or rloo rollout row holds beyond grpo's (rloo: no values, token advantages or returns)."""

    values: list[float] | None  # the value model's, per token
    rm_score: float | None  # the reward model's score (None with reward: functions)
    score: float  # the score trained on: the reward model's or the functions', less the missing-EOS penalty
    rlhf_reward: float  # score - kl_coef * the sequence KL
    token_advantages: list[float] | None
    returns: list[float] | None
    kl_coef: float


def rollout_record(round_: int, step: int, prompt: Prompt, group: dict, completion: dict, old_logps, ref_logps,
                   policy_hash: str, reward_ids: dict[str, str], rlhf: RLHFColumns | None = None) -> dict:
    """One completion's row of a round's rollout table: where (round, step), the prompt, the completion as
    sampled, old / reference log-probs (None when not computed), its rewards and advantage, and what made it
    (chunk seed, policy weights hash, reward code hashes). ppo and rloo put their columns (`rlhf`) beside the
    ones they belong with; the column order is the tables' schema, so it stays as it is."""
    row = {"round": round_, "step": step, "prompt_id": prompt.id, "prompt_index": group["prompt"],
           "prompt_ids": prompt.ids, "prompt": json.dumps(prompt.messages), "answer": prompt.answer,
           "completion_ids": completion["ids"], "completion": completion["text"], "truncated": completion["truncated"],
           "sampler_logps": completion["sampler_logps"], "old_logps": old_logps, "ref_logps": ref_logps}
    if rlhf is not None:
        row.update({"values": rlhf.values, "rm_score": rlhf.rm_score, "score": rlhf.score})
    row["reward"] = completion["reward"]
    row.update({f"reward/{k}": v for k, v in completion["rewards"].items()})
    if rlhf is not None:
        row["rlhf_reward"] = rlhf.rlhf_reward
    row["advantage"] = completion["advantage"]
    if rlhf is not None:
        row.update({"token_advantages": rlhf.token_advantages, "returns": rlhf.returns})
    row.update({"seed": group["seed"], "policy_hash": policy_hash})
    if rlhf is not None:
        row["kl_coef"] = rlhf.kl_coef
    row["reward_hashes"] = json.dumps(reward_ids, sort_keys=True)
    if "turns" in completion:  # an episode (core/train/episodes.py): every turn, the policy hash on each of its own
        row.update({"completion_mask": completion["mask"], "tool_calls": completion["tool_calls"],
                    "tool_failures": completion["tool_failures"],
                    "turns": json.dumps([{**m, "policy_hash": policy_hash} if m["role"] == "assistant" else m
                                         for m in completion["turns"]])})
    return row


def write_rollouts(work: Path, round_: int, records: list[dict]) -> None:
    """A round's rollout table, `round_<N>.parquet` (one row per completion), written aside and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = work / f".round_{round_:06d}.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(records), tmp)
    tmp.replace(work / f"round_{round_:06d}.parquet")


def log_samples(mlrun, rows: list[dict], step: int) -> None:
    """An MLflow sample table (prompt, completion and the given columns) for a log step."""
    if mlrun is None or not rows:
        return
    import mlflow

    mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, artifact_file=f"samples/step_{step:06d}.json")


def log_group_samples(mlrun, groups: list[dict], prompts: list, step: int, n_groups: int = 4) -> None:
    """log_samples of the first `n_groups` groups: each completion's prompt (last message), text, reward, advantage."""
    log_samples(mlrun, [{"prompt": prompts[g["prompt"]].messages[-1]["content"], "completion": c["text"],
                         "reward": c["reward"], "advantage": c["advantage"]}
                        for g in groups[:n_groups] for c in g["completions"]], step)


def publish_rollouts(accelerator, work: Path, rollouts_dir: str, config: dict, mlrun) -> None:
    """The run's rollout tables (kept beside its checkpoints while it trained) into the DVC out, with the
    config that made them and the settings that decide their bits (ops/determinism.py), swapped in complete;
    logged to MLflow."""
    if not accelerator.is_main_process:
        return
    with atomic_dir(rollouts_dir) as tmp:
        for f in sorted(work.glob("round_*.parquet")):
            shutil.copy2(f, Path(tmp) / f.name)
        write_json(Path(tmp) / "config.json", {**config, "determinism": determinism.settings()})
    if mlrun is not None:
        import mlflow

        mlflow.log_artifacts(rollouts_dir, artifact_path="rollouts")
