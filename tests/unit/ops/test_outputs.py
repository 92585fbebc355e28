"""components/core/ops/outputs.py and the stage entry point around it: leftovers swept at a stage's start; after a
failure, the outputs `dvc repro` removed are put back as dvc.lock records them (DVC's cache layout built by hand
here, as DVC writes it: <cache>/files/md5/ab/cdef..., a directory as a `.dir` manifest)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from components.core.config import ParamsError
from components.core.ops import outputs
from components.core.ops.logs import stage_main

DVC_YAML = {"stages": {"dpo": {"cmd": "python -m components.dpo",
                               "outs": ["models/dpo"],
                               "metrics": [{"metrics/dpo.json": {"cache": False}}],
                               "plots": [{"plots/dpo.csv": {"cache": False}}]}}}


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _cache(root: Path, data: bytes) -> str:
    md5 = _md5(data)
    obj = root / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(data)
    return md5


def _project(root: Path) -> dict[str, bytes]:
    """A project whose last dpo run is in dvc.lock and the cache (the model's two files, uncached metrics + plots
    stashed by that run), with the workspace as `dvc repro` leaves it before running dpo: no outputs."""
    (root / ".dvc").mkdir(parents=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    files = {"models/dpo/model.safetensors": b"weights", "models/dpo/sub/config.json": b"{}",
             "metrics/dpo.json": b'{"loss": 0.5}\n', "plots/dpo.csv": b"step,loss\n1,0.5\n"}
    manifest = [{"md5": _cache(root, files[f"models/dpo/{rel}"]), "relpath": rel}
                for rel in ("model.safetensors", "sub/config.json")]
    dir_md5 = _cache(root, json.dumps(manifest).encode()) + ".dir"
    (root / ".dvc/cache/files/md5" / dir_md5[:2] / dir_md5[2:-4]).rename(
        root / ".dvc/cache/files/md5" / dir_md5[:2] / dir_md5[2:])
    lock_outs = [{"path": "models/dpo", "hash": "md5", "md5": dir_md5}]
    for path in ("metrics/dpo.json", "plots/dpo.csv"):
        lock_outs.append({"path": path, "hash": "md5", "md5": _cache(root, files[path])})
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"dpo": {"outs": lock_outs}}}))
    return files


def _failing_stage(error: BaseException):
    @stage_main("dpo")
    def main(argv=None):
        Path("models/dpo").mkdir(parents=True)
        Path("models/dpo/model.safetensors").write_bytes(b"a new model from the failing run")
        raise error

    return main


def test_a_failed_stage_puts_back_what_dvc_lock_records(tmp_path, monkeypatch, capsys):
    files = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        _failing_stage(RuntimeError("boom"))()
    assert {p: (tmp_path / p).read_bytes() for p in files} == files
    assert sorted(p.name for p in (tmp_path / "models/dpo").iterdir()) == ["model.safetensors", "sub"]
    assert ("dpo: failed; put back its last good outputs (as dvc.lock records them): models/dpo, metrics/dpo.json, "
            "plots/dpo.csv") in capsys.readouterr().err


def test_an_input_error_says_what_it_put_back_between_the_error_and_the_mark(tmp_path, monkeypatch, capsys):
    _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        _failing_stage(ParamsError("params.yaml: dpo.beta: must be > 0"))()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert err[0] == "dpo: error: params.yaml: dpo.beta: must be > 0"
    assert err[1].startswith("dpo: failed; put back its last good outputs")
    assert err[2].startswith("[alignflow] input error (ParamsError)")


def test_outputs_present_at_the_start_are_not_the_stages_to_put_back(tmp_path, monkeypatch, capsys):
    """A stage run by hand beside good outputs (not through dvc repro) leaves them alone when it fails."""
    _project(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/dpo.json").write_text('{"loss": "newer, by hand"}')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError):
        _failing_stage(RuntimeError("boom"))()
    assert (tmp_path / "metrics/dpo.json").read_text() == '{"loss": "newer, by hand"}'
    assert "models/dpo, plots/dpo.csv" in capsys.readouterr().err


def test_what_cannot_be_put_back_is_named_with_the_command_that_can(tmp_path, monkeypatch, capsys):
    files = _project(tmp_path)
    md5 = _md5(files["plots/dpo.csv"])
    (tmp_path / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).unlink()  # stash gone, and no git either
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError):
        _failing_stage(RuntimeError("boom"))()
    err = capsys.readouterr().err
    assert "put back its last good outputs (as dvc.lock records them): models/dpo, metrics/dpo.json\n" in err
    assert ("could not put back plots/dpo.csv (neither in the DVC cache nor in git HEAD): `dvc checkout dpo` or "
            "`dvc pull dpo`") in err


def test_a_successful_stage_stashes_its_uncached_outputs_and_sweeps_leftovers_first(tmp_path, monkeypatch):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (tmp_path / "models/.dpo.tmp-abc").mkdir(parents=True)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots/.dpo.csv.tmp-xyz").write_text("half")
    monkeypatch.chdir(tmp_path)
    seen = {}

    @stage_main("dpo")
    def main(argv=None):
        seen["leftovers"] = sorted(p.name for d in ("models", "plots") for p in Path(d).iterdir())
        Path("metrics").mkdir()
        Path("metrics/dpo.json").write_text('{"loss": 0.25}\n')

    main()
    assert seen["leftovers"] == []
    md5 = _md5(b'{"loss": 0.25}\n')
    assert (tmp_path / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_bytes() == b'{"loss": 0.25}\n'


def test_stage_outs_reads_outs_metrics_and_plots_and_the_cache_setting(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    assert outputs.stage_outs("dpo", tmp_path) == [outputs.Out("models/dpo", True, False),
                                                   outputs.Out("metrics/dpo.json", False, False),
                                                   outputs.Out("plots/dpo.csv", False, False)]
    assert outputs.stage_outs("nosuch", tmp_path) == [] and outputs.stage_outs("dpo", tmp_path / "none") == []
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc/config").write_text("[cache]\n    dir = ../../shared-cache\n")
    assert outputs.cache_dir(tmp_path) == (tmp_path / "../shared-cache").resolve()


def test_the_launchers_own_input_errors_put_back_too(tmp_path, monkeypatch, capsys):
    """A wrong accelerate config fails in the launcher, before the stage's entry point: same put-back, same lines."""
    from components.core.ops import launch

    files = _project(tmp_path)
    root = Path(__file__).resolve().parents[3]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["compute"]["accelerate_config"] = "nosuch"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        launch.main(["--config_file", "configs/accelerate/nosuch.yaml", "-m", "components.dpo", "--params",
                     "params.yaml"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "compute.accelerate_config" in err[0]
    assert err[1].startswith("dpo: failed; put back its last good outputs") and err[2].startswith("[alignflow]")
    assert {p: (tmp_path / p).read_bytes() for p in files} == files
