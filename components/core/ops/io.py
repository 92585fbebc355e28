"""The one way this project writes an artifact: complete or absent, never half-written.

`atomic_dir(dest)` yields a fresh temp directory next to `dest`; when the block ends without an error
its files are fsynced and it is renamed onto `dest`. The old `dest` is moved aside first and deleted only
after the rename succeeded, so a crash at any point leaves either the old or the new copy in place (and
at worst a hidden `.<name>.tmp-*` / `.<name>.old-*` sibling, swept by the next write). `write_json`,
`write_csv` and `write_text` do the same for single files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_TMP, _OLD = ".tmp-", ".old-"
# models/base/<SOURCE_FILE> points at the user's model when bootstrap built none (model.name_or_path)
SOURCE_FILE = "alignflow_source.json"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask_mode(base: int) -> int:
    # mkdtemp/mkstemp create 0700/0600; artifacts are ordinary files, so give them the umask's mode
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def sweep_leftovers(dest: str | Path) -> None:
    """Remove temp/backup siblings that a killed writer of `dest` left behind."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return
    for prefix in (f".{dest.name}{_TMP}", f".{dest.name}{_OLD}"):
        for stale in dest.parent.glob(prefix + "*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename tmp onto dest; the previous dest survives until the new one is in place."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}{_OLD}", dir=dest.parent))
        old.rmdir()  # only the unique name is wanted
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    _fsync_dir(dest.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def replace_dir(tmp: str | Path, dest: str | Path) -> None:
    """Put a fully written directory `tmp` in place of `dest` (fsynced first; old copy removed after)."""
    tmp, dest = Path(tmp), Path(dest)
    _fsync_tree(tmp)
    _swap_into_place(tmp, dest)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Write a directory artifact: fill the yielded temp dir; it replaces `dest` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{_TMP}", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777))
        _fsync_tree(tmp)
        _swap_into_place(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write one file atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Rows as CSV; the header is the union of the rows' keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def write_jsonl(path: str | Path, records: list[dict], ensure_ascii: bool = True) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def resolve_model_path(base_dir: str = "models/base") -> str:
    """What to pass to `from_pretrained` for the base model: the embedded dir or the user's model."""
    pointer = Path(base_dir) / SOURCE_FILE
    if pointer.exists():
        return json.loads(pointer.read_text())["name_or_path"]
    if not (Path(base_dir) / "config.json").exists():
        raise FileNotFoundError(f"{base_dir}: no model here; run the bootstrap stage first (dvc repro bootstrap)")
    return base_dir
