"""The served chat model's request handling (core/release/chat_model.py), on hand-made requests: OpenAI's meaning
of each field, one clear 400 per bad one, and where an answer ends."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from components.core.release import chat_model as chat
from components.core.release import serving

DEFAULTS = {"max_tokens": 32, "temperature": 1.0, "top_p": 0.9}
USER = [{"role": "user", "content": "Sort: 3 1 2"}]


def test_the_artifact_key_is_the_one_the_registry_reads():
    assert chat.ARTIFACT == serving.HF_ARTIFACT  # chat_model.py imports nothing from alignflow: kept equal here


def test_a_request_comes_as_a_dict_a_one_row_frame_or_a_message_list():
    frame = pd.DataFrame([{"messages": USER, "temperature": 0.0, "max_tokens": float("nan")}])
    assert chat.as_request(frame) == {"messages": USER, "temperature": 0.0}  # NaN: a column the request left out
    assert chat.as_request(USER) == {"messages": USER}
    assert chat.as_request({"messages": USER}, {"max_tokens": 4}) == {"messages": USER, "max_tokens": 4}
    with pytest.raises(MlflowException, match="one chat request at a time, got 2 rows"):
        chat.as_request(pd.DataFrame([{"messages": USER}] * 2))


def test_defaults_are_evaluates_and_temperature_zero_is_accepted():
    s = chat.sampling_settings({"messages": USER}, DEFAULTS)
    assert (s["max_tokens"], s["temperature"], s["top_p"], s["n"], s["stop"], s["seed"]) == (32, 1.0, 0.9, 1, [], None)
    s = chat.sampling_settings({"temperature": 0, "max_tokens": 5, "stop": "\n", "custom_inputs": {"seed": 3}},
                               DEFAULTS)
    assert (s["temperature"], s["max_tokens"], s["stop"], s["seed"]) == (0.0, 5, ["\n"], 3)


@pytest.mark.parametrize("request_, message", [
    ({"temperature": -0.5}, "'temperature' must be in [0.0, 2.0], got -0.5"),
    ({"temperature": "hot"}, "'temperature' must be a number, got 'hot'"),
    ({"max_tokens": 0}, "'max_tokens' must be in [1, "),
    ({"max_tokens": 2.5}, "'max_tokens' must be an integer, got 2.5"),
    ({"top_p": 1.5}, "'top_p' must be in [0.0, 1.0], got 1.5"),
    ({"n": 9}, "'n' must be in [1, 8], got 9"),
    ({"stream": True}, "'stream' is not supported"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "'stop' must be a string or a list of up to 4 non-empty strings"),
    ({"stop": [""]}, "'stop' must be a string or a list of up to 4"),
    ({"custom_inputs": {"seed": "x"}}, "custom_inputs.seed must be an integer"),
])
def test_a_bad_setting_is_one_line_naming_it(request_, message):
    with pytest.raises(MlflowException) as e:
        chat.sampling_settings(request_, DEFAULTS)
    assert message in e.value.message and e.value.get_http_status_code() == 400


@pytest.mark.parametrize("messages, message", [
    (None, "'messages' must be a non-empty list"),
    ([], "'messages' must be a non-empty list"),
    (["hi"], "messages[0] must be an object"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
     "messages[1].role is 'bot'; expected one of system, user, assistant, tool"),
    ([{"role": "user"}], "messages[0].content is missing"),
    ([{"role": "user", "content": [{"type": "image"}]}], "messages[0].content must be a string (text only), got list"),
])
def test_bad_messages_name_the_first_bad_one(messages, message):
    with pytest.raises(MlflowException) as e:
        chat.check_messages(messages)
    assert message in e.value.message


def test_an_assistant_tool_call_needs_no_content_and_absent_fields_are_dropped():
    calls = [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert chat.check_messages([{"role": "assistant", "content": None, "tool_calls": calls}]) == [
        {"role": "assistant", "tool_calls": calls}]


def test_the_context_limit_is_the_smallest_real_one_and_says_both_numbers():
    class Config:
        max_position_embeddings = 128

    class Tokenizer:
        model_max_length = int(1e30)  # "no limit", as many tokenizers say it

    assert chat.context_length(Config(), Tokenizer()) == 128
    Tokenizer.model_max_length = 64
    assert chat.context_length(Config(), Tokenizer()) == 64
    chat.check_context(100, 28, 128)  # exactly full: fine
    with pytest.raises(MlflowException, match=r"maximum context length is 128 tokens; the request needs 129 "
                                              r"\(100 in the messages, 29 max_tokens\)"):
        chat.check_context(100, 29, 128)


def text_of(ids):  # token i is the letter chr(ord('a') + i); 0 = eos
    return "".join(chr(ord("a") + i) for i in ids)


@pytest.mark.parametrize("new, stop, max_tokens, want", [
    ([1, 2, 0, 3], [], 8, ([1, 2, 0], "bc", "stop")),  # the end-of-turn token ends it (and is kept in the ids)
    ([1, 2, 3], [], 3, ([1, 2, 3], "bcd", "length")),  # max_tokens reached
    ([1, 2, 3, 4], ["d"], 4, ([1, 2, 3, 4], "bc", "stop")),  # a stop string: cut before it
    ([1, 2, 3, 4], ["e", "c"], 4, ([1, 2, 3, 4], "b", "stop")),  # the earliest of several
])
def test_an_answer_ends_at_eos_a_stop_string_or_max_tokens(new, stop, max_tokens, want):
    assert chat.cut_answer(new, text_of, {0}, stop, max_tokens) == want
