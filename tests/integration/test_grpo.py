"""The grpo stage on the tiny model: exact resume after a crash (weights and rollouts), 2 processes == 1
process at the same global batch, and rollout tables that hold what the issue promises."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import competing_load, pipeline_env, run_cmd, torchrun
from test_training import assert_weights_close, column, stage, weights, workdir

pytestmark = pytest.mark.integration


# The untrained tiny model never writes numbers, so the sorting reward is 0 everywhere (no signal); a
# user-defined reward (`module:function`, importable from the stage's working directory) adds variance.
LENGTH_REWARD = "def length_reward(prompt, completion, answer):\n    return min(len(completion), 20) / 20\n"
REWARDS = [{"name": "sorting", "weight": 1.0}, {"name": "my_rewards:length_reward", "weight": 0.5}]


def grpo_workdir(tiny_data: Path, dst: Path, **overrides) -> Path:
    root = workdir(tiny_data, dst, grpo__rewards=REWARDS, **overrides)
    shutil.copytree(root / "models/base", root / "models/sft")  # the base stands in for an SFT model
    (root / "my_rewards.py").write_text(LENGTH_REWARD)
    return root


def rollouts(root: Path):
    import pyarrow.parquet as pq

    return {f.name: pq.read_table(f).to_pylist() for f in sorted((root / "artifacts/rollouts").glob("round_*.parquet"))}


def crash_then_resume(root: Path) -> Path:
    """The grpo stage in `root` killed at step 3, then run again (it resumes from its last checkpoint), both with
    busy loops beside them."""
    env = pipeline_env(root) | {"ALIGNFLOW_CRASH_AT_STEP": "3"}
    with competing_load():
        assert subprocess.run(stage("grpo"), cwd=root, env=env, capture_output=True).returncode == 137
        run_cmd(stage("grpo"), root)
    return root


# 3 generation chunks a round: under 2 processes one is short of a chunk (DDP: it samples fewer; FSDP: it samples a
# padding chunk in step)
UNEVEN = {"grpo__prompts_per_step": 6, "grpo__generation_batch_size": 2}


@pytest.fixture(scope="module")
def grpo_whole(tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted 1-process grpo run (4 steps, mu = 2, beta > 0, UNEVEN), which the resume, DDP and FSDP
    tests compare against. Read-only."""
    root = grpo_workdir(tiny_data, tmp_path_factory.mktemp("grpo") / "whole", **UNEVEN)
    run_cmd(stage("grpo"), root)
    return root


def test_grpo_resumes_bit_for_bit_and_writes_rollouts(tiny_data, grpo_whole, tmp_path):
    """4 steps, mu = 2 (two rounds), beta > 0: uninterrupted == crash at step 3 + resume from step 2, the crashed
    run and its resume with busy loops beside them (the uninterrupted one ran without)."""
    whole = grpo_whole
    crashed = crash_then_resume(grpo_workdir(tiny_data, tmp_path / "crashed", **UNEVEN))

    a, b = weights(whole / "models/grpo"), weights(crashed / "models/grpo")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra, rb = rollouts(whole), rollouts(crashed)
    assert list(ra) == ["round_000000.parquet", "round_000001.parquet"] and ra == rb
    recorded = json.loads((crashed / "artifacts/rollouts/config.json").read_text())["determinism"]
    assert recorded["deterministic"] is True and recorded["threads"] >= 1 and recorded["torch"] == torch.__version__

    rows = ra["round_000001.parquet"]
    assert len(rows) == 6 * 4  # prompts_per_step x num_generations
    row = rows[0]
    assert row["round"] == 1 and row["step"] == 2 and len(row["policy_hash"]) == 16
    assert len(row["sampler_logps"]) == len(row["completion_ids"]) == len(row["old_logps"]) == len(row["ref_logps"])
    assert all(lp <= 0 for lp in row["sampler_logps"])
    assert "reward/sorting" in row and json.loads(row["reward_hashes"])["my_rewards:length_reward"]
    assert row["reward"] == pytest.approx(row["reward/sorting"] + 0.5 * row["reward/my_rewards:length_reward"])
    # group-relative: each prompt's advantages sum to ~0
    by_prompt: dict[int, list[float]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_index"], []).append(r["advantage"])
    assert all(abs(sum(v)) < 1e-4 for v in by_prompt.values())
    # the rounds before and after the update were sampled by different weights
    assert ra["round_000000.parquet"][0]["policy_hash"] != row["policy_hash"]

    metrics = json.loads((whole / "metrics/grpo.json").read_text())
    for key in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/region_mean",
                "completions/mean_length", "completions/clipped_ratio", "generated_tokens_per_second"):
        assert key in metrics, key
    assert metrics["config/loss_type"] == "dapo" and metrics["config/beta"] == 0.04
    assert metrics["kl"] >= 0
    assert column(whole / "plots/grpo.csv", "reward") == column(crashed / "plots/grpo.csv", "reward")
    assert not (whole / "checkpoints/grpo").exists()  # cleared after success


