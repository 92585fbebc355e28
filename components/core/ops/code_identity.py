"""The code a stage runs: the import closure of its module, read from the source (ast), never listed by hand.

One definition serves three users, so they cannot drift apart:
- `train/checkpoints.code_fingerprint`: a stage's checkpoints belong to the exact code that trained them (a change
  in any module it imports, directly or not, starts a fresh run instead of resuming under other code);
- `dvc.yaml`: each stage's code deps are `stage_files` (scripts/stage_deps.py writes them);
- tests/unit/test_layout.py: checks dvc.yaml against it, and the layers and cycles on the same graph.

Imports inside functions count (a lazy import is still code the stage runs). A package's `__init__.py` is not an
edge: they hold a docstring only (the layout test checks that).
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the directory holding components/ (the repo, or site-packages)
PACKAGES = ("components", "flows")
LAUNCHER = "components.core.ops.launch"  # how training stages start (accelerate launch's arguments)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} of every module in the project's packages (a package by its __init__.py)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in `path` (top level or inside functions), packages' __init__ aside."""
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
            if name and modules[name].name != "__init__.py":
                found.add(name)
    return found


@cache
def import_graph(root: Path = ROOT) -> dict[str, frozenset[str]]:
    """{module: the project modules it imports}."""
    modules = project_modules(root)
    return {name: frozenset(imports_of(path, modules) - {name}) for name, path in modules.items()}


def closure(module: str, graph: dict[str, frozenset[str]]) -> set[str]:
    """`module` and every project module it imports, directly or not."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    return seen


def stage_code(module: str, cmd: str = "", root: Path = ROOT) -> set[str]:
    """The project modules a DVC stage runs: its module's closure, and the launcher's when its cmd goes through it
    (the launcher decides the stage's environment)."""
    graph = import_graph(root)
    return closure(module, graph) | (closure(LAUNCHER, graph) if LAUNCHER in cmd else set())


def stage_files(module: str, cmd: str = "", root: Path = ROOT) -> list[str]:
    """`stage_code` as repo-relative file paths, sorted: a stage's code deps in dvc.yaml."""
    modules = project_modules(root)
    return sorted(str(modules[m].relative_to(root)) for m in stage_code(module, cmd, root))


def code_fingerprint(module: str, root: Path = ROOT) -> str:
    """Hash of the path and bytes of every file in `module`'s import closure (the code that trains)."""
    modules = project_modules(root)
    h = hashlib.sha256()
    for name in sorted(closure(module, import_graph(root))):
        path = modules[name]
        h.update(f"{path.relative_to(root)}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
