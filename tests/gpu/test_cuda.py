"""On a CUDA device (skipped without one; `benchmarks/gpu_check.sh` runs them when a GPU is lent): the stages
train in bf16 on the GPU and follow the CPU's fp32 run, the log-probs the losses rest on agree between devices,
and the FSDP2 path shards over every visible GPU and follows one process."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import pipeline_env, run_cmd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
from test_training import assert_curves_close, column, stage, workdir  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def cpu_env(root):
    return pipeline_env(root) | {"CUDA_VISIBLE_DEVICES": ""}


def test_sft_in_bf16_on_the_gpu_follows_fp32_on_the_cpu(tiny_data, tmp_path):
    cpu = workdir(tiny_data, tmp_path / "cpu", compute__mixed_precision="no")
    gpu = workdir(tiny_data, tmp_path / "gpu", compute__mixed_precision="bf16")
    run_cmd(stage("sft"), cpu, env=cpu_env(cpu))
    run_cmd(stage("sft"), gpu)
    assert_curves_close(cpu / "plots/sft.csv", gpu / "plots/sft.csv", ("loss",), rtol=5e-2, atol=5e-2)


def test_reference_and_dpo_in_bf16_on_the_gpu_follow_the_cpu(tiny_data, tmp_path):
    runs = {}
    for device, precision in (("cpu", "no"), ("gpu", "bf16")):
        root = workdir(tiny_data, tmp_path / device, compute__mixed_precision=precision)
        (root / "models/sft").symlink_to(root / "models/base", target_is_directory=True)
        env = cpu_env(root) if device == "cpu" else pipeline_env(root)
        run_cmd(stage("reference"), root, env=env)
        run_cmd(stage("dpo"), root, env=env)
        runs[device] = root
    assert_curves_close(runs["cpu"] / "plots/dpo.csv", runs["gpu"] / "plots/dpo.csv", ("loss",), rtol=5e-2, atol=5e-2)


def test_log_probs_agree_between_cpu_and_gpu(tiny_data):
    from transformers import AutoModelForCausalLM

    from components.core.data.tokens import IGNORE_INDEX
    from components.core.model.logprobs import sequence_logps

    model = AutoModelForCausalLM.from_pretrained(str(tiny_data / "models/base"), dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :16] = IGNORE_INDEX

    def logps(device, autocast=False):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return sequence_logps(model.to(device)(input_ids=ids.to(device)).logits, labels.to(device))[0].cpu()

    cpu = logps("cpu")
    torch.testing.assert_close(logps("cuda"), cpu, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(logps("cuda", autocast=True), cpu, rtol=3e-2, atol=0.5)


def test_fsdp_shards_over_every_visible_gpu_and_follows_one_process(tiny_data, tmp_path):
    gpus = torch.cuda.device_count()
    one = workdir(tiny_data, tmp_path / "one", compute__mixed_precision="bf16")
    run_cmd(stage("sft"), one)
    sharded = workdir(tiny_data, tmp_path / "fsdp", compute__mixed_precision="bf16")
    cmd = [sys.executable, "-m", "components.core.ops.launch", "--config_file", "configs/accelerate/fsdp.yaml",
           "--num_processes", str(gpus), "-m", "components.sft", "--params", "params.yaml"]
    (sharded / "configs").symlink_to(os.path.join(os.path.dirname(__file__), "..", "..", "configs"),
                                     target_is_directory=True)
    run_cmd(cmd, sharded)
    assert len(column(sharded / "plots/sft.csv", "loss")) == len(column(one / "plots/sft.csv", "loss"))
    assert_curves_close(one / "plots/sft.csv", sharded / "plots/sft.csv", ("loss",), rtol=5e-2, atol=5e-2)