def test_grpo_two_processes_follow_one_process(tiny_data, grpo_whole, tmp_path):
    """torchrun x2 (DDP over gloo): the chunks of a round go to both processes (2 and 1), every process trains on
    the whole round; the first round is sampled identically and the losses follow the 1-process run."""
    one = grpo_whole
    two = grpo_workdir(tiny_data, tmp_path / "two", **UNEVEN)
    run_cmd([*torchrun(), "-m", "components.grpo", "--params", "params.yaml"], two)
    first_one, first_two = rollouts(one)["round_000000.parquet"], rollouts(two)["round_000000.parquet"]
    # same samples and rewards; log-probs agree to float rounding (1 x 2 threads vs 2 x 1 thread matmuls)
    floats = ("old_logps", "ref_logps", "sampler_logps")
    assert [{k: v for k, v in r.items() if k not in floats} for r in first_one] == \
        [{k: v for k, v in r.items() if k not in floats} for r in first_two]
    for key in floats:
        a = torch.tensor([x for r in first_one for x in r[key]])
        torch.testing.assert_close(torch.tensor([x for r in first_two for x in r[key]]), a, rtol=1e-4, atol=1e-5)
    for name in ("loss", "reward", "entropy"):
        a, b = column(one / "plots/grpo.csv", name), column(two / "plots/grpo.csv", name)
        assert len(a) == len(b) == 4, name
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)


def test_async_rounds_resume_bit_for_bit_and_two_processes_follow_one(tiny_data, tmp_path):
    """max_staleness 1 (a rollout thread samples round r + 1 while round r trains), 4 rounds of one step: an
    uninterrupted run == crash at step 3 + resume from the step-2 checkpoint (which holds round 2, in flight, sampled
    by the weights of step 1), under busy loops; rounds 0 and 1 are sampled by the initial weights; torchrun x2 (each
    process its own thread and copy) follows one process."""
    same = {**UNEVEN, "grpo__max_staleness": 1, "grpo__num_iterations": 1, "grpo__save_every": 2, "grpo__log_every": 1}
    whole = grpo_workdir(tiny_data, tmp_path / "whole", **same)
    run_cmd(stage("grpo"), whole)
    crashed = grpo_workdir(tiny_data, tmp_path / "crashed", **same)
    env = pipeline_env(crashed) | {"ALIGNFLOW_CRASH_AT_STEP": "3"}
    with competing_load():
        assert subprocess.run(stage("grpo"), cwd=crashed, env=env, capture_output=True).returncode == 137
        state = json.loads(next((crashed / "checkpoints/grpo").glob("*/step_0000002/alignflow_state.json")).read_text())
        assert [r["index"] for r in state["in_flight"]] == [2]
        run_cmd(stage("grpo"), crashed)
    a, b = weights(whole / "models/grpo"), weights(crashed / "models/grpo")
    assert all(torch.equal(a[key], b[key]) for key in a)
    ra, rb = rollouts(whole), rollouts(crashed)
    assert len(ra) == 4 and ra == rb
    hashes = [table[0]["policy_hash"] for table in ra.values()]
    assert hashes[0] == hashes[1] != hashes[2] != hashes[3]  # round r sampled by the weights before step r - 1
    ratio = column(whole / "plots/grpo.csv", "sampling/importance_sampling_ratio/mean")
    assert ratio[0] == pytest.approx(1.0, abs=1e-3) and all(0 < x <= 3.0 for x in ratio)  # round 0: on-policy
    assert column(whole / "plots/grpo.csv", "time/wait")

    two = grpo_workdir(tiny_data, tmp_path / "two", **same)
    run_cmd([*torchrun(), "-m", "components.grpo", "--params", "params.yaml"], two)
    for name in ("loss", "reward", "sampling/importance_sampling_ratio/mean"):
        torch.testing.assert_close(torch.tensor(column(two / "plots/grpo.csv", name)),
                                   torch.tensor(column(whole / "plots/grpo.csv", name)), rtol=1e-4, atol=1e-5)


