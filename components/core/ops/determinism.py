"""Bit-for-bit reproducible runs: the settings a stage trains under, applied at its start and recorded with it.

Seeds are not enough. Found on the embedded GRPO run (2 cores, 2 busy loops beside it): rounds 0-4 identical, then
the weights differed after a step whose forward was bit-identical. The cause was the backward of advanced indexing
with repeated indices (`hidden[rows, positions]` in `model/logprobs.slot_logps`, where the G completions of a
group that start with the same token share the prompt's last position): torch's CPU `index_put_(accumulate=True)`
splits the elements over its OpenMP threads and adds with atomic float adds when it has more than 32k of them,
so two threads adding into the same row sum in whichever order they get there. On a quiet box one order wins
every time; under load a descheduled thread changes it and the last bits of a gradient differ, then every later
round. `torch.use_deterministic_algorithms(True)` makes that kernel (and every other one with a deterministic
variant) take it, on CPU and GPU; on 2 cores the whole GRPO stage runs no slower with it (measured: within the
run-to-run noise of ~10%).

What a run still needs for the same bits: the same thread count (a reduction split over 4 threads rounds
differently from one over 2), the same torch / CPU kernel family / GPU, and the same world size. `settings()`
records them; checkpoints keep them, and a resume under different ones says so (the run continues: the result is
correct, only not bit-identical to an uninterrupted one).

On GPUs, cuBLAS needs CUBLAS_WORKSPACE_CONFIG for deterministic GEMMs (set here when the user has not) and some
kernels have no deterministic variant (`warn_only`: a warning names them instead of failing the run).
`compute.deterministic: false` switches all of this off for speed.
"""

from __future__ import annotations

import os

# the settings that decide the bits of a result; a resume under other values is correct but not bit-identical
BIT_KEYS = ("deterministic", "threads", "torch", "cpu_capability", "device", "world_size")


def apply(enabled: bool) -> dict:
    """Switch deterministic kernels on (or off) for this process; returns `settings()`."""
    import torch

    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any GEMM
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    # with deterministic algorithms torch would also fill every torch.empty with NaN: a cost, and no change
    # to a correct program's results
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False
    return settings()


def settings() -> dict:
    """What decides a run's bits besides its inputs and seed: deterministic kernels, threads, versions, device."""
    import accelerate
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "CUBLAS_WORKSPACE_CONFIG")
           if k in os.environ}
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "env": env,
    }


def differences(saved: dict | None, current: dict) -> list[str]:
    """The bit-deciding settings that differ between a checkpoint's record and now ("threads 2 -> 4")."""
    if not saved:
        return []
    return [f"{k} {saved.get(k)} -> {current.get(k)}" for k in BIT_KEYS if saved.get(k) != current.get(k)]
