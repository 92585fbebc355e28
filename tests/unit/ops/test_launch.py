"""components/core/ops/launch.py: a disabled stage writes its placeholders in one process; one local process runs
in the launcher's process with accelerate's environment; anything more goes through accelerate's launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from components.core.config import load_params
from components.core.ops import launch

ROOT = Path(__file__).resolve().parents[3]


def _params(tmp_path: Path, **sections) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, values in sections.items():
        params[name].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_one_cpu_process_runs_the_stage_here_with_accelerates_environment(tmp_path, monkeypatch):
    params = _params(tmp_path, grpo={"enabled": True})
    calls = []
    monkeypatch.setattr(launch, "run_module", lambda module, argv: calls.append((module, argv, dict(os.environ))))
    saved, threads = dict(os.environ), torch.get_num_threads()
    try:
        launch.main(["--config_file", str(ROOT / "configs/accelerate/cpu.yaml"), "-m", "components.grpo",
                     "--params", str(params)])
    finally:
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)
    [(module, argv, env)] = calls
    assert (module, argv) == ("components.grpo", ["--params", str(params)])
    assert env["ACCELERATE_USE_CPU"] == "True" and env["ACCELERATE_MIXED_PRECISION"] == "no"
    assert env["OMP_NUM_THREADS"].isdigit()


def test_several_processes_go_through_accelerates_own_launcher(tmp_path, monkeypatch):
    import accelerate.commands.launch as accelerate_launch

    params = _params(tmp_path, grpo={"enabled": True})
    started = []
    monkeypatch.setattr(accelerate_launch, "multi_gpu_launcher", lambda args: started.append(args.num_processes))
    monkeypatch.setattr(launch, "run_module", lambda *a: pytest.fail("ran in this process"))
    launch.main(["--config_file", str(ROOT / "configs/accelerate/multi_gpu.yaml"), "--num_processes", "2",
                 "-m", "components.grpo", "--params", str(params)])
    assert started == [2]


@pytest.mark.parametrize("config, extra", [("cpu.yaml", ["--num_processes", "2"]), ("single_gpu.yaml", [])])
def test_more_than_one_local_process_or_a_chosen_gpu_gets_accelerates_child_process(tmp_path, monkeypatch, config,
                                                                                     extra):
    """Two CPU processes, or a config naming gpu_ids (CUDA_VISIBLE_DEVICES must precede CUDA's start): the
    simple launcher's own child process, never this one."""
    import accelerate.commands.launch as accelerate_launch

    params = _params(tmp_path, grpo={"enabled": True})
    started = []

    def child_process(args):
        started.append(args.training_script)

    monkeypatch.setattr(accelerate_launch, "simple_launcher", child_process)
    monkeypatch.setattr(launch, "run_module", lambda *a: pytest.fail("ran in this process"))
    launch.main(["--config_file", str(ROOT / "configs/accelerate" / config), *extra, "-m", "components.grpo",
                 "--params", str(params)])
    assert started == ["components.grpo"]
    assert accelerate_launch.simple_launcher is child_process  # launch() restored what it patched


def test_invalid_params_are_an_input_error_before_accelerate_starts(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("grpo: {enabled: false, no_such_key: 1}\n")
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here: nothing of the project's to put back
    monkeypatch.setattr(launch, "launch", lambda argv: pytest.fail("accelerate started"))
    with pytest.raises(SystemExit) as exit_:
        launch.main(["--config_file", str(ROOT / "configs/accelerate/cpu.yaml"), "-m", "components.grpo",
                     "--params", str(bad)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "grpo.no_such_key: unknown key" in err and "[alignflow] input error" in err


def test_a_missing_accelerate_config_names_the_key(tmp_path, monkeypatch, capsys):
    """DVC depends on the configs/accelerate folder, so the launcher is what meets a wrong name: one line naming
    compute.accelerate_config and the configs that exist, exit 2 with the input-error mark (the flow does not
    retry it), before accelerate reads the file."""
    params = _params(tmp_path, compute={"accelerate_config": "nosuch"})
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here: nothing of the project's to put back
    monkeypatch.setattr(launch, "launch", lambda argv: pytest.fail("accelerate started"))
    with pytest.raises(SystemExit) as exit_:
        launch.main(["--config_file", str(ROOT / "configs/accelerate/nosuch.yaml"), "-m", "components.sft",
                     "--params", str(params)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert err[0].startswith("sft: error: ") and "compute.accelerate_config: " in err[0]
    assert "nosuch.yaml does not exist (configs there: cpu, fsdp, multi_gpu, multi_node, single_gpu" in err[0]
    assert err[1].startswith("[alignflow] input error (ParamsError)")


def test_the_stage_section_decides_disabled(tmp_path):
    assert not launch.disabled("components.grpo", load_params(_params(tmp_path, grpo={"enabled": True})))
    assert launch.disabled("components.grpo", load_params(_params(tmp_path, grpo={"enabled": False})))
    assert not launch.disabled("components.sft", load_params(_params(tmp_path)))  # no enabled flag


def test_a_disabled_stage_writes_its_placeholders_without_accelerate(tmp_path):
    params = _params(tmp_path, reward_model={"enabled": False})
    # the config file does not exist: accelerate is never started
    argv = ["--config_file", "no/such.yaml", "-m", "components.reward_model", "--params", str(params),
            "--out", str(tmp_path / "rm")]
    cmd = [sys.executable, "-c", "import sys; from components.core.ops import launch; "
           f"launch.main({argv!r}); print('torch imported:', 'torch' in sys.modules)"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "rm" / "disabled.json").read_text())["enabled"] is False
    assert json.loads((tmp_path / "metrics" / "reward_model.json").read_text())["enabled"] is False
    calibration = json.loads((tmp_path / "plots" / "reward_model_calibration.json").read_text())
    assert calibration["bins"] == [] and calibration["enabled"] is False
    assert (tmp_path / "plots" / "reward_model.csv").exists()
    assert "reward_model.enabled is false" in proc.stderr
    assert proc.stdout.strip() == "torch imported: False"  # the stage and torch were never imported


@pytest.mark.parametrize("stage", ["ppo", "rloo"])
def test_ppo_and_rloo_share_the_ppo_switch_and_write_their_placeholders_without_torch(tmp_path, stage):
    """rloo has no params section of its own: `ppo.enabled: false` switches off both stages, byte-identically."""
    params = _params(tmp_path, ppo={"enabled": False})
    assert launch.disabled(f"components.{stage}", load_params(params))
    argv = ["--config_file", "no/such.yaml", "-m", f"components.{stage}", "--params", str(params)]
    cmd = [sys.executable, "-c", "import sys; from components.core.ops import launch; "
           f"launch.main({argv!r}); print('torch imported:', 'torch' in sys.modules)"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    note = {"enabled": False, "reason": "ppo.enabled is false in params"}
    for path in (f"models/{stage}/disabled.json", f"artifacts/rollouts_{stage}/disabled.json", f"metrics/{stage}.json"):
        assert json.loads((tmp_path / path).read_text()) == note, path
    assert (tmp_path / f"plots/{stage}.csv").exists()
    assert proc.stdout.strip() == "torch imported: False"
    assert not launch.disabled(f"components.{stage}", load_params(_params(tmp_path, ppo={"enabled": True})))


@pytest.mark.parametrize("argv, expected", [
    (["--config_file", "c.yaml", "-m", "components.rloo", "--max-steps", "2"], ("components.rloo", ["--max-steps", "2"])),
    (["--config_file", "c.yaml", "train.py"], (None, [])),
])
def test_stage_module_splits_the_launcher_and_stage_arguments(argv, expected):
    assert launch.stage_module(argv) == expected
