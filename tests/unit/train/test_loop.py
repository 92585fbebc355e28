"""train/loop.py: the step plan, equal batch counts per rank, refused launch configs."""

from __future__ import annotations

import pytest

from components.core.train import loop


def test_plan_steps_accumulation_and_epochs():
    plan = loop.plan_steps([5] * 100, global_batch=10, grad_accum=2, max_steps=0, epochs=2, seed=0, world=1)
    assert len(plan) == 10 and all(len(step) == 2 for step in plan)
    assert sorted(i for step in plan[:5] for mb in step for i in mb) == list(range(100))
    capped = loop.plan_steps([5] * 100, 10, 1, max_steps=25, epochs=1, seed=0, world=1)
    assert len(capped) == 25  # runs into a second epoch
    with pytest.raises(ValueError, match="not enough"):
        loop.plan_steps([5], 1, 1, 1, 1, 0, world=2)


def test_even_shard_gives_every_process_the_same_number_of_batches():
    batches = [[0, 1], [2, 3], [4, 5], [6]]
    assert loop.even_shard(batches, 0, 3) == [([0, 1], False), ([6], False)]
    assert loop.even_shard(batches, 1, 3) == [([2, 3], False), ([0, 1], True)]
    assert loop.even_shard(batches, 2, 3) == [([4, 5], False), ([0, 1], True)]
    assert loop.even_shard(batches, 0, 1) == [(b, False) for b in batches]
    assert loop.even_shard([[7]], 1, 2) == [([7], True)]  # fewer batches than processes
    assert loop.even_shard([], 0, 2) == []


def test_deepspeed_launch_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="DeepSpeed launch configs are not supported.*accelerate_config: fsdp"):
        loop.make_accelerator("no")
