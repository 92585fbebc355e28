"""core/io: the one atomic writer. Complete or absent; the old copy survives a failed write; leftovers go."""

from __future__ import annotations

import json
import os

import pytest

from components.core.ops import io


def test_atomic_dir_replaces_the_old_copy_only_when_the_block_succeeds(tmp_path):
    dest = tmp_path / "artifact"
    with io.atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (dest / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError), io.atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (dest / "a.txt").read_text() == "one"  # the good copy is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # no temp dir left behind

    with io.atomic_dir(dest) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]  # replaced, not merged
    assert oct(dest.stat().st_mode & 0o777) != oct(0o700)  # an ordinary directory, not mkdtemp's 0700


def test_leftovers_of_a_killed_writer_are_swept(tmp_path):
    (tmp_path / ".artifact.tmp-abc").mkdir()
    (tmp_path / ".artifact.old-def").mkdir()
    (tmp_path / ".other.tmp-xyz").mkdir()  # another artifact's: not ours to remove
    with io.atomic_dir(tmp_path / "artifact") as tmp:
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-xyz", "artifact"]


def test_file_writers_are_atomic_and_keep_their_formats(tmp_path, monkeypatch):
    path = tmp_path / "m" / "metrics.json"
    io.write_json(path, {"b": 1, "a": 2})
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'  # sorted keys, trailing newline (DVC-friendly)

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        io.write_json(path, {"c": 3})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 2, "b": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]

    io.write_csv(tmp_path / "rows.csv", [{"step": 1, "loss": 0.5}, {"step": 2, "eval/loss": 0.4}])
    assert (tmp_path / "rows.csv").read_text().splitlines() == ["step,loss,eval/loss", "1,0.5,", "2,,0.4"]
    io.write_jsonl(tmp_path / "r.jsonl", [{"t": "é"}])
    assert (tmp_path / "r.jsonl").read_text() == '{"t": "\\u00e9"}\n'
    assert io.read_jsonl(tmp_path / "r.jsonl") == [{"t": "é"}]
