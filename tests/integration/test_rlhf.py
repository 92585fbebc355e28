"""Classic RLHF on the tiny model: the reward_model stage (a Hugging Face reward model, exact resume, 2 processes ==
1 process) and the ppo and rloo stages (exact resume with rollouts, 2 processes == 1 process)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import competing_load, pipeline_env, run_cmd, torchrun
from test_training import column, weights, workdir

pytestmark = pytest.mark.integration


def rlhf_workdir(tiny_data: Path, dst: Path, **overrides) -> Path:
    root = workdir(tiny_data, dst, **overrides)
    shutil.copytree(root / "models/base", root / "models/sft")  # the base stands in for an SFT model
    return root


def reward_model_cmd() -> list[str]:
    return [sys.executable, "-m", "components.reward_model", "--params", "params.yaml"]


def ppo_cmd(stage: str) -> list[str]:
    """The ppo or the rloo stage (both read the ppo section)."""
    return [sys.executable, "-m", f"components.{stage}", "--params", "params.yaml"]


def two_processes(module: str, *args: str) -> list[str]:
    return [*torchrun(), "-m", module, "--params", "params.yaml", *args]


def rollouts(root: Path, stage: str):
    import pyarrow.parquet as pq

    return {f.name: pq.read_table(f).to_pylist()
            for f in sorted((root / f"artifacts/rollouts_{stage}").glob("round_*.parquet"))}


@pytest.fixture(scope="module")
def with_reward_model(tiny_data, tmp_path_factory) -> Path:
    """A workdir whose reward model was trained uninterrupted (shared by the resume and the ppo tests)."""
    root = rlhf_workdir(tiny_data, tmp_path_factory.mktemp("rm") / "whole")
    run_cmd(reward_model_cmd(), root)
    return root


def test_reward_model_is_a_hub_reward_model_and_resumes_bit_for_bit(with_reward_model, tiny_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    whole = with_reward_model
    crashed = rlhf_workdir(tiny_data, tmp_path / "crashed")
    env = pipeline_env(crashed) | {"ALIGNFLOW_CRASH_AT_STEP": "5"}  # checkpoint at 3, crash at 5
    assert subprocess.run(reward_model_cmd(), cwd=crashed, env=env, capture_output=True).returncode == 137
    run_cmd(reward_model_cmd(), crashed)
    a, b = weights(whole / "models/reward_model"), weights(crashed / "models/reward_model")
    assert a.keys() == b.keys() and "score.weight" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # what TRL's RewardTrainer writes and the evaluate judge loads: one label, a sequence-classification class
    model = AutoModelForSequenceClassification.from_pretrained(whole / "models/reward_model")
    assert model.config.num_labels == 1 and model.config.architectures[0].endswith("ForSequenceClassification")
    metrics = json.loads((whole / "metrics/reward_model.json").read_text())
    for key in ("eval/accuracy", "eval/margin", "eval/ece", "loss", "accuracy"):
        assert key in metrics, key
    calib = json.loads((whole / "plots/reward_model_calibration.json").read_text())
    assert sum(b["count"] for b in calib["bins"]) == 2 * metrics["eval/pairs"]  # each pair both ways
    # the stored held-out scores are the model's own: the judge path reproduces one
    from components.core.eval.judges import load_judge

    judge = load_judge("reward_model", str(whole / "models/reward_model"))
    assert isinstance(judge([{"role": "user", "content": "Sort: 3 1 2"}], "1 2 3"), float)
    assert not (whole / "checkpoints/reward_model").exists()


def test_reward_model_two_processes_follow_one_process(with_reward_model, tiny_data, tmp_path):
    two = rlhf_workdir(tiny_data, tmp_path / "two", reward_model__batch_size=2)  # per device: the same global batch
    run_cmd(two_processes("components.reward_model"), two)
    for name in ("loss", "accuracy", "eval/accuracy", "eval/margin"):
        a, b = column(with_reward_model / "plots/reward_model.csv", name), column(two / "plots/reward_model.csv", name)
        assert len(a) == len(b) > 0, name
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)


def _with_rm(with_reward_model: Path, tiny_data: Path, dst: Path, **overrides) -> Path:
    root = rlhf_workdir(tiny_data, dst, **overrides)
    shutil.copytree(with_reward_model / "models/reward_model", root / "models/reward_model")
    return root


@pytest.fixture(scope="module")
def ppo_whole(with_reward_model, tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted 1-process ppo run (4 rounds) on the shared reward model. Read-only."""
    root = _with_rm(with_reward_model, tiny_data, tmp_path_factory.mktemp("ppo") / "whole")
    run_cmd(ppo_cmd("ppo"), root)
    return root


