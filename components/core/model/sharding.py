"""FSDP2 sharding of a causal LM: the launch switch, which modules become units, frozen-model placement,
gradient sync and clipping over shards.

alignflow applies torch's `fully_shard` itself instead of accelerate's FSDP plugin: accelerate ignores FSDP on
CPU, so the sharded path could not otherwise be tested without GPUs. With this, the code that runs on GPUs
(NCCL) is the code the tests run over gloo. Checkpoint shards are `core/train/checkpoints.py`; the optimizer over
shards and the final save are `core/train/loop.py`.
"""

from __future__ import annotations

import contextlib

import torch


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config (configs/accelerate/fsdp.yaml) sets ACCELERATE_USE_FSDP."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def active(accelerator) -> bool:
    """FSDP2 for this run: an FSDP launch config with more than one process."""
    return fsdp_requested() and accelerator.num_processes > 1


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _layer_classes(model) -> set[str]:
    """Which modules become FSDP units: the accelerate config's class list, else the model's own
    `_no_split_modules` (the decoder layer class of every HF architecture)."""
    import os

    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    classes = {c.strip() for c in named.split(",") if c.strip()} or set(getattr(model, "_no_split_modules", None) or [])
    base = getattr(model, "base_model", model)
    present = {type(m).__name__ for m in base.modules()}
    if not classes & present:
        raise ValueError(f"FSDP: none of the layer classes {sorted(classes) or '[]'} is in the model "
                         f"({type(model).__name__}); set fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    return classes & present


def shard_model(model, device) -> torch.nn.Module:
    """FSDP2: each decoder layer, then the root (embeddings, final norm, LM head), is one unit whose
    parameters, gradients and optimizer state are split over the processes and gathered per forward.
    Compute precision stays with autocast, as on every other backend; fp32 master weights are sharded."""
    import os

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "no_shard")
    classes = _layer_classes(model)
    model.to(device)
    for module in list(model.modules()):
        if type(module).__name__ in classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
    # the root unit (embeddings, final norm, LM head) stays gathered between forward and backward, as FSDP2's
    # own heuristic does for roots: the scoring path uses the LM-head weight right after the forward
    # (model/logprobs.slot_logps), and backward would gather it again at once anyway
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


@contextlib.contextmanager
def gradient_sync(model, sync: bool):
    """FSDP2's no_sync: gradients of non-final micro-batches stay unsharded and local (no reduce-scatter)."""
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def prepare_frozen(accelerator, model):
    """A model that is only scored (reference pass, GRPO's reference): sharded like the trained ones under FSDP,
    else just on the device (no gradients, so no DDP wrapper)."""
    if active(accelerator):
        return shard_model(model, accelerator.device).eval()
    return model.to(accelerator.device).eval()


def clip_grad_norm(accelerator, model, max_norm: float) -> float | None:
    """Clip the global gradient norm (over all shards / processes); returns it as a float, None if off."""
    if max_norm <= 0:
        return None
    if is_sharded(model):
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
