"""How dvc.yaml starts a training stage: `accelerate launch`, without the processes it does not need.

    python -m components.core.ops.launch --config_file configs/accelerate/cpu.yaml -m components.grpo --params params.yaml

Takes exactly `accelerate launch`'s arguments and runs accelerate's own launcher code on them, with two
shortcuts, each measured on the 2-core default (a stage's start-up is paid once per stage, every run):
- a stage whose params section says `enabled: false` (grpo, reward_model, ppo, rloo) is not started at all: its
  placeholders (core/ops/placeholders.py, torch-free) are written here, 0.2 s a stage instead of 4;
- one process on one machine with no device selection (accelerate's "simple" launcher, `distributed_type:
  'NO'`, no `gpu_ids`: the cpu config) runs the stage in this process, with the environment accelerate would
  have given the child (ACCELERATE_*, OMP_NUM_THREADS, applied through torch.set_num_threads since torch is
  loaded), instead of a second Python that imports torch again (1.5 s a stage). The stage's exit code is this
  process's (an input error exits 2, as the stage does; accelerate's launcher turned every failure into 1).
Multi-process, FSDP, DeepSpeed, multi-node and `gpu_ids` launches (single_gpu.yaml names GPU 0: CUDA_VISIBLE_DEVICES
must be set before CUDA starts) go through accelerate's launchers unchanged, in a child process.
This module is a code dependency of every stage it launches (dvc.yaml): it decides the stage's environment.
Not the `accelerate` command either: it imports every other subcommand first (~0.8 s).

The params are validated here first, and the accelerate config file checked, so a wrong
`compute.accelerate_config` (or any other params error) is one line naming the key, exit 2 with the input-error
mark, not accelerate's traceback about a missing file. (dvc.yaml depends on the configs/accelerate directory, not
on the file the params name, so that DVC does not fail on a missing file before this check runs.)
"""

from __future__ import annotations

import os
import runpy
import sys

# the params section a stage reads, where it is not the stage's own name
SECTIONS = {"components.rloo": "ppo"}  # rloo is the ppo section with its rloo: overrides


def stage_args(stage_argv: list[str]):
    """The stage's own arguments this launcher reads: --params, and --out where a stage names its output with it,
    parsed as the stage's argparse would (everything else is the stage's business)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out")
    return parser.parse_known_args(stage_argv)[0]


def stage_module(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the module after -m, the stage's own arguments after it)."""
    for i, arg in enumerate(argv):
        if arg in ("-m", "--module") and i + 1 < len(argv):
            return argv[i + 1], argv[i + 2:]
    return None, []


def disabled(module: str, params) -> bool:
    """Whether params switch off this stage (its section has `enabled: false`)."""
    section = SECTIONS.get(module, module.rsplit(".", 1)[-1])
    return getattr(getattr(params, section, None), "enabled", True) is False


def config_file(argv: list[str]) -> str | None:
    """The launcher's --config_file (accelerate's own argument, before the module)."""
    for i, arg in enumerate(argv):
        if arg in ("-m", "--module"):
            break
        if arg == "--config_file" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config_file="):
            return arg.split("=", 1)[1]
    return None


def check_config_file(argv: list[str], params_path: str, params) -> None:
    """ParamsError naming `compute.accelerate_config` (or --config_file) when the accelerate config is missing."""
    from components.core.config import ParamsError

    path = config_file(argv)
    if path and not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        have = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []
        key = ("compute.accelerate_config" if os.path.basename(path) == f"{params.compute.accelerate_config}.yaml"
               else "--config_file")
        raise ParamsError(f"{params_path}: {key}: {path} does not exist"
                          + (f" (configs there: {', '.join(have)})" if have else ""))


def run_module(module: str, stage_argv: list[str]) -> None:
    """`python -m module *stage_argv`, in this process."""
    sys.argv = [module, *stage_argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def one_local_process(args) -> bool:
    """Whether accelerate's simple launcher would start exactly one local Python running a module."""
    return (args.module and not args.no_python and args.mpirun_hostfile is None
            and (args.num_processes or 1) <= 1 and (args.num_machines or 1) <= 1
            and args.gpu_ids in (None, "all"))


def launch(argv: list[str]) -> None:
    """accelerate's `launch_command` on argv; its simple launcher runs one local process here instead."""
    import accelerate.commands.launch as accelerate_launch
    import torch

    simple = accelerate_launch.simple_launcher

    def in_this_process(args) -> None:
        if not one_local_process(args):
            return simple(args)
        _, env = accelerate_launch.prepare_simple_launcher_cmd_env(args)
        os.environ.clear()
        os.environ.update(env)
        if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        run_module(args.training_script, list(args.training_script_args))

    accelerate_launch.simple_launcher = in_this_process
    from components.core.ops.logs import quiet_third_party

    quiet_third_party()  # accelerate's notice that it chose the CPU thread count: the launcher decides threads
    try:
        accelerate_launch.launch_command(accelerate_launch.launch_command_parser().parse_args(argv))
    finally:
        accelerate_launch.simple_launcher = simple


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    module, stage_argv = stage_module(argv)
    if module and module.startswith("components."):
        from components.core.config import ParamsError, load_params
        from components.core.ops.logs import exit_input_error, setup_logging

        args = stage_args(stage_argv)
        try:
            params = load_params(args.params)
            if disabled(module, params):  # no accelerate: its config is not needed
                from components.core.ops import placeholders

                setup_logging()
                if not placeholders.write_for(module, args.out):
                    run_module(module, stage_argv)
                return
            check_config_file(argv, args.params, params)
        except ParamsError as e:
            import functools

            from components.core.ops import outputs
            from components.core.ops.logs import put_back

            setup_logging()
            stage = module.rsplit(".", 1)[-1]
            absent = outputs.absent(outputs.stage_outs(stage))  # what `dvc repro` removed before this command
            exit_input_error(stage, e, then=functools.partial(put_back, stage, absent))
    launch(argv)


if __name__ == "__main__":
    main()
