"""Checkpoints of the training stages, one directory per run identity:

    checkpoints/<stage>/<fingerprint>/step_0000050/   (accelerate save_state + alignflow_state.json)

A run only ever writes into its own fingerprint's directory, so a run with other params can never leave a
checkpoint that a later run resumes under the wrong identity. Each checkpoint is written into a
`.step_N.partial` directory and renamed into place when complete (the state file, written last, lists
every file with its size); a checkpoint is a resume point only if it is complete. The newest complete one
that loads is resumed; a corrupt one (unreadable state file, a truncated weights or optimizer file, a load
error) is skipped with a warning that names it, and the next older one is used. Other fingerprints'
checkpoints are purged only once the new run's first checkpoint is complete.

The fingerprint hashes the params that change the math (not eval/save/log cadence), the world size, the
bytes of the input files and the source of the code that trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from components.core.ops import code_identity, determinism
from components.core.ops.io import replace_dir, write_json

log = logging.getLogger(__name__)

STATE_FILE = "alignflow_state.json"
# Loop settings that do not change the trained weights: editing them must not restart a run from step 0.
CADENCE_KEYS = ("eval_every", "save_every", "keep_checkpoints", "log_every", "track", "divergence_factor",
                "zero_std_warning", "gradient_checkpointing")


def math_params(hyper: dict) -> dict:
    """The run's settings minus cadence and output paths: what the fingerprint is made of."""
    return {k: v for k, v in hyper.items() if k not in CADENCE_KEYS and not k.endswith(("_path", "_dir"))}


def code_fingerprint(stage_module: str) -> str:
    """Hash of the code that trains: every file in the stage module's import closure (ops/code_identity.py; the
    same closure is the stage's code deps in dvc.yaml). A code change anywhere in it is a different run."""
    return code_identity.code_fingerprint(stage_module)


def model_identity(path: str) -> str:
    """A cheap identity of a model directory (names, sizes, first and last MiB of each file), or the hub id.

    Hashing whole multi-GB weights on every start would cost minutes; any real change of the weights
    (another init, another training run) changes their first and last bytes.
    """
    root = Path(path)
    if not root.is_dir():
        return path
    h = hashlib.sha256()
    for f in sorted(p for p in root.iterdir() if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]


def fingerprint(*parts: object) -> str:
    """Identity of a run for resuming: settings, world size, code hash and the bytes of its input files."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, str | Path) and Path(p).is_file():
            h.update(Path(p).read_bytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _step_dirs(run_dir: Path) -> list[Path]:
    return sorted((p for p in run_dir.glob("step_*") if p.is_dir()), reverse=True) if run_dir.is_dir() else []


def _complete_state(path: Path, fingerprint_: str) -> dict | None:
    """The state of a complete, intact checkpoint; None (with a warning naming it) otherwise."""
    state_file = path / STATE_FILE
    if not state_file.exists():
        log.warning("skipping checkpoint %s: no %s (cut short while writing)", path, STATE_FILE)
        return None
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("skipping checkpoint %s: %s is unreadable (%s)", path, STATE_FILE, e)
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint_ or "step" not in state:
        log.warning("skipping checkpoint %s: its state file names another run", path)
        return None
    for name, size in state.get("files", {}).items():
        f = path / name
        actual = f.stat().st_size if f.exists() else None
        if actual != size:
            log.warning("skipping checkpoint %s: %s is %s bytes, expected %d (truncated or missing)", path, name,
                        actual, size)
            return None
    return state


def find_checkpoints(ckpt_dir: Path, fingerprint_: str) -> list[tuple[Path, dict]]:
    """Complete checkpoints of this run, newest first."""
    found = []
    for path in _step_dirs(Path(ckpt_dir) / fingerprint_):
        state = _complete_state(path, fingerprint_)
        if state is not None:
            found.append((path, state))
    return found


SHARDS_DIR = "fsdp"  # FSDP2 runs: model + optimizer shards, written by every process (torch.distributed.checkpoint)


def _save_shards(path: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / SHARDS_DIR))


def _load_shards(path: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path / SHARDS_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def resume(accelerator, ckpt_dir: Path, fingerprint_: str, total_steps: int, model=None,
           optimizer=None) -> tuple[int, list[dict], dict]:
    """(start step, metric history, the rest of the saved state) from the newest checkpoint of this run that
    loads; (0, [], {}) if none. Pass model and optimizer: FSDP-sharded ones are restored from their shards."""
    from components.core.model.sharding import is_sharded

    sharded = model is not None and is_sharded(model)
    for path, state in find_checkpoints(ckpt_dir, fingerprint_):
        try:
            accelerator.load_state(str(path))
            if sharded:
                _load_shards(path, model, optimizer)
        except Exception as e:  # a file that passed the size check but does not load: try an older one
            log.warning("skipping checkpoint %s: cannot load it (%s: %s)", path, type(e).__name__, e)
            continue
        log.info("resuming from %s (step %d of %d)", path, state["step"], total_steps)
        changed = determinism.differences(state.get("determinism"), determinism.settings())
        if changed:
            log.warning("resuming %s under other settings than it was saved with (%s): the result is correct "
                        "but not bit-identical to an uninterrupted run", path, "; ".join(changed))
        return state["step"], state["history"], state
    others = [p.name for p in Path(ckpt_dir).iterdir() if p.is_dir() and p.name != fingerprint_] \
        if Path(ckpt_dir).is_dir() else []
    if others:
        log.info("not resuming checkpoints of other runs under %s (%s): different params, data or code",
                 ckpt_dir, ", ".join(sorted(others)))
    return 0, [], {}


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, state: dict, keep: int, model=None,
                    optimizer=None) -> None:
    """save_state (model, optimizer, scheduler, RNG) into a partial dir, the state file last, then rename.
    An FSDP-sharded model and its optimizer are saved as shards by every process (`SHARDS_DIR`)."""
    from components.core.model.sharding import is_sharded
    run_dir = Path(ckpt_dir) / state["fingerprint"]
    final = run_dir / f"step_{step:07d}"
    partial = run_dir / f".step_{step:07d}.partial"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if model is not None and is_sharded(model):
        _save_shards(partial, model, optimizer)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {str(f.relative_to(partial)): f.stat().st_size for f in sorted(partial.rglob("*")) if f.is_file()}
        write_json(partial / STATE_FILE, {**state, "step": step, "files": files,
                                          "determinism": determinism.settings()})
        replace_dir(partial, final)
        kept = {p for p, _ in find_checkpoints(ckpt_dir, state["fingerprint"])[:keep]}
        for old in run_dir.iterdir():  # older, corrupt or partial leftovers of this run (not its other files)
            if old not in kept and old.name.startswith(("step_", ".step_")):
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        # this run has a complete resume point now: other runs' checkpoints are stale
        for other in Path(ckpt_dir).iterdir():
            if other.is_dir() and other.name != state["fingerprint"]:
                shutil.rmtree(other, ignore_errors=True)
    accelerator.wait_for_everyone()


def clear_checkpoints(accelerator, ckpt_dir: Path) -> None:
    """After a successful run the final model is the artifact; checkpoints only cost disk."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
