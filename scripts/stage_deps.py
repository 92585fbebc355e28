"""Rewrite each dvc.yaml stage's code deps as the import closure of its module
(components/core/ops/code_identity.py, which tests/unit/test_layout.py checks). Run after changing imports:

    .venv/bin/python scripts/stage_deps.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.core.ops.code_identity import stage_files  # noqa: E402


def main() -> None:
    import yaml

    cmds = {name: s["cmd"] for name, s in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}
    lines = (ROOT / "dvc.yaml").read_text().splitlines()
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"^  (\w+):$", line):
            stage = m.group(1)
        if stage and line.strip() == "deps:":
            out.append(line)
            i += 1
            others = []
            while i < len(lines) and lines[i].startswith("      - "):
                entry = lines[i].strip()[2:].split("#")[0].strip()
                if not entry.endswith(".py"):
                    others.append(lines[i])
                i += 1
            own = f"components/{stage}.py"
            files = stage_files(f"components.{stage}", cmds.get(stage, ""))
            files.remove(own)
            out += [f"      - {own}", *(f"      - {f}" for f in files), *others]
            continue
        out.append(line)
        i += 1
    (ROOT / "dvc.yaml").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