def test_ppo_resumes_bit_for_bit_and_writes_rollouts(with_reward_model, ppo_whole, tiny_data, tmp_path):
    """4 rounds, checkpoints every 2: uninterrupted == crash in round 3 + resume from round 2 (weights, rollouts),
    the crashed run and its resume with busy loops beside them."""
    whole = ppo_whole
    crashed = _with_rm(with_reward_model, tiny_data, tmp_path / "crashed")
    env = pipeline_env(crashed) | {"ALIGNFLOW_CRASH_AT_STEP": "3"}
    with competing_load():
        assert subprocess.run(ppo_cmd("ppo"), cwd=crashed, env=env, capture_output=True).returncode == 137
        run_cmd(ppo_cmd("ppo"), crashed)
    a, b = weights(whole / "models/ppo"), weights(crashed / "models/ppo")
    assert "lm_head.weight" in a or "model.embed_tokens.weight" in a  # the policy, not the value model
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra, rb = rollouts(whole, "ppo"), rollouts(crashed, "ppo")
    assert len(ra) == 4 and ra == rb

    row = ra["round_000001.parquet"][0]
    n = len(row["completion_ids"])
    assert len(row["old_logps"]) == len(row["ref_logps"]) == len(row["values"]) == len(row["token_advantages"]) == n
    assert isinstance(row["rm_score"], float) and "reward/sorting" in row
    # the score trained on: the reward model's, less the missing-EOS penalty when the length limit cut it
    assert row["score"] == pytest.approx(row["rm_score"] - (1.0 if row["truncated"] else 0.0))
    assert json.loads(row["reward_hashes"])["reward_model"]
    metrics = json.loads((whole / "metrics/ppo.json").read_text())
    for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "loss/policy_avg", "loss/value_avg",
                "policy/clipfrac_avg", "val/clipfrac_avg", "true_reward", "reward_model/score",
                "config/num_ppo_epochs", "config/vf_coef", "config/gamma", "config/lam"):
        assert key in metrics, key
    assert metrics["mode"] == "ppo" and metrics["config/missing_eos_penalty"] == 1.0
    assert not (whole / "checkpoints/ppo").exists()


def test_rloo_two_processes_follow_one_process(with_reward_model, tiny_data, tmp_path):
    """One micro-batch per round: the second process only runs padding (its no-grad pass skips it, so that pass
    must not go through DDP, whose forward broadcasts buffers: a collective)."""
    rloo = {"num_ppo_epochs": 1, "num_mini_batches": 1, "micro_batch_size": 8}
    one = _with_rm(with_reward_model, tiny_data, tmp_path / "one", ppo__rloo=rloo)
    two = _with_rm(with_reward_model, tiny_data, tmp_path / "two", ppo__rloo=rloo)
    run_cmd(ppo_cmd("rloo"), one)
    run_cmd(two_processes("components.rloo"), two)
    first_one, first_two = rollouts(one, "rloo")["round_000000.parquet"], rollouts(two, "rloo")["round_000000.parquet"]
    floats = ("old_logps", "ref_logps", "sampler_logps", "rm_score", "score", "rlhf_reward", "advantage")
    strip = [{k: v for k, v in r.items() if k not in floats} for r in first_one]
    assert strip == [{k: v for k, v in r.items() if k not in floats} for r in first_two]
    # leave-one-out: each prompt's advantages sum to 0
    by_prompt: dict[int, list[float]] = {}
    for r in first_one:
        by_prompt.setdefault(r["prompt_index"], []).append(r["advantage"])
    assert all(len(v) == 2 and abs(sum(v)) < 1e-5 for v in by_prompt.values())
    for name in ("loss/policy_avg", "objective/scores", "objective/kl", "policy/entropy_avg"):
        a, b = column(one / "plots/rloo.csv", name), column(two / "plots/rloo.csv", name)
        assert len(a) == len(b) == 4, name
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)