def test_keep_best_outputs_the_model_of_the_best_heldout_reward(tiny_data, tmp_path):
    """eval_every 1 over 4 one-step rounds: every step's held-out reward is in the plots (the same prompts and seeds
    each time), and the output is the model of the best step (not the last): the same bits as a run stopped there."""
    same = {"grpo__num_iterations": 1, "grpo__eval_every": 1, "grpo__eval_prompts": 16, "grpo__scheduler": "constant",
            "grpo__warmup_ratio": 0.0, "grpo__log_every": 1, "grpo__learning_rate": 2e-2}  # steps that move samples
    # best_mode min: the reward rises over these steps, and the lowest one is a step before the last
    kept = grpo_workdir(tiny_data, tmp_path / "kept", grpo__max_steps=4, grpo__save_every=4, grpo__keep_best=True,
                        grpo__best_mode="min", **same)
    run_cmd(stage("grpo"), kept)
    heldout = column(kept / "plots/grpo.csv", "eval/reward")
    assert len(heldout) == 4 and len(column(kept / "plots/grpo.csv", "eval/reward/sorting")) == 4
    metrics = json.loads((kept / "metrics/grpo.json").read_text())
    best_step = 1 + heldout.index(min(heldout))
    assert best_step < 4 and metrics["best/step"] == best_step and metrics["best/eval/reward"] == min(heldout)
    stopped = grpo_workdir(tiny_data, tmp_path / "stopped", grpo__max_steps=best_step, grpo__save_every=best_step,
                           **same)
    run_cmd(stage("grpo"), stopped)
    a, b = weights(kept / "models/grpo"), weights(stopped / "models/grpo")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_grpo_disabled_writes_placeholders_that_evaluate_skips(tiny_data, tmp_path):
    root = grpo_workdir(tiny_data, tmp_path / "off", grpo__enabled=False)
    run_cmd(stage("grpo"), root)
    assert json.loads((root / "models/grpo/disabled.json").read_text())["enabled"] is False
    assert (root / "artifacts/rollouts/disabled.json").exists()
    assert json.loads((root / "metrics/grpo.json").read_text())["enabled"] is False
    assert not (root / "models/grpo/config.json").exists()  # what evaluate checks before loading a policy


def test_grpo_under_fsdp_follows_one_process(tiny_data, grpo_whole, tmp_path):
    """FSDP2 (torchrun x2, gloo), beta > 0 (a sharded reference) and 3 generation chunks a round: the process
    short of a chunk samples a padding chunk in step (synced_gpus), the round is the 1-process round, the losses
    follow it, and a crash + resume goes through the sharded checkpoint."""
    one = grpo_whole
    two = grpo_workdir(tiny_data, tmp_path / "two", **UNEVEN)
    env = pipeline_env(two) | {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    launch = [*torchrun(), "-m", "components.grpo", "--params", "params.yaml"]
    crashed = subprocess.run(launch, cwd=two, env=env | {"ALIGNFLOW_CRASH_AT_STEP": "3"}, capture_output=True,
                             text=True)
    assert crashed.returncode != 0
    assert list((two / "checkpoints/grpo").glob("*/step_0000002/fsdp"))
    run_cmd(launch, two, env=env)
    first_one, first_two = rollouts(one)["round_000000.parquet"], rollouts(two)["round_000000.parquet"]
    assert first_two[0]["policy_hash"].startswith("fsdp2:")
    skip = ("old_logps", "ref_logps", "sampler_logps", "policy_hash")
    assert [{k: v for k, v in r.items() if k not in skip} for r in first_one] == \
        [{k: v for k, v in r.items() if k not in skip} for r in first_two]
    assert len(first_one) == 6 * 4
    for name in ("loss", "reward", "entropy", "kl"):
        a, b = column(one / "plots/grpo.csv", name), column(two / "plots/grpo.csv", name)
        assert len(a) == len(b) == 4, name
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)


