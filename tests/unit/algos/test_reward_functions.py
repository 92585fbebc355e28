"""algos/reward_functions.py by hand."""

from __future__ import annotations

import pytest

from components.core.algos.reward_functions import (
    final_number,
    load_reward_function,
    numeric_reward,
    reward_identity,
)


def test_reward_functions_by_hand():
    prompt = [{"role": "user", "content": "Sort ascending: 3 1 2"}]
    assert load_reward_function("sorting")(prompt, "1 2 3", "") == 1.0
    assert load_reward_function("sorting")(prompt, "1 3 2", "") == pytest.approx(1 / 3)
    assert load_reward_function("exact_match")(prompt, " 1 2 3\n", "1 2 3") == 1.0
    assert load_reward_function("exact_match")(prompt, "1 2", "1 2 3") == 0.0
    assert load_reward_function("format")(prompt, "<think>hm</think>\n<answer>4</answer>", "") == 1.0
    assert load_reward_function("format")(prompt, "<answer>4</answer>", "") == 0.0
    assert final_number("so 3 + 4 = 7 #### 7") == "7" and final_number("the answer is \\boxed{1,234}") == "1234"
    assert numeric_reward(prompt, "I think it is 42.", "steps... #### 42") == 1.0
    assert numeric_reward(prompt, "no idea", "#### 42") == 0.0
    assert reward_identity("sorting") != reward_identity("exact_match")
    assert reward_identity("sorting") == reward_identity("sorting")
    with pytest.raises(ValueError, match="unknown reward"):
        load_reward_function("nonsense")
