"""Checkpoints of the training stages: `save_state` plus a state file that names the run it belongs to.

A checkpoint is a resume point only for a run with the same fingerprint (params + data + world size); the
newest matching one is resumed, anything else is ignored. The state file is written last: a checkpoint
without it was cut short and is not a resume point.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "alignflow_state.json"


def find_checkpoint(ckpt_dir: Path, fingerprint: str) -> tuple[Path, dict] | None:
    """Newest complete checkpoint written by a run with the same fingerprint (params + data + code)."""
    if not ckpt_dir.exists():
        return None
    for path in sorted(ckpt_dir.glob("step_*"), reverse=True):
        state_file = path / STATE_FILE
        if not state_file.exists():
            continue  # killed while writing: not a resume point
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") == fingerprint:
            return path, state
        log.info("ignoring %s: written by a run with different params or data", path)
    return None


def fingerprint(*parts: object) -> str:
    """Identity of a run for resuming: hyper-parameters, world size and the bytes of its input files."""
    import hashlib

    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, str | Path) and Path(p).is_file():
            h.update(Path(p).read_bytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def resume(accelerator, ckpt_dir: Path, fingerprint_: str, total_steps: int) -> tuple[int, list[dict]]:
    """(start step, metric history) from the newest matching checkpoint, its state loaded; (0, []) if none."""
    found = find_checkpoint(ckpt_dir, fingerprint_)
    if not found:
        return 0, []
    path, state = found
    accelerator.load_state(str(path))
    log.info("resuming from %s (step %d of %d)", path, state["step"], total_steps)
    return state["step"], state["history"]


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, state: dict, keep: int) -> None:
    """save_state (model, optimizer, scheduler, RNG) then our state file last, marking it complete."""
    path = ckpt_dir / f"step_{step:07d}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / STATE_FILE).write_text(json.dumps({**state, "step": step}))
        for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def clear_checkpoints(accelerator, ckpt_dir: Path) -> None:
    """After a successful run the final model is the artifact; checkpoints only cost disk."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