def test_grpo_optimizer_in_backward_follows_the_usual_step(tiny_data, tmp_path):
    """The fused step (each parameter's AdamW in its grad hook) on one round of mu = 2 steps, beta > 0: the
    weights of the usual step without clipping, and the same gradient norms logged (summed in the hooks)."""
    same = {"grpo__max_steps": 2, "grpo__micro_batch_size": 16, "grpo__log_every": 1}
    # a clip threshold never reached: the usual path measures the norm and scales by exactly 1
    usual = grpo_workdir(tiny_data, tmp_path / "usual", **same, grpo__max_grad_norm=1e9)
    fused = grpo_workdir(tiny_data, tmp_path / "fused", **same, grpo__max_grad_norm=0.0,
                         grpo__optimizer_in_backward=True)
    for root in (usual, fused):
        run_cmd(stage("grpo"), root)
    assert_weights_close(usual / "models/grpo", fused / "models/grpo", 1e-5, 1e-6)
    assert column(fused / "plots/grpo.csv", "grad_norm") == pytest.approx(
        column(usual / "plots/grpo.csv", "grad_norm"), rel=1e-4)


@pytest.mark.parametrize(("loss_type", "level"), [("luspo", "sequence"), ("cispo", "token"), ("online_dpo", "token")])
def test_newer_objectives_train_through_the_stage(tiny_data, tmp_path, loss_type, level):
    """GSPO's sequence-level weight with LUSPO's length-scaled loss, CISPO's clipped weight and online DPO: one round of
    mu = 2 steps (the second step's weights differ from the sampler's, so the weights and clips are exercised)
    through the stage; the objective is recorded, the loss finite and the weights move. The math against TRL 1.16
    is tests/unit/algos/test_rl.py's."""
    root = grpo_workdir(tiny_data, tmp_path / loss_type, grpo__max_steps=2, grpo__num_iterations=2,
                        grpo__save_every=2, grpo__log_every=1, grpo__loss_type=loss_type,
                        grpo__importance_sampling_level=level,
                        grpo__epsilon_high=5.0 if loss_type == "cispo" else 0.2,
                        **({"grpo__beta": 0.0} if loss_type == "online_dpo" else {}))
    run_cmd(stage("grpo"), root)
    metrics = json.loads((root / "metrics/grpo.json").read_text())
    assert metrics["config/loss_type"] == loss_type
    assert all(torch.isfinite(torch.tensor(column(root / "plots/grpo.csv", "loss"))))
    before, after = weights(root / "models/sft"), weights(root / "models/grpo")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if loss_type == "online_dpo":  # each group's best and worst completion, against the reference's log-probs
        rows = [r for table in rollouts(root).values() for r in table]
        assert {r["advantage"] for r in rows} <= {-1.0, 0.0, 1.0} and any(r["advantage"] == 1.0 for r in rows)
        assert all(r["ref_logps"] is not None for r in rows)


