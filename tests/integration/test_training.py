"""Training stages on the tiny model: exact resume after a crash, 2-process CPU data parallelism,
the non-finite-loss guard, LoRA, and a deterministic reference pass."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import pipeline_env, run_cmd, torchrun
from safetensors.torch import load_file

from components.core.config import SFTConfig

pytestmark = pytest.mark.integration


def set_params(root: Path, **overrides) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def crash_at(root: Path, step: int) -> None:
    env = pipeline_env(root) | {"ALIGNFLOW_CRASH_AT_STEP": str(step)}
    proc = subprocess.run(stage("sft"), cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr[-2000:]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def assert_curves_close(a: Path, b: Path, names: tuple[str, ...], rtol: float, atol: float) -> None:
    """The named columns of two runs' plots CSVs: the same rows, each value of b within tolerance of a's."""
    for name in names:
        ca, cb = column(a, name), column(b, name)
        assert len(ca) == len(cb) > 0, name
        torch.testing.assert_close(torch.tensor(cb), torch.tensor(ca), rtol=rtol, atol=atol)


def assert_weights_close(a: Path, b: Path, rtol: float, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=rtol, atol=atol, msg=key)


def workdir(tiny_data: Path, dst: Path, **overrides) -> Path:
    """models/base + data/prepared + params.yaml (with section overrides) in a fresh directory."""
    for rel in ("models/base", "data/prepared"):
        shutil.copytree(tiny_data / rel, dst / rel)
    params = yaml.safe_load((tiny_data / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        params[section][key] = value
    (dst / "params.yaml").write_text(yaml.safe_dump(params))
    return dst


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def column(csv_path: Path, name: str) -> list[float]:
    with open(csv_path) as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


def stage(name: str) -> list[str]:
    return [sys.executable, "-m", f"components.{name}", "--params", "params.yaml"]


def section(root: Path, name: str) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())[name]


# ----------------------------------------------------------------------------- shared runs
# A stage launch costs seconds of imports and setup, the tiny training itself little: runs that several tests
# only read are made once per module. A test that writes (resumes, corrupts, changes params) works on a copy.


@pytest.fixture(scope="module")
def sft_whole(tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted sft run on the tiny params (10 steps, batch 8). Read-only."""
    root = workdir(tiny_data, tmp_path_factory.mktemp("sft") / "whole")
    run_cmd(stage("sft"), root)
    return root


@pytest.fixture(scope="module")
def sft_crashed(tiny_data, tmp_path_factory) -> Path:
    """The same sft run killed at its last step (10) with checkpoints at 3, 6 and 9 (keep_checkpoints is
    cadence, not identity: this run resumes to the weights of `sft_whole`). Read-only: copy it."""
    root = workdir(tiny_data, tmp_path_factory.mktemp("sft") / "crashed", sft__keep_checkpoints=3)
    crash_at(root, 10)
    return root


@pytest.fixture(scope="module")
def dpo_whole(tiny_data, tmp_path_factory) -> Path:
    """reference + an uninterrupted dpo run on the tiny params (sigmoid, batch 4 x 2 accumulation, 8 steps), the
    base standing in for an SFT model. Read-only."""
    root = workdir(tiny_data, tmp_path_factory.mktemp("dpo") / "whole")
    shutil.copytree(root / "models/base", root / "models/sft")
    run_cmd(stage("reference"), root)
    run_cmd(stage("dpo"), root)
    return root


def test_sft_resumes_after_crash_with_identical_weights(sft_whole, sft_crashed, tmp_path):
    whole = sft_whole
    crashed = shutil.copytree(sft_crashed, tmp_path / "crashed")  # save_every=3: checkpoints at 3, 6, 9; exit at 10
    [run_dir] = (crashed / "checkpoints/sft").iterdir()  # one directory per run identity
    assert (run_dir / "step_0000009/alignflow_state.json").exists()
    assert not (crashed / "models/sft").exists()

    set_params(crashed, sft__eval_every=2, sft__log_every=2)  # cadence is not identity: still resumes
    resumed = run_cmd(stage("sft"), crashed, env=pipeline_env(crashed) | {"ALIGNFLOW_LOG_LEVEL": "INFO"})
    assert f"resuming from checkpoints/sft/{run_dir.name}/step_0000009" in resumed.stderr
    a, b = weights(whole / "models/sft"), weights(crashed / "models/sft")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert column(whole / "plots/sft.csv", "train/loss")[:9] == column(crashed / "plots/sft.csv", "train/loss")[:9]
    assert not (crashed / "checkpoints/sft").exists()  # cleaned after success


