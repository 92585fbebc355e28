"""What prepare keeps per record while it streams (core/data/records.py) and how it fans records out to workers
(core/ops/parallel.py): the dedupe id set, the split from 64-bit prompt keys (against the dict-of-keys algorithm
it replaces, on random data), and an ordered map that never reads its input ahead of a bounded window."""

from __future__ import annotations

import random

import numpy as np
import pytest

from components.core.data.records import IdSet, eval_sides, is_eval, split_hash, split_unit
from components.core.ops.parallel import ordered_map, resolve_workers

KINDS = ("sft", "preference", "unpaired")


def reference_eval_keys(kinds_by_key: dict[int, set[str]], eval_fraction: float) -> set[int]:
    """The split as prepare computed it with every key in a dict (before streaming): keys are split hashes."""
    unit = {key: key / 2**64 for key in kinds_by_key}
    held_out = {key for key, u in unit.items() if u < eval_fraction}
    for guarantee_eval in (False, True):
        for kind in KINDS:
            keys = sorted((k for k, kinds in kinds_by_key.items() if kind in kinds), key=unit.__getitem__)
            if guarantee_eval and len(keys) >= 2 and not any(k in held_out for k in keys):
                held_out.add(keys[0])
            if not guarantee_eval and keys and all(k in held_out for k in keys):
                held_out.discard(keys[-1])
    return held_out


@pytest.mark.parametrize("trial", range(60))
def test_eval_sides_equals_the_dict_algorithm(trial):
    rng = random.Random(trial)
    n_keys = rng.choice([1, 2, 3, 5, 40])
    keys = [rng.getrandbits(64) for _ in range(n_keys)]
    eval_fraction = rng.choice([0.01, 0.1, 0.5, 0.99])
    records = [(rng.choice(keys), rng.randrange(len(KINDS))) for _ in range(rng.randint(1, 120))]
    kinds_by_key: dict[int, set[str]] = {}
    for key, kind in records:
        kinds_by_key.setdefault(key, set()).add(KINDS[kind])
    expected = reference_eval_keys(kinds_by_key, eval_fraction)

    flipped, prompts = eval_sides(np.array([k for k, _ in records], dtype=np.uint64),
                                  np.array([c for _, c in records], dtype=np.uint8), KINDS, eval_fraction)
    assert {k for k in kinds_by_key if is_eval(k, eval_fraction, flipped)} == expected
    assert prompts == {"train": len(kinds_by_key) - len(expected), "eval": len(expected)}


def test_eval_sides_guarantees_by_hand():
    low, high = 1 << 60, 3 << 62  # units 1/16 and 3/4
    # eval_fraction 0.9: both held out -> the highest goes back to train
    flipped, prompts = eval_sides(np.array([low, high], dtype=np.uint64), np.zeros(2, np.uint8), KINDS, 0.9)
    assert flipped == {high} and prompts == {"train": 1, "eval": 1}
    # eval_fraction 0.01: none held out -> the lowest is held out
    flipped, _ = eval_sides(np.array([low, high], dtype=np.uint64), np.zeros(2, np.uint8), KINDS, 0.01)
    assert flipped == {low} and is_eval(low, 0.01, flipped) and not is_eval(high, 0.01, flipped)
    assert eval_sides(np.array([], dtype=np.uint64), np.array([], dtype=np.uint8), KINDS, 0.1) == \
        (set(), {"train": 0, "eval": 0})


def test_split_hash_is_the_split_unit_in_64_bits():
    assert split_hash("key", 3) / 2**64 == split_unit("key", 3)
    assert split_hash("key", 3) != split_hash("key", 4)


def test_id_set_finds_every_added_id_across_merges():
    ids = IdSet(merge_every=4)
    added = [f"{random.Random(i).getrandbits(64):016x}" for i in range(50)]
    for i, rid in enumerate(added):
        assert rid not in ids
        ids.add(rid)
        assert all(r in ids for r in added[: i + 1])
    assert len(ids) == 50
    assert "0" * 16 not in ids and "f" * 16 not in ids


def _square(x):
    return x * x


def _fail_on_three(x):
    if x == 3:
        raise ValueError("three")
    return x


@pytest.mark.parametrize("workers", [1, 2])
def test_ordered_map_keeps_order_and_reads_at_most_a_window_ahead(workers):
    read = []

    def jobs():
        for i in range(40):
            read.append(i)
            yield f"tag{i}", i

    for tag, result in ordered_map(_square, jobs(), workers, window=3):
        i = int(tag[3:])
        assert result == i * i
        assert len(read) <= i + 1 + (3 if workers > 1 else 0)  # never more than the window ahead


def test_ordered_map_raises_a_workers_error_in_its_turn():
    seen = []
    with pytest.raises(ValueError, match="three"):
        for _, result in ordered_map(_fail_on_three, ((i, i) for i in range(10)), 2, window=4):
            seen.append(result)
    assert seen == [0, 1, 2]


def test_zero_workers_means_every_available_core():
    assert resolve_workers(0) >= 1 and resolve_workers(3) == 3
