"""Multi-turn episodes on a tiny random model: environment tokens are masked out and exactly the template's text,
the policy's tokens keep the sampler's log-probs (recomputed over the whole episode they agree), budgets and turn
limits hold, and the same seed gives the same episodes."""

from __future__ import annotations

import pytest
import torch

from components import bootstrap
from components.core import lockers, sorting
from components.core.algos.environments import Environment, Step
from components.core.model import logprobs
from components.core.train import episodes, online


class Chatty(Environment):
    """Answers every assistant turn with a tool message, 0.25 reward a step."""

    tools = [lockers.OPEN_LOCKER_TOOL]

    def step(self, message):
        return Step([{"role": "tool", "name": "open_locker", "content": "1 2 3"}], reward=0.25)


@pytest.fixture(scope="module")
def tiny():
    tok = bootstrap.build_tokenizer(sorting.corpus(3, 4, 9, seed=1) + lockers.corpus(seed=1, n=200), 400)
    model = bootstrap.build_model(tok, 64, 2, 4, 2, 128, 512, seed=3).eval()
    return tok, model


# a turn ends at any of these (as a model's generation config may list several): a random model's turns end after
# a few tokens, so episodes have several
STOP = [2, *range(40, 100)]  # 2: <|im_end|>


def sample(tok, model, env=Chatty, budget=48, max_turns=3, seed=7):
    runner = episodes.EpisodeRunner(env, tok, max_turns)
    messages = [{"role": "user", "content": "Sort ascending: 3 1 2"}]
    prompts = [online.Prompt(str(i), messages, "1 2 3", runner.prompt_ids(messages)) for i in range(3)]
    sampling = online.Sampling(4, budget, 1.0, 1.0, 3, STOP, tok.pad_token_id, runner)
    return prompts, runner.sample(model, prompts, sampling, seed)


def test_environment_tokens_are_masked_and_are_the_templates_text(tiny):
    tok, model = tiny
    prompts, out = sample(tok, model)
    assert tok.decode(prompts[0].ids).startswith("<|im_start|>system\nTools: open_locker(number)<|im_end|>")
    tool_turn = "\n<|im_start|>tool\n1 2 3<|im_end|>\n<|im_start|>assistant\n"
    multi = 0
    for c in out:
        assert len(c["ids"]) == len(c["mask"]) == len(c["sampler_logps"]) <= 48
        runs, current = [], []
        for t, m in zip(c["ids"], c["mask"], strict=True):
            if m:
                if current:
                    runs.append(current)
                current = [] if m else current
            else:
                current.append(t)
        runs += [current] if current else []
        assert all(tok.decode(r) == tool_turn for r in runs)  # each environment block: the tool turn, whole
        assistant = [m for m in c["turns"] if m["role"] == "assistant"]
        assert len(assistant) == len(runs) + 1 <= 3
        assert all(lp == 0.0 for lp, m in zip(c["sampler_logps"], c["mask"], strict=True) if not m)
        # a step per assistant turn that ended (the environment ran it, even when no room was left for its answer)
        assert c["env_reward"] == pytest.approx(0.25 * (len(runs) + (c["ids"][-1] in STOP)))
        assert c["text"] == assistant[-1]["content"]
        multi += len(runs) > 0
    assert multi >= 3  # the test exercises multi-turn episodes


def test_the_sampled_tokens_keep_their_log_probs_over_the_whole_episode(tiny):
    tok, model = tiny
    prompts, out = sample(tok, model)
    G = 4
    logps, mask, _ = logprobs.group_token_logps(model, [p.ids for p in prompts],
                                                [[c["ids"] for c in out[i * G:(i + 1) * G]] for i in range(3)],
                                                tok.pad_token_id, "cpu")
    trained = mask & episodes.token_mask(out, tuple(mask.shape), "cpu")
    for i, c in enumerate(out):
        keep = torch.tensor(c["mask"], dtype=torch.bool)
        assert int(trained[i].sum()) == int(keep.sum()) == episodes.trained_tokens(c)
        torch.testing.assert_close(logps[i, : len(c["ids"])][keep], torch.tensor(c["sampler_logps"])[keep],
                                   rtol=0, atol=1e-5)


def test_same_seed_same_episodes_and_the_turn_limit_holds(tiny):
    tok, model = tiny
    assert sample(tok, model)[1] == sample(tok, model)[1]
    assert sample(tok, model, seed=8)[1] != sample(tok, model)[1]
    _, one = sample(tok, model, max_turns=1)
    assert all(c["mask"] == [1] * len(c["ids"]) and len(c["turns"]) == 1 for c in one)


def test_token_mask_trained_tokens_and_metrics_by_hand():
    single = {"ids": [5, 6, 7]}
    episode = {"ids": [1, 2, 3, 4], "mask": [1, 0, 0, 1], "tool_calls": 2, "tool_failures": 1,
               "turns": [{"role": "assistant"}, {"role": "tool"}, {"role": "assistant"}]}
    assert episodes.token_mask([single, episode], (2, 5), "cpu").tolist() == [[True, True, True, False, False],
                                                                              [True, False, False, True, False]]
    assert episodes.trained_tokens(single) == 3 and episodes.trained_tokens(episode) == 2
    assert episodes.metrics([single]) == {}
    assert episodes.metrics([episode, {**episode, "tool_calls": 0, "tool_failures": 0}]) == {
        "tools/call_frequency": 1.0, "tools/failure_frequency": 0.5, "turns/mean": 2.0}
