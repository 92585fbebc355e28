"""What a stage leaves when its params disable it (`enabled: false`): DVC needs every output it declares.

Each output directory holds disabled.json (evaluate, ppo, rloo and register treat a directory without config.json as
no model), the metrics file says why, the plot is empty. Torch-free: core/ops/launch.py writes a disabled stage's
placeholders without importing the stage (and torch); the stage's own main() calls the same functions.
"""

from __future__ import annotations

import logging
from pathlib import Path

from components.core.ops.io import atomic_dir, write_csv, write_json

log = logging.getLogger("alignflow.placeholders")

# the stages' --out defaults (their CLIs read them from here)
GRPO_OUT = "models/grpo"
REWARD_MODEL_OUT = "models/reward_model"


def write(stage: str, reason: str, dirs: list[str], metrics_path: str, plots_path: str,
          json_files: dict[str, dict] | None = None) -> None:
    note = {"enabled": False, "reason": reason}
    for d in dirs:
        with atomic_dir(d) as tmp:
            write_json(Path(tmp) / "disabled.json", note)
    write_json(metrics_path, note)
    write_csv(plots_path, [])
    for path, content in (json_files or {}).items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**content, **note})
    log.info("%s: disabled (%s); wrote placeholders", stage, reason)


def grpo(out_dir: str = GRPO_OUT, rollouts_dir: str = "artifacts/rollouts", metrics_path: str = "metrics/grpo.json",
         plots_path: str = "plots/grpo.csv") -> None:
    write("grpo", "grpo.enabled is false in params", [out_dir, rollouts_dir], metrics_path, plots_path)


def ppo(out_dir: str = "models/ppo", rollouts_dir: str = "artifacts/rollouts_ppo",
        metrics_path: str = "metrics/ppo.json", plots_path: str = "plots/ppo.csv") -> None:
    write("ppo", "ppo.enabled is false in params", [out_dir, rollouts_dir], metrics_path, plots_path)


def rloo(out_dir: str = "models/rloo", rollouts_dir: str = "artifacts/rollouts_rloo",
         metrics_path: str = "metrics/rloo.json", plots_path: str = "plots/rloo.csv") -> None:
    """rloo reads the ppo section (with its rloo: overrides): one switch for both."""
    write("rloo", "ppo.enabled is false in params", [out_dir, rollouts_dir], metrics_path, plots_path)


def reward_model(out_dir: str = REWARD_MODEL_OUT, metrics_path: str = "metrics/reward_model.json",
                 calibration_path: str = "plots/reward_model_calibration.json",
                 plots_path: str = "plots/reward_model.csv") -> None:
    """ppo then needs `reward: functions`."""
    write("reward_model", "reward_model.enabled is false in params", [out_dir], metrics_path, plots_path,
          {calibration_path: {"bins": []}})


def write_for(module: str, out: str | None = None) -> bool:
    """Write the placeholders of the disabled stage `module`, given its CLI's output argument (--out); False for
    a stage that has none."""
    writers = {"components.grpo": lambda: grpo(out or GRPO_OUT),
               "components.reward_model": lambda: reward_model(out or REWARD_MODEL_OUT),
               "components.ppo": ppo, "components.rloo": rloo}
    if module not in writers:
        return False
    writers[module]()
    return True
