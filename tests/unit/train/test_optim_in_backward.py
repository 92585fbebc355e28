"""train/in_backward.py: the optimizer step fused into backward gives the weights and learning rates of the
usual AdamW step (clipping off), keeps no gradient alive beyond its own parameter's update, and round-trips
its state."""

from __future__ import annotations

import copy
import io
from types import SimpleNamespace

import pytest
import torch

from components import bootstrap
from components.core import sorting
from components.core.model import loading
from components.core.train import in_backward, loop

STEPS, LR, WD = 6, 1e-2, 0.1


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama (tied embeddings: one parameter used twice in the graph) and fixed token batches."""
    tok = bootstrap.build_tokenizer(sorting.corpus(3, 4, 9, seed=1), 300)
    model = bootstrap.build_model(tok, 32, 2, 2, 1, 64, 128, seed=1)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(tok), (2, 12), generator=gen) for _ in range(STEPS)]
    return model, batches


def nll(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def train(model, batches, fused: bool, checkpointing: bool = False) -> tuple[list[float], list[float | None]]:
    """STEPS steps in the stage loop's order (backward, [step, zero_grad], schedule); (lrs, grad norms)."""
    model.train()
    loading.enable_gradient_checkpointing(model, checkpointing)  # as the stages enable it
    optimizer = loop.make_optimizer(model, LR, WD, in_backward=fused)
    schedule = loop.make_scheduler(optimizer, "cosine", 2, STEPS)
    lrs, norms = [], []
    for ids in batches:
        lrs.append(schedule.get_last_lr()[0])
        nll(model, ids).backward()
        if fused:
            assert all(p.grad is None for p in model.parameters())  # nothing left after backward
            norms.append(optimizer.grad_norm())
        else:
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return lrs, norms


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_fused_step_gives_the_weights_and_schedule_of_adamw(tiny, checkpointing):
    base, batches = tiny
    normal, fused = copy.deepcopy(base), copy.deepcopy(base)
    lrs_a, norms_a = train(normal, batches, fused=False, checkpointing=checkpointing)
    lrs_b, norms_b = train(fused, batches, fused=True, checkpointing=checkpointing)
    assert lrs_a == lrs_b and len(set(lrs_a)) > 2  # warmup then cosine: the schedule reaches every parameter
    torch.testing.assert_close(torch.tensor(norms_b), torch.tensor(norms_a), rtol=1e-5, atol=1e-7)
    moved = 0
    for (name, a), b, c in zip(normal.named_parameters(), fused.parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(a, c)
    assert moved == len(list(base.parameters()))


def test_at_most_one_gradient_is_alive_during_backward(tiny):
    model, batches = copy.deepcopy(tiny[0]), tiny[1]
    params = list(model.parameters())
    alive: list[int] = []
    # registered first, so it runs before the step hook of the same parameter: that gradient is set, no other
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    optimizer = loop.make_optimizer(model, LR, WD, in_backward=True)
    nll(model, batches[0]).backward()
    assert len(alive) == len(params) and set(alive) == {1}
    optimizer.remove_hooks()
    nll(model, batches[0]).backward()  # hooks gone: gradients accumulate as usual
    assert all(p.grad is not None for p in params)


def test_state_round_trip_resumes_exactly(tiny):
    """Stopped after k steps, saved (optimizer + schedule) and restored into a fresh model and optimizer, the
    run ends with the weights of an uninterrupted one: what accelerate's save_state / load_state carry."""
    base, batches = tiny
    whole = copy.deepcopy(base)
    train(whole, batches, fused=True)

    first = copy.deepcopy(base)
    optimizer = loop.make_optimizer(first, LR, WD, in_backward=True)
    schedule = loop.make_scheduler(optimizer, "cosine", 2, STEPS)
    for ids in batches[:3]:
        nll(first, ids).backward()
        schedule.step()
    buffer = io.BytesIO()
    state = {"model": first.state_dict(), "optim": optimizer.state_dict(), "sched": schedule.state_dict()}
    torch.save(state, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = copy.deepcopy(base)
    resumed.load_state_dict(saved["model"])
    optimizer = loop.make_optimizer(resumed, LR, WD, in_backward=True)
    schedule = loop.make_scheduler(optimizer, "cosine", 2, STEPS)
    optimizer.load_state_dict(saved["optim"])
    schedule.load_state_dict(saved["sched"])
    assert {g["lr"] for g in optimizer.param_groups} == {schedule.get_last_lr()[0]}
    for ids in batches[3:]:
        nll(resumed, ids).backward()
        schedule.step()
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_state_of_other_parameters_is_refused(tiny):
    optimizer = loop.make_optimizer(copy.deepcopy(tiny[0]), LR, WD, in_backward=True)
    state = optimizer.state_dict()
    state["optimizers"]["renamed"] = state["optimizers"].pop(next(iter(state["optimizers"])))
    with pytest.raises(ValueError, match="optimizer state of other parameters"):
        optimizer.load_state_dict(state)


@pytest.mark.parametrize("accelerator, expected", [
    (SimpleNamespace(num_processes=2, scaler=None), "needs one process, not 2"),
    (SimpleNamespace(num_processes=1, scaler=object()), "fp16 loss scaling"),
])
def test_launches_it_would_get_wrong_are_refused(tiny, accelerator, expected):
    with pytest.raises(ValueError, match=f"optimizer_in_backward.*{expected}"):
        loop.prepare_training(accelerator, copy.deepcopy(tiny[0]), LR, WD, in_backward=True)
    assert in_backward.check_launch(SimpleNamespace(num_processes=1, scaler=None)) is None