def test_a_remote_reward_is_asked_once_per_completion_across_a_crash(tiny_data, tmp_path):
    """A reward served on 127.0.0.1 (scoring a completion by its length) beside the sorting reward: a run killed
    at step 3 and resumed asks the service for each (prompt, completion) once, the resumed round's scores come
    back from the run's journal, and the rollout tables hold the service's scores."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked.extend(json.dumps([m, c]) for m, c in zip(body["messages"], body["completions"], strict=True))
            out = json.dumps({"rewards": [min(len(c), 20) / 20 for c in body["completions"]]}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(out)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/score"
    try:
        root = workdir(tiny_data, tmp_path / "remote", **UNEVEN,
                       grpo__rewards=[{"name": "sorting", "weight": 1.0}, {"name": "rm", "url": url, "weight": 0.5}])
        shutil.copytree(root / "models/base", root / "models/sft")
        env = pipeline_env(root) | {"ALIGNFLOW_CRASH_AT_STEP": "3"}
        assert subprocess.run(stage("grpo"), cwd=root, env=env, capture_output=True).returncode == 137
        before_resume = len(asked)
        run_cmd(stage("grpo"), root)
    finally:
        httpd.shutdown()
    assert before_resume > 0 and len(asked) == len(set(asked))  # nothing asked twice, the resume included
    rows = [r for table in rollouts(root).values() for r in table]
    assert len(rows) == 2 * 6 * 4
    assert all(r["reward/rm"] == min(len(r["completion"]), 20) / 20 for r in rows)
    assert set(asked) == {json.dumps([json.loads(r["prompt"]), r["completion"]]) for r in rows}


# A user's environment (`module:Class`, importable from the stage's working directory) that answers every assistant
# turn with a tool result: episodes have several turns whatever the untrained model writes.
NUDGE_ENV = '''
from components.core.algos.environments import Environment, Step


class Nudge(Environment):
    tools = [{"type": "function", "function": {"name": "hint", "description": "A hint.",
                                               "parameters": {"type": "object", "properties": {}}}}]

    def step(self, message):
        return Step([{"role": "tool", "name": "hint", "content": "1 2 3"}], reward=0.25)
'''


def env_workdir(tiny_data: Path, dst: Path, **overrides) -> Path:
    root = grpo_workdir(tiny_data, dst, grpo__environment="my_envs:Nudge", grpo__max_turns=3,
                        grpo__max_completion_length=40, **overrides)
    (root / "my_envs.py").write_text(NUDGE_ENV)
    # the model's generation config stops a turn at any of 60 tokens, as a model may list several: the untrained
    # model's turns end after a few tokens
    config = root / "models/sft/generation_config.json"
    gen = json.loads(config.read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], *range(40, 100)]
    config.write_text(json.dumps(gen))
    return root


def test_environment_episodes_resume_bit_for_bit_and_two_processes_follow_one(tiny_data, tmp_path):
    """grpo.environment (a user's class), 4 one-step rounds: the rollout tables hold every turn (the environment's
    tokens masked out, the policy hash on each assistant turn, the environment's reward); an uninterrupted run ==
    crash at step 3 + resume, under busy loops; torchrun x2 samples the same episodes and follows one process."""
    same = {**UNEVEN, "grpo__num_iterations": 1, "grpo__save_every": 2}
    whole = env_workdir(tiny_data, tmp_path / "whole", **same)
    run_cmd(stage("grpo"), whole)
    ra = rollouts(whole)
    rows = [r for table in ra.values() for r in table]
    assert len(ra) == 4 and len(rows) == 4 * 6 * 4
    multi = [r for r in rows if 0 in r["completion_mask"]]
    assert len(multi) > len(rows) // 4  # many episodes have several turns
    for r in multi:
        turns = json.loads(r["turns"])
        assert [t["role"] for t in turns[:3]] == ["assistant", "tool", "assistant"]
        assert all(t["policy_hash"] == r["policy_hash"] for t in turns if t["role"] == "assistant")
        assert r["completion"] == [t for t in turns if t["role"] == "assistant"][-1]["content"]
        assert len(r["completion_mask"]) == len(r["completion_ids"]) <= 40
        assert all(lp == 0.0 for lp, m in zip(r["sampler_logps"], r["completion_mask"], strict=True) if not m)
        assert r["reward/environment"] >= 0.25 and json.loads(r["reward_hashes"])["environment"]
    assert column(whole / "plots/grpo.csv", "turns/mean")[0] > 1.0

    crashed = crash_then_resume(env_workdir(tiny_data, tmp_path / "crashed", **same))
    a, b = weights(whole / "models/grpo"), weights(crashed / "models/grpo")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert rollouts(crashed) == ra

    two = env_workdir(tiny_data, tmp_path / "two", **same)
    run_cmd([*torchrun(), "-m", "components.grpo", "--params", "params.yaml"], two)
    floats = ("old_logps", "ref_logps", "sampler_logps")
    first_one, first_two = ra["round_000000.parquet"], rollouts(two)["round_000000.parquet"]
    assert [{k: v for k, v in r.items() if k not in floats} for r in first_one] == \
        [{k: v for k, v in r.items() if k not in floats} for r in first_two]
    for name in ("loss", "reward", "turns/mean"):
        torch.testing.assert_close(torch.tensor(column(two / "plots/grpo.csv", name)),
                                   torch.tensor(column(whole / "plots/grpo.csv", name)), rtol=1e-4, atol=1e-5)