def test_keep_best_outputs_the_best_held_out_model_and_resumes_to_it(tiny_data, sft_whole, tmp_path):
    """sft.keep_best judged by the *highest* held-out loss (so that the kept model is not the last one): training is
    the same as without it, the output is the model of that eval step and the metrics say which, and a run killed
    after it (step 8, resumed from the step-6 checkpoint) ends with the same output."""
    over = {"sft__keep_best": True, "sft__best_mode": "max"}
    whole = workdir(tiny_data, tmp_path / "whole", **over)
    run_cmd(stage("sft"), whole)
    with open(whole / "plots/sft.csv") as f:
        evals = {int(r["step"]): float(r["eval/loss"]) for r in csv.DictReader(f) if r.get("eval/loss")}
    assert sorted(evals) == [0, 5, 10]  # the base model's row (0) is never kept
    best = max((5, 10), key=evals.get)
    assert best == 5, evals  # training lowers the held-out loss: the highest is the earlier model
    metrics = json.loads((whole / "metrics/sft.json").read_text())
    assert metrics["best/step"] == 5 and metrics["best/eval/loss"] == pytest.approx(evals[5])
    assert column(whole / "plots/sft.csv", "train/loss") == column(sft_whole / "plots/sft.csv", "train/loss")
    last, kept = weights(sft_whole / "models/sft"), weights(whole / "models/sft")
    assert any(not torch.equal(last[k], kept[k]) for k in last)  # not the last step's model

    crashed = workdir(tiny_data, tmp_path / "crashed", **over)
    crash_at(crashed, 8)
    run_cmd(stage("sft"), crashed)
    assert_same_weights(whole / "models/sft", crashed / "models/sft")
    assert json.loads((crashed / "metrics/sft.json").read_text())["best/step"] == 5


def test_sft_optimizer_in_backward_resumes_exactly(tiny_data, tmp_path):
    """sft.optimizer_in_backward: every per-parameter optimizer state and the schedule are in the checkpoints,
    so a run killed at step 8 resumes (from step 6) to the weights of an uninterrupted run; the gradient norm
    summed in the hooks is logged."""
    fused = {"sft__optimizer_in_backward": True, "sft__max_grad_norm": 0.0, "sft__eval_every": 10}
    whole = workdir(tiny_data, tmp_path / "whole", **fused)
    run_cmd(stage("sft"), whole)
    crashed = workdir(tiny_data, tmp_path / "crashed", **fused)
    crash_at(crashed, 8)
    [ckpt] = crashed.glob("checkpoints/sft/*/step_0000006")
    assert (ckpt / "custom_checkpoint_0.pkl").exists() and not (ckpt / "optimizer.bin").exists()
    resumed = run_cmd(stage("sft"), crashed, env=pipeline_env(crashed) | {"ALIGNFLOW_LOG_LEVEL": "INFO"})
    assert f"resuming from {ckpt.relative_to(crashed)}" in resumed.stderr and "skipping" not in resumed.stderr
    assert_same_weights(whole / "models/sft", crashed / "models/sft")
    norms = column(whole / "plots/sft.csv", "grad_norm")
    assert len(norms) == 10 and all(0 < n < float("inf") for n in norms)
    assert column(crashed / "plots/sft.csv", "grad_norm") == norms


