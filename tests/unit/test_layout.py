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

import pytest
import yaml

from components.core.ops.code_identity import (
    LAUNCHER,
    ROOT,
    import_graph,
    stage_files,
)

MAX_LINES = 400
# components/core's layers, bottom first: a module imports only from its own layer and the ones below
LAYERS = {"config": 0, "sorting": 0, "lockers": 0, "ops": 1, "data": 2, "algos": 3, "model": 4, "train": 5, "eval": 6, "release": 7}


def layer_of(module: str) -> str:
    """The layer a components.core module belongs to (its sub-package, or config / sorting / lockers at the top)."""
    return module.split(".")[2]


def stage_modules() -> dict[str, str]:
    """{DVC stage: module its cmd runs} (a training stage's: the module components.core.ops.launch starts)."""
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
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, module in stage_modules().items():
        needed = set(stage_files(module, stages[stage]["cmd"]))
        declared = {d for d in stages[stage].get("deps", []) if d.endswith(".py")}
        assert needed - declared == set(), f"stage {stage}: code it imports but does not declare: {sorted(needed - declared)}"
        assert declared - needed == set(), f"stage {stage}: declared code it never imports: {sorted(declared - needed)}"


def test_core_is_layered():
    """Each module of components/core/ lives in a layer (a sub-package, or config / sorting at the bottom) and
    imports only from its own layer and the ones below: ops < data < algos < model < train < eval < release."""
    for module, deps in import_graph().items():
        if not module.startswith("components.core."):
            continue
        assert layer_of(module) in LAYERS, f"{module}: not in a layer of components/core ({sorted(LAYERS)})"
        for dep in deps:
            if dep.startswith("components.core."):
                assert LAYERS[layer_of(dep)] <= LAYERS[layer_of(module)], (
                    f"{module} (layer {layer_of(module)}) imports {dep} from the higher layer {layer_of(dep)}")


def test_package_inits_hold_only_a_docstring():
    """The import closure skips packages' __init__.py (every module imports through them): they must hold no code."""
    for path in sorted((ROOT / "components").rglob("__init__.py")):
        body = ast.parse(path.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), (
            f"{path.relative_to(ROOT)}: a package __init__ holds a docstring only")


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


MAX_FUNCTION_LINES, MAX_PARAMETERS = 120, 12
PURE_MATH = ("components/core/algos/losses.py", "components/core/algos/rl.py")  # flat, typed dispatchers


def test_no_long_function_or_long_parameter_list_without_a_reason():
    """A function reads on one screen and takes what it needs: at most ~120 lines and 12 parameters, or its
    docstring says why ('Why this function is long: ...' / 'Why so many parameters: ...'). The pure math is
    exempt from the parameter count (flat, typed arguments are its style)."""
    found = []
    for path in sorted((ROOT / "components").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node) or ""
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and "Why this function is long:" not in doc:
                found.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
            if len(names) > MAX_PARAMETERS and rel not in PURE_MATH and "Why so many parameters:" not in doc:
                found.append(f"{rel}:{node.lineno} {node.name}: {len(names)} parameters")
    assert not found, "split these, or say why in the docstring:\n" + "\n".join(found)


def test_no_locals_as_an_identity():
    """A run's identity (tracked params, checkpoint fingerprint) is built from its typed config, never locals()."""
    for path in sorted((ROOT / "components").rglob("*.py")):
        assert "locals()" not in path.read_text(), f"{path.relative_to(ROOT)} uses locals()"
