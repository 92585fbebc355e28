"""components/core/ops/determinism.py: the kernel that made GRPO differ under load, made thread-order free; the
settings recorded with a run and compared on resume."""

from __future__ import annotations

import pytest
import torch

from components.core.model.logprobs import slot_logps
from components.core.ops import determinism


@pytest.fixture
def two_threads():
    threads, enabled = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(enabled, warn_only=True)


def _index_backward(n_rows: int = 1024, hidden: int = 64) -> torch.Tensor:
    """The gradient of x[positions] with every position the same row: n_rows * hidden > 32k elements, so torch's CPU
    index_put_(accumulate=True) would split them over threads and add with atomics; values over 6 orders of
    magnitude so that the order of the additions shows in the bits."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(n_rows, hidden, generator=g) * torch.logspace(-3, 3, n_rows)[:, None]
    x = torch.zeros(4, hidden, requires_grad=True)
    x[torch.zeros(n_rows, dtype=torch.long)].backward(values)
    return x.grad[0].clone()


def test_repeated_index_backward_sums_in_one_order_whatever_the_threads(two_threads):
    """What made the embedded GRPO run differ on a busy machine: the same forward, a gradient different in its
    last bits. With the stages' settings the 2-thread sum is the 1-thread (serial) one, every time."""
    determinism.apply(True)
    torch.set_num_threads(1)
    serial = _index_backward()
    torch.set_num_threads(2)
    assert all(torch.equal(_index_backward(), serial) for _ in range(10))


def test_slot_logps_gradient_with_shared_positions_is_thread_order_free(two_threads):
    """slot_logps as GRPO calls it: G completions that start with the same token read the same hidden position."""
    determinism.apply(True)
    g = torch.Generator().manual_seed(1)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(64, 300, bias=False)

        def get_output_embeddings(self):
            return self.lm_head

    model = Head()
    # one row whose 1,200 slots all read position 0: 1,200 x 64 gradient elements into one hidden row, split over
    # the threads (two rows would split cleanly, one per thread, and hide the race)
    hidden = torch.randn(1, 40, 64, generator=g, requires_grad=True)
    positions = torch.zeros(1, 1200, dtype=torch.long)
    targets = torch.randint(0, 300, (1, 1200), generator=g)

    def grad(threads: int) -> torch.Tensor:
        torch.set_num_threads(threads)
        hidden.grad = None
        logps, _ = slot_logps(model, hidden, positions, targets, torch.ones_like(targets, dtype=torch.bool))
        (logps * torch.logspace(-2, 2, 1200)).sum().backward()
        return hidden.grad.clone()

    serial = grad(1)
    assert all(torch.equal(grad(2), serial) for _ in range(5))


def test_apply_switches_deterministic_kernels_and_records_the_settings(two_threads):
    on = determinism.apply(True)
    assert on["deterministic"] is True and torch.are_deterministic_algorithms_enabled()
    assert on["warn_only"] is True  # a kernel without a deterministic variant warns instead of failing the run
    assert on["threads"] == 2 and on["torch"] == torch.__version__ and on["device"] == "cpu"
    assert {"cpu_capability", "world_size", "transformers", "accelerate", "env"} <= set(on)
    off = determinism.apply(False)
    assert off["deterministic"] is False and not torch.are_deterministic_algorithms_enabled()


def test_differences_name_what_breaks_bit_identity():
    saved = {"deterministic": True, "threads": 2, "torch": "2.13.0", "cpu_capability": "AVX512", "device": "cpu",
             "world_size": 1, "interop_threads": 2}
    assert determinism.differences(saved, dict(saved, interop_threads=8)) == []  # does not decide the bits
    assert determinism.differences(saved, dict(saved, threads=4)) == ["threads 2 -> 4"]
    assert determinism.differences(None, saved) == []  # a checkpoint from before the record existed