def test_ppo_two_processes_follow_one_process(with_reward_model, ppo_whole, tiny_data, tmp_path):
    """ppo over DDP: policy and value model as one module, micro-batches of 3 over 2 minibatches of 2."""
    one = ppo_whole
    two = _with_rm(with_reward_model, tiny_data, tmp_path / "two")
    run_cmd(two_processes("components.ppo"), two)
    for name in ("loss/policy_avg", "loss/value_avg", "objective/scores", "objective/kl"):
        a, b = column(one / "plots/ppo.csv", name), column(two / "plots/ppo.csv", name)
        assert len(a) == len(b) == 4, name
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)


def test_ppo_needs_a_reward_model_or_reward_functions(tiny_data, tmp_path, monkeypatch):
    from components import rloo
    from components.core.config import Runtime, load_params

    root = rlhf_workdir(tiny_data, tmp_path / "no_rm")
    p = load_params(root / "params.yaml")
    monkeypatch.chdir(root)  # in-process: the refusal comes before any model is loaded, a launch would cost more
    with pytest.raises(ValueError, match=r"no reward model.*ppo\.reward: functions"):
        rloo.run(p.ppo.for_mode("rloo"), runtime=Runtime.of(p), track=False)
    fn = rlhf_workdir(tiny_data, tmp_path / "functions", ppo__reward="functions", ppo__max_steps=1)
    run_cmd(ppo_cmd("rloo"), fn)  # the verifiable reward alone: rloo needs no reward model
    [row] = rollouts(fn, "rloo").values()
    assert row[0]["rm_score"] is None and row[0]["score"] == pytest.approx(row[0]["reward"] - 1.0 * row[0]["truncated"])


LENGTH_REWARD = "def length_reward(prompt, completion, answer):\n    return min(len(completion), 20) / 20\n"


def test_rloo_keep_best_outputs_the_policy_of_the_best_heldout_reward(tiny_data, tmp_path):
    """rloo, eval_every 1 over 4 rounds: each round's held-out reward (the reward functions, the same prompts and
    seeds each time) is in the plots, and the output is the policy of the best round: the same bits as a run stopped
    there."""
    same = {"ppo__reward": "functions", "ppo__rewards": [{"name": "my_rewards:length_reward", "weight": 1.0}],
            "ppo__eval_every": 1, "ppo__eval_prompts": 8, "ppo__scheduler": "constant", "ppo__learning_rate": 2e-2}

    def rloo_dir(dst: Path, **overrides) -> Path:
        root = rlhf_workdir(tiny_data, dst, **same, **overrides)
        (root / "my_rewards.py").write_text(LENGTH_REWARD)
        return root

    # best_mode min: whichever way the reward moves, the lowest held-out value is kept (not the last, as a rule)
    kept = rloo_dir(tmp_path / "kept", ppo__keep_best=True, ppo__best_mode="min")
    run_cmd(ppo_cmd("rloo"), kept)
    heldout = column(kept / "plots/rloo.csv", "eval/reward")
    assert len(heldout) == 4 and len(set(heldout)) > 1
    metrics = json.loads((kept / "metrics/rloo.json").read_text())
    best_step = 1 + heldout.index(min(heldout))
    assert metrics["best/step"] == best_step and metrics["best/eval/reward"] == min(heldout)
    stopped = rloo_dir(tmp_path / "stopped", ppo__max_steps=best_step, ppo__save_every=best_step)
    run_cmd(ppo_cmd("rloo"), stopped)
    a, b = weights(kept / "models/rloo"), weights(stopped / "models/rloo")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_ppo_keep_best_keeps_the_policy(with_reward_model, tiny_data, tmp_path):
    """ppo (policy and value in one module): the kept model is the policy of the best held-out round."""
    root = _with_rm(with_reward_model, tiny_data, tmp_path / "kept", ppo__eval_every=2, ppo__eval_prompts=8,
                    ppo__keep_best=True)
    run_cmd(ppo_cmd("ppo"), root)
    heldout = column(root / "plots/ppo.csv", "eval/reward")
    metrics = json.loads((root / "metrics/ppo.json").read_text())
    assert len(heldout) == 2 and metrics["best/step"] in (2, 4) and metrics["best/eval/reward"] == max(heldout)
    assert "lm_head.weight" in weights(root / "models/ppo") or "model.embed_tokens.weight" in weights(root / "models/ppo")
