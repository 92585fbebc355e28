"""model/generation.py."""

from __future__ import annotations

from components.core.model import generation


def test_response_length_excludes_the_closing_eos():
    assert generation.response_length([5, 6, 2], eos=[2]) == 2
    assert generation.response_length([5, 6, 7], eos=[2]) == 3  # ran out of max_new_tokens
    assert generation.response_length([], eos=[2]) == 0
