"""How dvc.yaml starts a training stage: `accelerate launch`, unless params disable the stage.

    python -m components.core.launch --config_file configs/accelerate/cpu.yaml -m components.grpo --params params.yaml

Takes exactly `accelerate launch`'s arguments. With the stage's params section saying `enabled: false`
(grpo, reward_model, ppo), the stage's module runs here, in this one process, and writes its placeholders:
starting accelerate's launcher and a second Python with torch only to write three small files cost about
4 s a stage. Otherwise this process becomes `python -m accelerate.commands.launch` with the same arguments
(exec: same pid, signals and exit code). That is the module `accelerate launch` runs, without the `accelerate`
command's import of all its other subcommands (1.1 s a stage).

Params that cannot be read or validated here are left to the stage, which reports them as usual.
"""

from __future__ import annotations

import os
import runpy
import sys


def _value(argv: list[str], flag: str, default: str | None = None) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return default


def stage_module(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the module after -m, the stage's own arguments after it)."""
    for i, arg in enumerate(argv):
        if arg in ("-m", "--module") and i + 1 < len(argv):
            return argv[i + 1], argv[i + 2:]
    return None, []


def disabled(module: str, stage_argv: list[str]) -> bool:
    """Whether params switch off this stage (its section has `enabled: false`); False when unsure."""
    from components.core.config import ParamsError, load_params

    section = module.rsplit(".", 1)[-1]
    try:
        params = load_params(_value(stage_argv, "--params", "params.yaml"))
    except ParamsError:
        return False  # the stage says what is wrong with them
    return getattr(getattr(params, section, None), "enabled", True) is False


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    module, stage_argv = stage_module(argv)
    if module and module.startswith("components.") and disabled(module, stage_argv):
        sys.argv = [module, *stage_argv]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    os.execv(sys.executable, [sys.executable, "-m", "accelerate.commands.launch", *argv])


if __name__ == "__main__":
    main()
