"""The optimizer step fused into backward (`sft/dpo/grpo.optimizer_in_backward`; torchtune's `optimizer_in_bwd`):
one optimizer per parameter, stepped by that parameter's post-accumulate-grad hook as soon as backward has its
whole gradient, which is then dropped.

Why: a full fine-tune with fp32 AdamW holds per parameter 4 bytes of weight, 8 of Adam moments and 4 of
gradient, and in the usual loop every gradient of the model is alive at once, from the end of backward to
`optimizer.step()`. Stepped in backward, a parameter's gradient lives only until its own update: peak memory
falls by up to one model's worth of gradients, for the same update. (A tied embedding / LM head is the
exception: its gradient is complete only at the very end of backward, so that one lives throughout.)

What it gives up, hence what the params refuse with it (core/config.py, `check_launch`): accumulation over
micro-batches (a step would fire on every backward), global-norm clipping (it needs every gradient before the
first update), more than one process (the hook sees the local gradient, before DDP's all-reduce or FSDP's
reduce-scatter) and fp16 loss scaling (the scaler unscales, and skips non-finite steps, after the whole
backward). The loss guards (non-finite loss, divergence) still stop the run, but after the update in memory:
nothing is written then, and a re-run resumes from the last checkpoint as before.

The schedule: the wrapper's `param_groups` are the per-parameter optimizers' own group dicts, so the stage's
one LambdaLR over the wrapper sets every parameter's lr, step k's the same as over the single AdamW.
Checkpoints: the wrapper's `state_dict` holds every per-parameter state (moments, step count, lr) by parameter
name; registered with accelerate (`register_for_checkpointing`), it is saved and restored with the weights,
the schedule and the RNG, so a run resumed after a crash ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import torch


class InBackwardOptimizer(torch.optim.Optimizer):
    """{parameter name: an optimizer over that one parameter}, each stepped by its parameter's hook in
    backward.

    The loop calls neither `step` nor `zero_grad`: the hooks did both. `grad_norm()` is the step's gradient
    norm (what clipping would have measured), summed in the hooks: afterwards no gradient is left to measure.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers
        # torch's bookkeeping (hook tables, state) on an empty group; the real groups: the per-parameter ones
        super().__init__([{"params": []}], {})
        self._share_groups()
        self._grad_sq: torch.Tensor | None = None
        self.handles = []
        for opt in optimizers.values():
            [group] = opt.param_groups
            [param] = group["params"]
            self.handles.append(param.register_post_accumulate_grad_hook(self._hook(opt)))

    def _share_groups(self) -> None:
        """One LR scheduler over this wrapper writes each parameter's lr into its own optimizer's group."""
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]

    def _hook(self, opt: torch.optim.Optimizer):
        def step(param: torch.Tensor) -> None:
            sq = torch.linalg.vector_norm(param.grad, dtype=torch.float32).square()  # no copy, no host sync
            self._grad_sq = sq if self._grad_sq is None else self._grad_sq + sq
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._opt_called = True  # for torch's LR-scheduler order check: the optimizer stepped first

        return step

    def grad_norm(self) -> float | None:
        """The global gradient norm of the backward since the last call (None if no parameter was stepped)."""
        sq, self._grad_sq = self._grad_sq, None
        return None if sq is None else float(sq.sqrt())

    @torch.no_grad()
    def step(self, closure=None):
        """Nothing left to do: every parameter was stepped in backward."""
        if closure is not None:
            raise RuntimeError("optimizer_in_backward: the step runs in backward, a closure cannot redo it")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["optimizers"]
        if saved.keys() != self.optimizers.keys():
            differ = sorted(saved.keys() ^ self.optimizers.keys())
            raise ValueError(f"optimizer state of other parameters ({len(differ)} differ, e.g. {differ[0]})")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(saved[name])
        self._share_groups()  # load_state_dict gave every optimizer new group dicts

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def check_launch(accelerator) -> None:
    """Refuse the launches the fused step would get wrong (see the module docstring), naming the key."""
    if accelerator.num_processes > 1:
        raise ValueError(f"optimizer_in_backward needs one process, not {accelerator.num_processes}: each "
                         "parameter is stepped on its local gradient, before DDP / FSDP reduce it")
    if getattr(accelerator, "scaler", None) is not None:
        raise ValueError("optimizer_in_backward does not work with fp16 loss scaling (the scaler unscales "
                         "after the whole backward): set compute.mixed_precision to bf16 or no")
