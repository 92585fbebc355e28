"""The layout tells the architecture: one file per DVC stage, named after it; shared pieces in
components/core/ that never import a stage; no import cycle; every stage's code (its file and every project
module it imports) declared as a DVC dependency; no file in components/ over ~400 lines without a reason.

The import graph is read statically (ast), function-level imports included, so a lazy import cannot hide a
cycle or an undeclared dependency.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("components", "flows")
MAX_LINES = 400


def project_modules() -> dict[str, Path]:
    """{dotted module name: file} of every module in the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in `path` (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports the submodule when there is one, else a name of pkg
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES and not name.endswith("__init__"):
                found.add(name)
    return found - {p for p in PACKAGES}  # importing a package's (empty) __init__ is not an edge


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def closure(module: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    return seen


LAUNCHER = "components.core.launch"  # how training stages start (accelerate launch's arguments)


def stage_code(module: str, cmd: str, graph: dict[str, set[str]]) -> set[str]:
    """The project modules a stage runs: its own closure, and the launcher's when its cmd goes through it (the
    launcher decides the stage's environment)."""
    return closure(module, graph) | (closure(LAUNCHER, graph) if LAUNCHER in cmd else set())


def stage_modules() -> dict[str, str]:
    """{DVC stage: module its cmd runs} (a training stage's: the module components.core.launch starts)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        modules = [m for m in re.findall(r"-m (components\.[\w.]+)", stage["cmd"]) if m != LAUNCHER]
        assert len(modules) == 1, f"dvc.yaml stage {name}: cmd must run `python -m components.<stage>`: {stage['cmd']}"
        out[name] = modules[0]
    return out


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_core_never_imports_a_stage_or_the_flows():
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith("components.core"):
            bad = sorted(d for d in deps if not d.startswith("components.core"))
            assert not bad, f"{module} imports {bad}: components/core/ must not depend on stages or flows"


def test_components_never_import_flows():
    for module, deps in import_graph().items():
        if module.startswith("components"):
            assert not any(d.startswith("flows") for d in deps), f"{module} imports flows/: ML must not orchestrate"


def test_one_file_per_stage_named_after_it():
    for stage, module in stage_modules().items():
        assert module == f"components.{stage}", f"stage {stage!r} runs {module}; expected components.{stage}"
        assert (ROOT / "components" / f"{stage}.py").is_file()


def test_every_stage_declares_its_code():
    """A stage's deps hold its file and every project module it imports, transitively (a code change must
    re-run the stage), and no code file it does not import (that would re-run it for nothing)."""
    graph = import_graph()
    modules = project_modules()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, module in stage_modules().items():
        needed = {str(modules[m].relative_to(ROOT)) for m in stage_code(module, stages[stage]["cmd"], graph)}
        declared = {d for d in stages[stage].get("deps", []) if d.endswith(".py")}
        assert needed - declared == set(), f"stage {stage}: code it imports but does not declare: {sorted(needed - declared)}"
        assert declared - needed == set(), f"stage {stage}: declared code it never imports: {sorted(declared - needed)}"


def test_machine_local_outputs_are_not_committed():
    """A registered version number is true only of the registry that holds it: register's output is a cached
    DVC out, so a fresh clone's `dvc repro` registers into its own store instead of finding the stage up to
    date (with a committed file it skipped register and `alignflow summary` named a version nobody had)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    [out] = stages["register"]["outs"]
    # persist: DVC keeps no run-cache of it, so changing params back re-runs register, which moves the
    # challenger alias back to that version (a run-cache restore would bring the file back and not the alias)
    assert out == {"reports/registration.json": {"persist": True}}, out
    tracked = subprocess.run(["git", "ls-files", "reports"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "registration.json" not in tracked


def test_no_long_file_without_a_reason():
    for path in sorted((ROOT / "components").rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES:
            head = "\n".join(lines[:30])
            assert "Why this file is long" in head, (
                f"{path.relative_to(ROOT)} has {len(lines)} lines (> {MAX_LINES}): split it, or say at its top "
                "why it is one file ('Why this file is long: ...')")


def test_readme_stage_table_links_each_stage_to_its_file():
    readme = (ROOT / "README.md").read_text()
    for stage in stage_modules():
        assert f"[`{stage}`](components/{stage}.py)" in readme, f"README stage table: link {stage} to its file"


def test_summary_reads_the_pipeline_outputs(tmp_path, monkeypatch):
    """`alignflow summary` (the end of scripts/run.sh): headline metrics, report and registry at a glance."""
    import json

    from components import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    assert "not run yet" in cli.format_summary(cli.read_summary(), "sqlite:///mlflow.db")
    (tmp_path / "metrics" / "sft.json").write_text(json.dumps({"eval/loss_first": 5.9, "eval/loss": 0.65}))
    ev = {"eval/reward_mean": 0.83, "eval/reward_delta": 0.2, "eval/reward_delta_ci_low": 0.15,
          "eval/reward_delta_ci_high": 0.25, "eval/win_rate_vs_sft": 0.69, "eval/win_rate_ci_low": 0.65,
          "eval/win_rate_ci_high": 0.74, "eval/rewards/accuracies": 0.98, "eval/kl_to_reference": 1.5,
          "eval/length_ratio": 1.02, "eval/num_prompts": 200, "eval/sft/reward_mean": 0.63}
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(ev))
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "registration.json").write_text(json.dumps({"name": "m", "version": "3", "alias": "challenger"}))
    text = cli.format_summary(cli.read_summary(), "sqlite:///mlflow.db")
    assert "held-out loss 5.90 -> 0.65" in text and "judge reward 0.630" in text
    assert "judge reward 0.830 (Δ +0.200 [+0.150, +0.250])" in text and "win rate vs SFT 69.0% [65.0%, 74.0%]" in text
    assert "m v3 = challenger" in text and len(text.splitlines()) <= 8
