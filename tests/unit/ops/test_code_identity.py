"""ops/code_identity.py: a stage's code is its module's import closure, for checkpoints and dvc.yaml alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from components.core.ops import code_identity
from components.core.ops.code_identity import ROOT, code_fingerprint, stage_files


@pytest.fixture()
def tree(tmp_path) -> Path:
    """A copy of the project's packages to edit."""
    for package in code_identity.PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# edited\n")


def test_a_module_imported_indirectly_is_part_of_the_stage(tree):
    """reward_model imports model/heads, which imports model/logprobs: the hand-kept list the checkpoints used
    to hash left logprobs (then scoring.py) out, so a change there resumed a checkpoint trained by the old code."""
    files = stage_files("components.reward_model", root=tree)
    assert "components/core/model/heads.py" in files and "components/core/model/logprobs.py" in files
    before = code_fingerprint("components.reward_model", root=tree)
    edit(tree / "components/core/model/logprobs.py")
    assert code_fingerprint("components.reward_model", root=tree) != before


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo", "reward_model", "reference", "evaluate"])
def test_editing_any_module_in_the_closure_changes_the_fingerprint(tree, stage):
    module = f"components.{stage}"
    files = stage_files(module, root=tree)
    assert f"components/{stage}.py" in files and "components/core/config.py" in files
    for rel in files:
        before = code_fingerprint(module, root=tree)
        edit(tree / rel)
        assert code_fingerprint(module, root=tree) != before, f"{stage}: editing {rel} left its fingerprint"


def test_a_module_outside_the_closure_does_not_change_it(tree):
    before = code_fingerprint("components.sft", root=tree)
    assert "components/core/release/gate.py" not in stage_files("components.sft", root=tree)
    edit(tree / "components/core/release/gate.py")
    assert code_fingerprint("components.sft", root=tree) == before


def test_a_new_import_joins_the_closure(tree):
    """A function-level import counts: code a stage runs lazily is still its code."""
    assert "components/core/release/gate.py" not in stage_files("components.sft", root=tree)
    sft = tree / "components/sft.py"
    sft.write_text(sft.read_text() + "\n\ndef _late():\n    from components.core.release import gate  # noqa: F401\n")
    code_identity.import_graph.cache_clear()
    assert "components/core/release/gate.py" in stage_files("components.sft", root=tree)


def test_the_launcher_counts_for_dvc_when_the_cmd_goes_through_it():
    cmd = "python -m components.core.ops.launch --config_file c.yaml -m components.sft --params params.yaml"
    assert "components/core/ops/launch.py" in stage_files("components.sft", cmd)
    assert "components/core/ops/launch.py" not in stage_files("components.sft")


def test_checkpoints_use_the_same_identity():
    from components.core.train import checkpoints

    assert checkpoints.code_fingerprint("components.dpo") == code_fingerprint("components.dpo")