def test_sft_packing_follows_one_row_per_example(tiny_data, sft_whole, tmp_path):
    """sft.packing: the same token-mean loss and updates with examples packed into rows of data.max_length."""
    rows = sft_whole
    packed = workdir(tiny_data, tmp_path / "packed", sft__packing=True)
    run_cmd(stage("sft"), packed)
    assert_curves_close(rows / "plots/sft.csv", packed / "plots/sft.csv", ("train/loss", "eval/loss"), 1e-4, 1e-5)
    assert_weights_close(rows / "models/sft", packed / "models/sft", 1e-3, 1e-5)


def test_sft_two_processes_follow_one_process_loss(tiny_data, sft_whole, tmp_path):
    """torchrun x2 (gloo) at per-device batch 4 == one process at batch 8: same global batches."""
    one = sft_whole
    assert section(one, "sft")["batch_size"] == 8
    two = workdir(tiny_data, tmp_path / "two", sft__batch_size=4)
    run_cmd([*torchrun(), "-m", "components.sft", "--params", "params.yaml"], two)
    assert (two / "metrics/sft.json").read_text().count('"world_size": 2') == 1
    loss_one, loss_two = column(one / "plots/sft.csv", "train/loss"), column(two / "plots/sft.csv", "train/loss")
    assert len(loss_one) == len(loss_two) == 10
    assert loss_one[-1] < loss_one[0]
    torch.testing.assert_close(torch.tensor(loss_two), torch.tensor(loss_one), rtol=1e-4, atol=1e-5)
    eval_one, eval_two = column(one / "plots/sft.csv", "eval/loss"), column(two / "plots/sft.csv", "eval/loss")
    torch.testing.assert_close(torch.tensor(eval_two), torch.tensor(eval_one), rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    from components import sft
    from components.core.train import loop

    root = workdir(tiny_data, tmp_path / "nan")
    monkeypatch.chdir(root)
    real = sft.batch_nll
    calls = {"n": 0}

    def poisoned(model, batch):
        nll, n = real(model, batch)
        if not model.training:  # evaluation passes are not training steps
            return nll, n
        calls["n"] += 1
        return (nll * float("nan"), n) if calls["n"] == 5 else (nll, n)

    monkeypatch.setattr(sft, "batch_nll", poisoned)
    with pytest.raises(loop.NonFiniteLossError, match="step 5"):
        sft.run(SFTConfig(max_steps=10, batch_size=8, eval_every=100, save_every=3, learning_rate=3e-3),
                model_path="models/base", train_path="data/prepared/sft_train.jsonl", eval_path="data/prepared/sft_eval.jsonl", track=False)
    assert list((root / "checkpoints/sft").glob("*/step_0000003/alignflow_state.json"))
    assert not (root / "models/sft").exists()


def test_sft_with_lora_saves_a_merged_plain_model(tiny_data, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from components import sft

    root = workdir(tiny_data, tmp_path / "lora")
    monkeypatch.chdir(root)
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    result = sft.run(SFTConfig(max_steps=4, batch_size=8, learning_rate=1e-2, eval_every=4, lora=lora),
                     model_path="models/base", train_path="data/prepared/sft_train.jsonl", eval_path="data/prepared/sft_eval.jsonl", track=False)
    assert result["steps"] == 4
    merged = AutoModelForCausalLM.from_pretrained("models/sft")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = weights(root / "models/base")
    changed = weights(root / "models/sft")
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"], changed["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(base["model.layers.0.mlp.up_proj.weight"], changed["model.layers.0.mlp.up_proj.weight"])


def test_reference_then_dpo_resume_exactly(tiny_data, dpo_whole, tmp_path):
    """The reference artifact is deterministic, and DPO resumes to identical weights after a crash."""
    whole = dpo_whole
    crashed = workdir(tiny_data, tmp_path / "crashed")
    shutil.copytree(crashed / "models/base", crashed / "models/sft")  # the base stands in for an SFT model
    run_cmd(stage("reference"), crashed)
    for split in ("train", "eval"):
        a = torch.load(whole / f"artifacts/ref_logps/{split}.pt", weights_only=True)
        b = torch.load(crashed / f"artifacts/ref_logps/{split}.pt", weights_only=True)
        assert a["ids"] == b["ids"] and len(a["ids"]) > 0
        assert torch.equal(a["chosen_logps"], b["chosen_logps"])
        assert (a["chosen_tokens"] > 0).all()

    env = pipeline_env(crashed) | {"ALIGNFLOW_CRASH_AT_STEP": "5"}  # checkpoint at 3, crash at 5
    assert subprocess.run(stage("dpo"), cwd=crashed, env=env, capture_output=True).returncode == 137
    run_cmd(stage("dpo"), crashed)
    a, b = weights(whole / "models/dpo"), weights(crashed / "models/dpo")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = column(whole / "plots/dpo.csv", "rewards/accuracies")
    assert len(rows) == 8 and all(0.0 <= r <= 1.0 for r in rows)


def test_padding_free_reference_and_dpo_follow_padded_rows(tiny_data, dpo_whole, tmp_path):
    """reference.padding_free + dpo.padding_free: pairs end to end without padding score the reference log-probs
    of the padded rows, and dpo trains to the same losses and weights (dpo_whole: the padded run)."""
    padded = dpo_whole
    free = workdir(tiny_data, tmp_path / "free", reference__padding_free=True, dpo__padding_free=True)
    shutil.copytree(free / "models/base", free / "models/sft")
    run_cmd(stage("reference"), free)
    for split in ("train", "eval"):
        a, b = (torch.load(root / f"artifacts/ref_logps/{split}.pt") for root in (padded, free))
        assert a["ids"] == b["ids"] and a["token_hashes"] == b["token_hashes"]
        assert torch.equal(a["chosen_tokens"], b["chosen_tokens"]) and torch.equal(a["rejected_tokens"], b["rejected_tokens"])
        for key in ("chosen_logps", "rejected_logps"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
    run_cmd(stage("dpo"), free)
    assert_curves_close(padded / "plots/dpo.csv", free / "plots/dpo.csv", ("loss", "eval/loss", "logps/chosen"),
                        1e-4, 1e-4)
    assert_weights_close(padded / "models/dpo", free / "models/dpo", 1e-3, 1e-5)


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_dpo_two_processes_follow_one_process(tiny_data, dpo_whole, tmp_path, loss):
    """DPO under torchrun x2 (DDP, shared-prompt rows) follows the 1-process run at the same global batch.
    For KTO that includes its reference point z0, estimated over the whole step on every process."""
    assert section(dpo_whole, "dpo")["batch_size"] == 4
    shared = section(dpo_whole, "dpo")["loss"] == loss  # dpo_whole is this 1-process run
    one = dpo_whole if shared else workdir(tiny_data, tmp_path / "one", dpo__loss=loss)
    two = workdir(tiny_data, tmp_path / "two", dpo__batch_size=2, dpo__loss=loss)
    for root in (two,) if shared else (one, two):  # the reference never depends on the loss: dpo_whole's
        for rel in ("models/sft", "artifacts/ref_logps"):
            shutil.copytree(dpo_whole / rel, root / rel)
    if not shared:
        run_cmd(stage("dpo"), one)
    run_cmd([*torchrun(), "-m", "components.dpo", "--params", "params.yaml"], two)
    for name in ("loss", "rewards/margins", "eval/loss"):
        a, b = column(one / "plots/dpo.csv", name), column(two / "plots/dpo.csv", name)
        assert len(a) == len(b) > 0, name
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)


def two_machines(module: str, root: Path, env: dict | None = None, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """A stage on 2 "machines" x 1 process: two torchrun launchers with node ranks 0 and 1 meeting at 127.0.0.1
    (static rendezvous, gloo), in one checkout (the shared filesystem configs/accelerate/multi_node.yaml asks for).
    On GPUs `accelerate launch` with multi_node.yaml starts exactly this (torch's elastic launch with nnodes,
    node_rank, master address and port); on CPUs accelerate's multi-machine path is MPI's, so the test drives
    torchrun itself."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", module, "--params", "params.yaml"],
        cwd=root, env={**pipeline_env(root), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(procs, outs, strict=True)]


def test_two_machines_follow_one_process_and_resume_across_both_ranks(tiny_data, dpo_whole, tmp_path):
    """reference + dpo on 2 machines x 1 process (multi_node.yaml, gloo on 127.0.0.1) at per-device batch 2 follow
    the 1-process run at batch 4; dpo killed at step 5 on both machines resumes, on both, from the step-3 checkpoint."""
    root = workdir(tiny_data, tmp_path / "nodes", dpo__batch_size=2)
    shutil.copytree(dpo_whole / "models/sft", root / "models/sft")
    for run in two_machines("components.reference", root):
        assert run.returncode == 0, run.stdout[-3000:]
    for split in ("train", "eval"):
        a = torch.load(dpo_whole / f"artifacts/ref_logps/{split}.pt", weights_only=True)
        b = torch.load(root / f"artifacts/ref_logps/{split}.pt", weights_only=True)
        assert a["ids"] == b["ids"]
        torch.testing.assert_close(b["chosen_logps"], a["chosen_logps"], rtol=1e-5, atol=1e-5)
    crashed = two_machines("components.dpo", root, {"ALIGNFLOW_CRASH_AT_STEP": "5"})
    assert all(run.returncode != 0 for run in crashed), [run.stdout[-1500:] for run in crashed]
    assert not (root / "models/dpo").exists() and any((root / "checkpoints").rglob("*")), "no checkpoint kept"
    resumed = two_machines("components.dpo", root, {"ALIGNFLOW_LOG_LEVEL": "INFO"})
    for run in resumed:  # every rank loads the checkpoint (the shared filesystem), not only the one that wrote it
        assert run.returncode == 0, run.stdout[-3000:]
        assert re.search(r"resuming from \S+ \(step 3 of 8\)", run.stdout), run.stdout[-3000:]
    assert_curves_close(dpo_whole / "plots/dpo.csv", root / "plots/dpo.csv", ("loss", "rewards/margins", "eval/loss"),
                        1e-4, 1e-5)
    assert_weights_close(dpo_whole / "models/dpo", root / "models/dpo", 1e-3, 1e-5)


def test_crash_change_params_crash_then_resume_never_mixes_runs(tiny_data, sft_crashed, tmp_path):
    """Run A crashes; the user changes a param (run B) and B crashes too. B's checkpoints live in B's own
    directory, A's are purged only once B has a complete one, and B resumes to the weights of an
    uninterrupted B: a checkpoint is never resumed under another run's identity."""
    whole_b = workdir(tiny_data, tmp_path / "whole_b", sft__learning_rate=1.0e-3)
    run_cmd(stage("sft"), whole_b)
    root = shutil.copytree(sft_crashed, tmp_path / "root")  # A: checkpoints at 3, 6 and 9
    [run_a] = (root / "checkpoints/sft").iterdir()
    set_params(root, sft__learning_rate=1.0e-3)  # B
    crash_at(root, 7)  # B: checkpoints at 3 and 6
    [run_b] = (root / "checkpoints/sft").iterdir()
    assert run_b.name != run_a.name  # A's were purged after B's first complete checkpoint
    assert sorted(p.name for p in run_b.iterdir()) == ["step_0000003", "step_0000006"]
    resumed = run_cmd(stage("sft"), root, env=pipeline_env(root) | {"ALIGNFLOW_LOG_LEVEL": "INFO"})
    assert f"resuming from checkpoints/sft/{run_b.name}/step_0000006" in resumed.stderr
    assert_same_weights(whole_b / "models/sft", root / "models/sft")


def test_corrupt_checkpoints_are_skipped_for_the_next_older_one(sft_whole, sft_crashed, tmp_path):
    """Step 9's state file and step 6's weights are truncated (as by a full disk): both are skipped, in one resume."""
    root = shutil.copytree(sft_crashed, tmp_path / "corrupt")  # checkpoints at 3, 6 and 9
    broken = []
    for path in (*root.glob("checkpoints/sft/*/step_0000009/alignflow_state.json"),
                 *root.glob("checkpoints/sft/*/step_0000006/model.safetensors")):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        broken.append(path.parent.relative_to(root))
    assert len(broken) == 2
    resumed = run_cmd(stage("sft"), root, env=pipeline_env(root) | {"ALIGNFLOW_LOG_LEVEL": "INFO"})
    for ckpt in broken:
        assert f"skipping checkpoint {ckpt}" in resumed.stderr
    assert "/step_0000003 (step 3 of 10)" in resumed.stderr
    assert_same_weights(sft_whole / "models/sft", root / "models/sft")


def test_divergence_without_nan_stops_before_the_update(tiny_data, tmp_path, monkeypatch):
    from components import sft
    from components.core.train import loop

    root = workdir(tiny_data, tmp_path / "diverge")
    monkeypatch.chdir(root)
    with pytest.raises(loop.DivergenceError, match=r"training diverged at step \d+: (loss|gradient norm)"):
        sft.run(SFTConfig(max_steps=10, batch_size=8, eval_every=100, save_every=100, learning_rate=1000.0),
                model_path="models/base", train_path="data/prepared/sft_train.jsonl", eval_path="data/prepared/sft_eval.jsonl", track=False)
    assert not (root / "models/sft").exists()


def test_killing_dvc_does_not_leave_an_orphaned_trainer(tiny_data, tmp_path):
    """The trainer exits when the `dvc repro` that started it is killed (SIGKILL reaches no children)."""
    import os
    import signal
    import time

    root = workdir(tiny_data, tmp_path / "orphan", sft__max_steps=5000, sft__save_every=3)
    # a stand-in for `dvc repro`: its command line is what the trainer recognises as its launcher
    launcher = ("import subprocess, sys; subprocess.run([sys.executable, '-m', 'components.sft', "
                "'--params', 'params.yaml'])")
    parent = subprocess.Popen([sys.executable, "-c", launcher, "dvc", "repro", "sft"], cwd=root, env=pipeline_env(root))
    try:
        deadline = time.time() + 120
        while not list((root / "checkpoints/sft").glob("*/step_*")):  # training, watchdog running
            assert time.time() < deadline and parent.poll() is None, "training never started"
            time.sleep(0.2)
        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                    and (p / "stat").exists() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent.pid]
        assert children
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 30
        while any(Path(f"/proc/{c}").exists() and "Z" not in (Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1][:3])
                  for c in children):
            assert time.time() < deadline, "the trainer outlived its dvc process"
            time.sleep(0.2)
        assert not (root / "models/sft").exists()
    finally:
        if parent.poll() is None:
            parent.kill()


def test_dpo_refuses_a_reference_computed_on_other_tokens(tiny_data, tmp_path):
    """data.max_length lowered after the reference stage ran: the cached log-probs belong to longer responses
    (or another prompt cut), so dpo stops with a message naming the stage to re-run instead of training on them."""
    root = workdir(tiny_data, tmp_path / "stale", reference__pairs="all")  # the plan would change with the lengths
    shutil.copytree(root / "models/base", root / "models/sft")
    run_cmd(stage("reference"), root)
    set_params(root, data__max_length=24, data__max_prompt_length=20)
    proc = subprocess.run(stage("dpo"), cwd=root, env=pipeline_env(root), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "computed on other tokens" in proc.stderr and "dvc repro reference" in proc.stderr
    assert not (root / "models/dpo").exists()


def test_reference_scores_only_the_pairs_the_dpo_plan_visits(dpo_whole, tmp_path):
    """reference.pairs: planned (default): a dpo run shorter than an epoch (8 steps x 8 pairs of 133) pays the
    reference pass for its own pairs and the eval pairs only (and dpo_whole trained on it); a longer run it was not
    planned for is refused."""
    root = shutil.copytree(dpo_whole, tmp_path / "planned")
    assert (root / "models/dpo/model.safetensors").exists()
    scored = torch.load(root / "artifacts/ref_logps/train.pt")["ids"]
    meta = json.loads((root / "artifacts/ref_logps/meta.json").read_text())
    assert meta["scored"] == "planned" and len(scored) == meta["train/pairs"] < meta["train/pairs_in_data"]
    assert len(scored) <= 8 * 4 * 2
    set_params(root, dpo__max_steps=30)
    proc = subprocess.run(stage("dpo"), cwd=root, env=pipeline_env(root), capture_output=True, text=True)
    assert proc.returncode == 2 and "pairs this run visits" in proc.stderr and "dvc repro reference" in proc.stderr


def test_fsdp_two_processes_follow_one_process_with_uneven_batches(tiny_data, dpo_whole, tmp_path):
    """reference + dpo under FSDP2 (torchrun x2, gloo): 3 reference batches and 13 eval batches go to 2 processes
    (padding batches keep the per-forward collectives in step), the run crashes at step 5 and resumes from its
    sharded checkpoint, and the result follows the 1-process run (dpo_whole) at the same global batch."""
    one = dpo_whole
    assert section(one, "dpo")["batch_size"] == 4
    two = workdir(tiny_data, tmp_path / "two", dpo__batch_size=2, reference__batch_size=24)
    shutil.copytree(tiny_data / "models/base", two / "models/sft")
    env = pipeline_env(two) | {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    launch = torchrun()
    n_train, n_eval = (len(torch.load(one / f"artifacts/ref_logps/{s}.pt")["ids"]) for s in ("train", "eval"))
    assert -(-n_train // 24) % 2 == 1 and -(-n_eval // 2) % 2 == 1  # odd batch counts: one process gets padding
    run_cmd(launch + ["-m", "components.reference", "--params", "params.yaml"], two, env=env)
    for split in ("train", "eval"):
        a, b = (torch.load(r / f"artifacts/ref_logps/{split}.pt") for r in (one, two))
        assert a["ids"] == b["ids"] and a["token_hashes"] == b["token_hashes"]
        torch.testing.assert_close(b["chosen_logps"], a["chosen_logps"], rtol=1e-5, atol=1e-5)
    crashed = subprocess.run(launch + ["-m", "components.dpo", "--params", "params.yaml"], cwd=two,
                             env=env | {"ALIGNFLOW_CRASH_AT_STEP": "5"}, capture_output=True, text=True)
    assert crashed.returncode != 0
    [ckpt] = (two / "checkpoints/dpo").glob("*/step_0000003")
    assert (ckpt / "fsdp").is_dir()  # model and optimizer shards, one file per process
    resumed = run_cmd(launch + ["-m", "components.dpo", "--params", "params.yaml"], two,
                      env=env | {"ALIGNFLOW_LOG_LEVEL": "INFO"})
    assert "resuming from" in resumed.stderr and "step 3 of 8" in resumed.stderr
    for name in ("loss", "rewards/margins", "eval/loss", "grad_norm"):
        a, b = column(one / "plots/dpo.csv", name), column(two / "plots/dpo.csv", name)
        assert len(a) == len(b) > 0, name
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    config = yaml.safe_load((two / "models/dpo/config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    wa, wb = weights(one / "models/dpo"), weights(two / "models/dpo")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-3, atol=1e-5)


def test_a_model_with_another_chat_template_is_refused_naming_prepare(tiny_data, tmp_path):
    """The token ids prepare wrote belong to the base tokenizer and template: an SFT model whose template
    differs (edited by hand, or another model dropped in) stops the reference stage before any forward."""
    root = workdir(tiny_data, tmp_path / "template")
    shutil.copytree(root / "models/base", root / "models/sft")
    config = root / "models/sft/tokenizer_config.json"
    template_file = root / "models/sft/chat_template.jinja"
    if template_file.exists():
        template_file.write_text(template_file.read_text().replace("<|im_end|>", "<|im_end|> "))
    else:
        cfg = json.loads(config.read_text())
        cfg["chat_template"] = cfg["chat_template"].replace("<|im_end|>", "<|im_end|> ")
        config.write_text(json.dumps(cfg))
    proc = subprocess.run(stage("reference"), cwd=root, env=pipeline_env(root), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "another tokenizer or chat template" in proc.stderr and "dvc repro prepare" in proc.stderr
    assert not (root / "artifacts/ref_logps").exists()
