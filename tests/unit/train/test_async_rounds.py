"""core/train/async_rounds.py: which weights sample which round (the index alone decides), the checkpointed rounds in
flight, nothing sampled past the last round, and the refusals (dropout, FSDP)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch

from components.core.train import async_rounds


@dataclass
class FakeRound:
    index: int
    version: float  # the weights that sampled it: the policy's single weight
    thread: str


def policy_of(version: float) -> torch.nn.Module:
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(version)
    return net


def generate(calls: list[int]):
    def fn(index, timing, model, group):
        calls.append(index)
        timing["generate"] += 1.0
        return FakeRound(index, model.weight.item(), threading.current_thread().name)
    return fn


def train(source, policy, rounds: range) -> list[FakeRound]:
    """Take each round, then 'train' on it: the policy's weight becomes the number of rounds trained."""
    out = []
    for r in rounds:
        timing = {"generate": 0.0, "wait": 0.0}
        out.append(source.take(r, timing, policy))
        assert timing["generate"] in (0.0, 1.0) and timing["wait"] >= 0.0
        with torch.no_grad():
            policy.weight.fill_(r + 1.0)
    return out


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_round_r_is_sampled_by_the_weights_of_round_r_minus_staleness(staleness):
    policy, calls = policy_of(0.0), []
    source = async_rounds.make_rounds(staleness, generate(calls), policy, False, FakeRound, last=5, saved=[])
    got = train(source, policy, range(6))
    source.close()
    assert [r.version for r in got] == [max(0, r - staleness) for r in range(6)]
    assert calls == list(range(6))  # each round sampled once, in order, none past the last
    assert all(r.thread.startswith("alignflow-rollouts") == (staleness > 0) for r in got)
    assert policy.weight.item() == 6.0  # the trainer's weights are its own: the thread samples a copy


def test_a_checkpoint_keeps_the_rounds_in_flight_and_a_resume_trains_on_them():
    policy, calls = policy_of(0.0), []
    source = async_rounds.make_rounds(2, generate(calls), policy, False, FakeRound, last=5, saved=[])
    before = train(source, policy, range(3))
    saved = source.state()  # after round 2 trained: rounds 3 and 4 in flight (weights 1 and 2)
    source.close()
    assert [(s["index"], s["round"]["version"]) for s in saved] == [(3, 1.0), (4, 2.0)]

    resumed_calls = []
    resumed = async_rounds.make_rounds(2, generate(resumed_calls), policy_of(3.0), False, FakeRound, last=5,
                                       saved=saved)
    after = train(resumed, policy_of(3.0), range(3, 6))
    resumed.close()
    assert [r.version for r in before + after] == [0, 0, 0, 1, 2, 3]  # as the uninterrupted run
    assert resumed_calls == [5]  # rounds 3 and 4 came from the checkpoint


def test_an_error_in_the_rollout_thread_reaches_the_trainer():
    def broken(index, timing, model, group):
        raise RuntimeError(f"reward service down in round {index}")

    source = async_rounds.make_rounds(1, broken, policy_of(0.0), False, FakeRound, last=3, saved=[])
    with pytest.raises(RuntimeError, match="round 0"):
        source.take(0, {"wait": 0.0}, policy_of(0.0))
    source.close()


def test_dropout_and_fsdp_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match=r"Dropout\(p=0.1\).*max_staleness: 0"):
        async_rounds.make_rounds(1, generate([]), torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Dropout(0.1)),
                                 False, FakeRound, last=1, saved=[])
    with pytest.raises(ValueError, match="FSDP"):
        async_rounds.make_rounds(1, generate([]), policy_of(0.0), True, FakeRound, last=1, saved=[])
    async_rounds.make_rounds(0, generate([]), policy_of(0.0), True, FakeRound, last=1, saved=[])  # synchronous: fine


def test_share_cores_splits_the_cpu_threads_only_when_asynchronous(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(async_rounds, "_rollout_threads", None)
    try:
        torch.set_num_threads(5)
        async_rounds.share_cores(0, "cpu")  # synchronous: untouched
        assert torch.get_num_threads() == 5 and async_rounds._rollout_threads is None
        async_rounds.share_cores(1, "cpu")  # the trainer keeps the odd thread
        assert torch.get_num_threads() == 3 and async_rounds._rollout_threads == 2
    finally:
        torch.set_num_threads(before)
