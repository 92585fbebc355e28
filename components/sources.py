"""sources stage: one DVC stage per entry of `data.sources`, so a change to a user's data re-runs prepare.

    python -m components.sources --path data/my_prefs.jsonl --out data/fingerprints/src0.json

dvc.yaml declares it as a matrix over `data.sources`: each generated stage (`sources@src0`, ...) has that
source's file or directory as its dependency, so DVC hashes the user's data itself (its md5 is in
dvc.lock, next to the params that name it). The stage writes a small fingerprint of the data prepare reads
(the same files `core/readers.open_source` opens), and prepare depends on the fingerprints: edit or
shrink a source and `dvc repro` re-runs prepare and everything after it; touch nothing and it stays a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from components.core.data.readers import EXTENSIONS
from components.core.ops.io import write_json
from components.core.ops.logs import stage_main


def data_files(path: Path) -> list[Path]:
    """The files of a source prepare reads: the file itself, or a directory's data files (not hidden)."""
    if path.is_dir():
        return sorted(f for f in path.iterdir() if f.is_file() and f.suffix in EXTENSIONS and not f.name.startswith("."))
    return [path]


def fingerprint(path: str | Path) -> dict:
    """sha256 over the relative names and bytes of the source's data files."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{path}: data source not found (data.sources[].path)")
    digest, total = hashlib.sha256(), 0
    for f in data_files(root):
        digest.update(f.name.encode() + b"\0" if root.is_dir() else b"")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                total += len(chunk)
        digest.update(b"\0")
    return {"path": str(path), "files": len(data_files(root)), "bytes": total, "sha256": digest.hexdigest()}


@stage_main("sources")
def main(argv: list[str] | None = None) -> None:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="a data.sources[].path")
    parser.add_argument("--out", required=True, help="where the fingerprint goes (data/fingerprints/<key>.json)")
    args = parser.parse_args(argv)
    write_json(args.out, fingerprint(args.path))


if __name__ == "__main__":
    main()
