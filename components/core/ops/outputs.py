"""A stage's outputs around its run: leftovers swept at the start, the last good outputs back after a failure.

`dvc repro` deletes a stage's outputs before it runs the command. When the run then fails (an input error, a NaN,
a divergence, a bug, a failed write) the workspace would be left without `models/<stage>`, its metrics and plots
until the user thought of `dvc checkout` (and `git checkout` for the uncached metrics and plots). Instead the
failing stage puts back what dvc.lock records as the stage's last outputs:
- cached outs (models, artifacts, data/prepared) from DVC's own cache, by the md5 in dvc.lock (a directory through
  its `.dir` manifest), each written atomically (ops/io.py);
- uncached ones (`cache: false` metrics and plots) from a copy the stage put into the DVC cache, under the same
  md5 addressing, when it last succeeded; else from git HEAD when that copy is the one dvc.lock names.
Only outputs that were absent when the stage started are touched: under `dvc repro` that is all of them (DVC
removed them), while a stage run by hand next to good outputs leaves those alone. Persisting the outs
(`persist: true`) would have kept them too, but DVC keeps no run-cache of a stage with persisted outs, and the
flow's workers restore stages from the run-cache (flows/pipeline.py).

Leftovers: a writer killed mid-write leaves `.<name>.tmp-*` / `.<name>.old-*` beside an output (ops/io.py). The
next write of that output removes them; `sweep` removes those of every output of the stage when it starts.

Torch-free and DVC-import-free (DVC's cache layout is read directly: `<cache>/files/md5/ab/cdef...`).
"""

from __future__ import annotations

import configparser
import hashlib
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.core.ops.io import atomic_dir, sweep_leftovers, write_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Out:
    path: str
    cached: bool
    persist: bool


def stage_outs(stage: str, root: str | Path = ".") -> list[Out]:
    """The outs, metrics and plots dvc.yaml declares for `stage` (none when there is no dvc.yaml or no such stage;
    templated paths are left out)."""
    try:
        spec = yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    entry = (spec.get("stages") or {}).get(stage)
    if not isinstance(entry, dict):
        return []
    found = []
    for kind in ("outs", "metrics", "plots"):
        for item in entry.get(kind) or []:
            path, opts = (next(iter(item.items())) if isinstance(item, dict) else (item, {}))
            opts = opts or {}
            if "${" not in str(path):
                found.append(Out(str(path), bool(opts.get("cache", kind == "outs")), bool(opts.get("persist"))))
    return found


def sweep(outs: list[Out], root: str | Path = ".") -> None:
    """Remove the temp / backup siblings a killed writer left beside any of a stage's outputs (`stage_outs`)."""
    for out in outs:
        sweep_leftovers(Path(root) / out.path)


def absent(outs: list[Out], root: str | Path = ".") -> list[str]:
    """A stage's (non-persisted) outputs missing from the workspace: those `restore` may put back."""
    return [o.path for o in outs if not o.persist and not (Path(root) / o.path).exists()]


def cache_dir(root: str | Path = ".") -> Path:
    """DVC's local cache: `cache.dir` of .dvc/config(.local) (relative to .dvc/), else .dvc/cache."""
    dvc = Path(root) / ".dvc"
    parser = configparser.ConfigParser()
    parser.read([dvc / "config", dvc / "config.local"])
    configured = parser.get("cache", "dir", fallback=None)
    return (dvc / configured).resolve() if configured else dvc / "cache"


def _object(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def stash_uncached(outs: list[Out], root: str | Path = ".") -> None:
    """After a successful run: the stage's `cache: false` files, into the DVC cache by md5, so that a later failed
    run can put back exactly the bytes dvc.lock will name."""
    cache = cache_dir(root)
    if not cache.parent.is_dir():
        return
    for out in outs:
        path = Path(root) / out.path
        if out.cached or not path.is_file():
            continue
        data = path.read_bytes()
        target = _object(cache, hashlib.md5(data).hexdigest())
        if not target.exists():
            write_bytes(target, data)


def _locked(stage: str, root: Path) -> dict[str, str]:
    """{path: md5} of the stage's outs in dvc.lock (its last successful run)."""
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    entry = (lock.get("stages") or {}).get(stage) or {}
    return {o["path"]: o["md5"] for o in entry.get("outs") or [] if isinstance(o, dict) and o.get("md5")}


def _git_head_bytes(root: Path, path: str) -> bytes | None:
    proc = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=root, capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def _restore_one(root: Path, cache: Path, path: str, md5: str) -> str | None:
    """Put `path` back as dvc.lock records it; None when done, else why not."""
    dest = root / path
    if md5.endswith(".dir"):
        manifest = _object(cache, md5)
        if not manifest.is_file():
            return "not in the DVC cache"
        entries = json.loads(manifest.read_text())
        missing = [e["relpath"] for e in entries if not _object(cache, e["md5"]).is_file()]
        if missing:
            return f"{len(missing)} of its files are not in the DVC cache"
        if dest.is_file() or dest.is_symlink():
            dest.unlink()
        with atomic_dir(dest) as tmp:
            for e in entries:
                (tmp / e["relpath"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(_object(cache, e["md5"]), tmp / e["relpath"])
        return None
    obj = _object(cache, md5)
    data = obj.read_bytes() if obj.is_file() else _git_head_bytes(root, path)
    if data is None or hashlib.md5(data).hexdigest() != md5:
        return "neither in the DVC cache nor in git HEAD"
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    write_bytes(dest, data)
    return None


def restore(stage: str, paths: list[str], root: str | Path = ".") -> tuple[list[str], dict[str, str]]:
    """Put back `paths` (outputs absent when the stage started) as dvc.lock records them.
    Returns (restored paths, {path: why not} for those it could not)."""
    root = Path(root)
    locked, cache = _locked(stage, root), cache_dir(root)
    restored, failed = [], {}
    for path in paths:
        if path not in locked:
            continue  # never produced by a successful run: nothing to go back to
        try:
            why = _restore_one(root, cache, path, locked[path])
        except OSError as e:
            why = f"{type(e).__name__}: {e}"
        if why is None:
            restored.append(path)
        else:
            failed[path] = why
    return restored, failed
