"""data/tokens.py: chat encoding, the prompt/response split, length buckets."""

from __future__ import annotations

import pytest
from conftest import PLAIN_CHATML

from components import bootstrap
from components.core import lockers, sorting
from components.core.data import tokens


@pytest.fixture(scope="module")
def tiny():
    tok = bootstrap.build_tokenizer(sorting.corpus(3, 4, 9, seed=1), 300)
    model = bootstrap.build_model(tok, 32, 2, 2, 1, 64, 128, seed=1).eval()
    return tok, model


def test_encode_chat_trains_on_assistant_turns_only(tiny):
    tok, _ = tiny
    messages = [
        {"role": "user", "content": "Sort ascending: 3 1"},
        {"role": "assistant", "content": "1 3"},
        {"role": "user", "content": "Sort ascending: 2 0"},
        {"role": "assistant", "content": "0 2"},
    ]
    ids, mask = tokens.encode_chat(tok, messages)
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "1 3<|im_end|>\n0 2<|im_end|>\n"
    assert tok.decode(ids) == tokens.render(tok, messages)


def test_prompt_response_split_is_a_token_boundary(tiny):
    tok, _ = tiny
    prompt = [{"role": "user", "content": "Sort ascending: 5 4"}]
    p, r = tokens.encode_prompt_response(tok, prompt, [{"role": "assistant", "content": "4 5"}])
    assert p == tokens.prompt_ids_for_generation(tok, prompt)
    assert tok.decode(r) == "4 5<|im_end|>\n"


def test_bucketed_batches_cover_everything_once_and_are_deterministic():
    lengths = [i % 17 for i in range(1000)]
    a = tokens.bucketed_batches(lengths, 32, seed=3, epoch=0)
    assert a == tokens.bucketed_batches(lengths, 32, seed=3, epoch=0)
    assert a != tokens.bucketed_batches(lengths, 32, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(1000))
    # bucketing: the length spread inside a batch is far below the global spread (16)
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a]
    assert sum(spreads) / len(spreads) < 3


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_the_embedded_template_renders_conversations_without_tools_as_plain_chatml(tiny, generation_prompt):
    tok, _ = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort ascending: 3 1"},
                {"role": "assistant", "content": "1 3"}, {"role": "user", "content": "And 2 0?"}]
    for upto in range(1, len(messages) + 1):
        plain = tok.apply_chat_template(messages[:upto], chat_template=PLAIN_CHATML, tokenize=False,
                                        add_generation_prompt=generation_prompt)
        assert tokens.render(tok, messages[:upto], add_generation_prompt=generation_prompt) == plain


def test_the_embedded_template_renders_tools_calls_and_results(tiny):
    tok, _ = tiny
    assert tokens.template_supports_tools(tok)
    tools = [lockers.OPEN_LOCKER_TOOL]
    call = {"type": "function", "function": {"name": "open_locker", "arguments": {"number": 17}}}
    question = "Ticket 4821: what is the code of locker 17?"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "open_locker", "content": "23"}, {"role": "assistant", "content": "23"}]
    assert tokens.render(tok, messages, tools=tools) == (
        "<|im_start|>system\nBe brief.\nTools: open_locker(number)<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>{"name": "open_locker", "arguments": {"number": 17}}</tool_call><|im_end|>\n'
        "<|im_start|>tool\n23<|im_end|>\n<|im_start|>assistant\n23<|im_end|>\n")
    # arguments given as a JSON string (as OpenAI sends them) render the same
    string_args = {"type": "function", "function": {"name": "open_locker", "arguments": '{"number": 17}'}}
    assert tokens.render(tok, messages[:2] + [{**messages[2], "tool_calls": [string_args]}], tools=tools) \
        == tokens.render(tok, messages[:3], tools=tools)
    # the assistant turns, tool call included, are what SFT trains on; the tool result is not
    ids, mask = tokens.encode_chat(tok, messages[1:], tools)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == (
        '<tool_call>{"name": "open_locker", "arguments": {"number": 17}}</tool_call><|im_end|>\n23<|im_end|>\n')
    assert lockers.tool_call_text(17) + "<|im_end|>" in tokens.render(tok, messages, tools=tools)
    assert tokens.render(tok, messages[1:2], tools=tools).startswith(
        "<|im_start|>system\n" + lockers.TOOLS_LINE + "<|im_end|>\n")


def test_tool_demos_call_the_tool_at_their_share_and_answer_with_the_code():
    demos = lockers.tool_demos(400, 0.5, seed=3)
    calls = [d for d in demos if len(d["messages"]) == 4]
    assert 160 < len(calls) < 240 and all(d["tools"] == [lockers.OPEN_LOCKER_TOOL] for d in demos)
    for d in calls:
        user, call, result, answer = d["messages"]
        assert call["tool_calls"][0]["function"]["arguments"]["number"] == lockers.locker_of(user["content"])
        assert result["content"] == answer["content"] and 0 <= int(answer["content"]) <= lockers.MAX_CODE
    assert len({d["messages"][0]["content"] for d in demos}) > 390  # the ticket makes each question its own
    assert len({d["messages"][-1]["content"] for d in demos}) > 25  # codes drawn at random
    assert lockers.tool_demos(5, 0.5, seed=3) == demos[:5]  # its own stream: the same first demos
