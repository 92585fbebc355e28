"""Regenerate the prepare fixtures: `python tests/data/make_fixtures.py` (deterministic).

Small files in the real public formats, each with a few bad records whose drop reason the tests count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent
LONG = "lorem " * 400  # far over any test max_length
LONG_PROMPT = "word " * 300 + "?"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def write_jsonl(name: str, records: list) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def pref(prompt, chosen, rejected) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def main() -> None:
    # TRL standard preference format, strings
    write_jsonl(
        "trl_pref_strings.jsonl",
        [
            pref("What is the capital of France?", "Paris.", "Lyon."),
            pref("Name a primary colour.", "Red.", "Green."),
            pref("What is 2 + 2?", "4", "5"),
            pref("Sort 3 1 2.", "1 2 3", "3 2 1"),
            pref("Translate 'gato' to English.", "Cat.", "Dog."),
            pref("Is water wet?", "It makes things wet.", "No."),
            pref("Say hi.", "Hi!", "Hi!"),  # 7 identical_pair
            pref("Give a number.", "   ", "7"),  # 8 empty_field
            pref("Count to three.", 123, "1 2"),  # 9 wrong_type
            pref("Write a long essay.", LONG, "No."),  # 10 too_long
            pref("What is the capital of France?", "Paris.", "Lyon."),  # 11 duplicate of 1
            pref(LONG_PROMPT, "Yes.", "No."),  # 12 prompt_too_long
        ],
    )
    # TRL conversational preference format
    boiling = user("What is the boiling point of water?")
    write_jsonl(
        "trl_pref_messages.jsonl",
        [
            pref([user("What color is the sky?")], [assistant("Blue.")], [assistant("Green.")]),
            pref(
                [system("You are terse."), user("Name a fruit.")],
                [assistant("Apple.")],
                [assistant("A car.")],
            ),
            pref(
                [user("Hi"), assistant("Hello! How can I help?"), user("Tell me a joke.")],
                [assistant("Why did the chicken cross the road? To get to the other side.")],
                [assistant("No.")],
            ),
            pref([boiling], [boiling, assistant("100 C at sea level.")], [boiling, assistant("50 C.")]),
            pref(
                [system(""), user("Pick a number.")], [assistant("7")], [assistant("banana")]
            ),  # empty system removed
            pref([user("Run ls.")], [{"role": "tool", "content": "a b"}], [assistant("No.")]),  # 6 wrong_type
            pref([user("Hello"), assistant("Hi")], [assistant("Bye")], [assistant("Ok")]),  # 7 wrong_type
            pref([user("Say yes.")], [assistant("Yes.")], [assistant("")]),  # 8 empty_field
            pref(
                [user("Say no.")], [user("Something else"), assistant("No.")], [assistant("Yes.")]
            ),  # 9 wrong_type
        ],
    )

    # Anthropic HH-RLHF: whole transcripts, implicit prompt
    def hh(*turns: str) -> str:
        return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))

    bread = ("Can you help me bake bread?", "Sure, what kind?", "Sourdough.")
    write_jsonl(
        "hh_rlhf.jsonl",
        [
            {
                "chosen": hh("What is the capital of France?", "Paris."),
                "rejected": hh("What is the capital of France?", "I don't know."),
            },
            {
                "chosen": hh(*bread, "You need a starter, flour, water and salt."),
                "rejected": hh(*bread, "Buy some at the store."),
            },
            {
                "chosen": hh(
                    "How do I tie a tie?", "Cross the wide end over the narrow end, loop it up and through."
                ),
                "rejected": hh("How do I tie a tie?", "Ask someone."),
            },
            {
                "chosen": hh("Recommend a book.", "Dune by Frank Herbert."),
                "rejected": hh("Recommend a book.", "Read something."),
            },
            {
                "chosen": "\n\nHuman: Tell me a secret.\n\nAssistant:",
                "rejected": hh("Tell me a secret.", "No."),
            },  # 5 empty
            {"chosen": hh("Hello?", "Hi there."), "rejected": hh("Hello?", "Hi there.")},  # 6 identical_pair
            {"chosen": "Just some text without markers", "rejected": hh("Hi", "Hello")},  # 7 wrong_type
            {
                "chosen": hh("Plan a trip.", "Where to?", "Rome.", "Great choice."),
                "rejected": hh("Plan a trip.", "No."),
            },  # 8
            {
                "chosen": hh("What's a good name for a cat?", "Whiskers."),
                "rejected": hh("What's a good name for a cat?", "Cat."),
            },
        ],
    )

    # UltraFeedback-binarized (HuggingFaceH4/ultrafeedback_binarized) columns
    def uf(i: int, prompt: str, good: str, bad: str, scores=(8.0, 4.0)) -> dict:
        chosen, rejected = [user(prompt), assistant(good)], [user(prompt), assistant(bad)]
        return {
            "prompt": prompt,
            "prompt_id": f"{i:064x}",
            "chosen": chosen,
            "rejected": rejected,
            "messages": chosen,
            "score_chosen": scores[0],
            "score_rejected": scores[1],
        }

    pd.DataFrame(
        [
            uf(
                1,
                "Explain photosynthesis in one sentence.",
                "Plants turn light, water and CO2 into sugar.",
                "Plant thing.",
            ),
            uf(
                2,
                "Write a haiku about rain.",
                "Soft rain on the roof / the garden drinks slowly / clouds move on",
                "Rain.",
            ),
            uf(3, "What is the speed of light?", "About 300,000 km per second.", "Very fast."),
            uf(4, "Give me a synonym for happy.", "Joyful.", "Sad."),
            uf(
                5, "Is the earth round?", "Yes, roughly.", "Yes, roughly.", (5.0, 5.0)
            ),  # 5 identical_pair (a tie)
            uf(6, "Name an ocean.", "Pacific.", ""),  # 6 empty_field
            uf(7, "List three prime numbers.", "2, 3 and 5.", "1, 2 and 3."),
        ]
    ).to_parquet(HERE / "ultrafeedback.parquet", index=False)

    # SFT conversational
    write_jsonl(
        "sft_messages.jsonl",
        [
            {
                "messages": [
                    user("What is the capital of France?"),
                    assistant("Paris is the capital of France."),
                ]
            },
            {"messages": [system("You are a helpful assistant."), user("Say hello."), assistant("Hello!")]},
            {"messages": [user("Hi"), assistant("Hello!"), user("What's 3 times 3?"), assistant("9.")]},
            {"messages": [system(""), user("Name a planet."), assistant("Mars.")]},  # empty system removed
            {"messages": [user("Anyone there?")]},  # 5 wrong_type: no assistant turn
            {
                "messages": [user("Run it."), {"role": "tool", "content": "ok"}, assistant("Done.")]
            },  # 6 wrong_type
            {"messages": [user("Say something."), assistant(" ")]},  # 7 empty_field
            {
                "messages": [system("You are a helpful assistant."), user("Say hello."), assistant("Hello!")]
            },  # 8 dup
            {"messages": "user: hi"},  # 9 wrong_type
            {"messages": [user("Define entropy."), assistant("A measure of disorder.")]},
            {"messages": [user("Tell me a story."), assistant(LONG)]},  # 11 too_long
        ],
    )

    # SFT prompt/completion as CSV (row 2 spans two physical lines; row 5 holds a JSON message list)
    pd.DataFrame(
        [
            {"prompt": "What is the capital of Italy?", "completion": "Rome."},
            {"prompt": "Write two lines, with a comma.", "completion": "First line, here.\nSecond line."},
            {"prompt": 'Quote this: "hi"', "completion": '"hi"'},
            {"prompt": "Empty completion", "completion": ""},  # line 6 empty_field
            {"prompt": "Messages cell", "completion": json.dumps([assistant("Decoded from JSON.")])},
            {"prompt": "What is 10 / 2?", "completion": "5"},
        ]
    ).to_csv(HERE / "sft_prompt_completion.csv", index=False, lineterminator="\n")

    # KTO unpaired, a pretty-printed JSON list
    kto = [
        {"prompt": "What is the capital of France?", "completion": "Paris.", "label": True},
        {"prompt": "What is the capital of France?", "completion": "Berlin.", "label": False},
        {"prompt": "Add 2 and 3.", "completion": "5", "label": 1},
        {"prompt": "Add 2 and 3.", "completion": "6", "label": 0},
        {"prompt": "Spell cat.", "completion": "C-A-T", "label": "true"},
        {"prompt": "Spell dog.", "completion": "D-O-G-G", "label": "false"},
        {"prompt": "Spell cow.", "completion": "C-O-W", "label": "maybe"},  # 7 wrong_type
        {"prompt": "Spell pig.", "completion": "", "label": True},  # 8 empty_field
        {"prompt": [user("Name a colour.")], "completion": [assistant("Blue.")], "label": True},
    ]
    (HERE / "kto_unpaired.json").write_text(json.dumps(kto, indent=2) + "\n")

    # Broken files
    good = json.dumps(pref("Fine?", "Yes.", "No."))
    (HERE / "broken_json.jsonl").write_text(
        f'{good}\n{json.dumps(pref("Also fine?", "Yes.", "No."))}\n{{"prompt": "x", "chosen": "y", "rejected": }}\n{good}\n'
    )
    write_jsonl(
        "bad_schema.jsonl",
        [
            pref("First?", "Yes.", "No."),
            pref("Second?", "Yes.", "No."),
            {"prompt": "Third?", "chosen_response": "Yes.", "rejected": "No."},
        ],
    )
    (HERE / "bad_utf8.jsonl").write_bytes(
        b'{"prompt": "Good line one?", "chosen": "Yes.", "rejected": "No."}\n'
        b'{"prompt": "Caf\xe9 au lait?", "chosen": "Yes.", "rejected": "No."}\n'  # latin-1 byte
        b'{"prompt": "Lone \\ud800 surrogate?", "chosen": "Yes.", "rejected": "No."}\n'
        b'{"prompt": "Good line four?", "chosen": "Yes.", "rejected": "No."}\n'
    )

    formats_from_public_docs()


def write_json(name: str, records: list) -> None:
    (HERE / name).write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")


def formats_from_public_docs() -> None:
    """One small file per format, shaped as the format's public documentation shows it (cited per file)."""
    weather_tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

    # OpenAI chat fine-tuning JSONL (platform.openai.com/docs/guides/fine-tuning): messages, content as a
    # string or as typed parts, tool calls with `tools` next to the messages.
    write_jsonl("openai_chat.jsonl", [
        {"messages": [system("You are terse."), user("Capital of Italy?"), assistant("Rome.")]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe a cat"},
                                                   {"type": "text", "text": "in three words."}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Small, furry, aloof."}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                                   {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                      assistant("A dog.")]},  # 3: unsupported_content (an image part)
        {"messages": [user("Weather in Paris?"),
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "call_1", "type": "function",
                           "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
                      assistant("18C and sunny.")],
         "tools": [weather_tool], "parallel_tool_calls": False},  # 4: tools (template must support them)
    ])
    # OpenAI preference fine-tuning (DPO) JSONL: input.messages, preferred_output, non_preferred_output
    write_jsonl("openai_preference.jsonl", [
        {"input": {"messages": [user("Hello, can you tell me how cold San Francisco is today?")],
                   "tools": [], "parallel_tool_calls": True},
         "preferred_output": [assistant("Today in San Francisco, it is not quite cold as expected.")],
         "non_preferred_output": [assistant("It is not particularly cold in San Francisco today.")]},
        {"input": {"messages": [system("Answer in French."), user("Say thanks.")]},
         "preferred_output": [assistant("Merci.")], "non_preferred_output": [assistant("Thanks.")]},
    ])
    # ShareGPT as FastChat stores it (a JSON list; id, conversations of {from, value})
    write_json("sharegpt.json", [
        {"id": "identity_0", "conversations": [{"from": "human", "value": "Who are you?"},
                                               {"from": "gpt", "value": "An assistant."},
                                               {"from": "human", "value": "What can you do?"},
                                               {"from": "gpt", "value": "Answer questions."}]},
        {"id": "x1", "system": "Be brief.", "conversations": [{"from": "human", "value": "2+2?"},
                                                              {"from": "gpt", "value": "4"}]},
        # LLaMA-Factory sharegpt with tools: function_call / observation turns, `tools` as a JSON string
        {"conversations": [{"from": "human", "value": "Weather in Oslo?"},
                           {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}"},
                           {"from": "observation", "value": "-3C"},
                           {"from": "gpt", "value": "It is -3C."}],
         "tools": json.dumps([weather_tool["function"]])},
        {"conversations": [{"from": "narrator", "value": "Once upon a time"}, {"from": "gpt", "value": "..."}]},  # 4 wrong_type
    ])
    # LLaMA-Factory ShareGPT preference (data/README.md: conversations + chosen/rejected messages)
    write_json("llamafactory_sharegpt_pref.json", [
        {"conversations": [{"from": "human", "value": "Name a fruit."}],
         "chosen": {"from": "gpt", "value": "Apple."}, "rejected": {"from": "gpt", "value": "Carrot."}},
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Rate my poem."}],
         "chosen": {"from": "gpt", "value": "It has lovely imagery."}, "rejected": {"from": "gpt", "value": "Bad."}},
    ])
    # Alpaca (tatsu-lab/stanford_alpaca; LLaMA-Factory adds system/history), its preference and KTO variants
    write_json("alpaca.json", [
        {"instruction": "Give three tips for staying healthy.", "input": "",
         "output": "Eat well, sleep, exercise."},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour",
         "system": "You translate.", "history": [["Translate to French: yes", "oui"]]},
        {"instruction": "", "input": "orphan input", "output": "x"},  # 3 empty_field
    ])
    write_json("alpaca_preference.json", [
        {"instruction": "Pick the larger number.", "input": "3 or 7", "chosen": "7", "rejected": "3"},
    ])
    write_json("alpaca_kto.json", [
        {"instruction": "Is the sky green?", "input": "", "output": "No, it is usually blue.", "kto_tag": True},
        {"instruction": "Is the sky green?", "input": "", "output": "Yes.", "kto_tag": False},
    ])
    # messages + label (KTO from conversations)
    write_jsonl("kto_messages.jsonl", [
        {"messages": [user("Best pet?"), assistant("It depends on you.")], "label": True},
        {"messages": [user("Best pet?"), assistant("A rock.")], "label": "false"},
        {"messages": [user("Hi"), assistant("Hello"), user("Bye")], "label": True},  # 3 wrong_type: ends with user
    ])
    # lines that are a bare list of messages
    (HERE / "bare_lists.jsonl").write_text(
        json.dumps([user("Ping?"), assistant("Pong.")]) + "\n"
        + json.dumps([system("Count."), user("After 1?"), assistant("2")]) + "\n")
    # HH-RLHF-style transcripts with single newlines, and pairs whose responses are single message dicts
    write_jsonl("hh_single_newline.jsonl", [
        {"chosen": "Human: Is it raining?\nAssistant: I cannot see outside.",
         "rejected": "Human: Is it raining?\nAssistant: Yes."},
        {"chosen": "Human: Hi\nAssistant: Hello!\nHuman: Joke?\nAssistant: Knock knock.",
         "rejected": "Human: Hi\nAssistant: Hello!\nHuman: Joke?\nAssistant: No."},
    ])
    write_jsonl("pref_message_dicts.jsonl", [
        {"prompt": [user("Largest planet?")], "chosen": {"role": "assistant", "content": "Jupiter."},
         "rejected": {"role": "assistant", "content": "Mars."}},
    ])
    # xtuner's conversation format (xtuner docs: dataset_format)
    write_json("xtuner.json", [
        {"conversation": [{"system": "You are a chef.", "input": "Salt or sugar for pasta water?", "output": "Salt."},
                          {"input": "How much?", "output": "A tablespoon per litre."}]},
    ])
    # TRL standard (string) pairs whose strings were already rendered with ChatML by the user
    write_jsonl("pretemplated_chatml.jsonl", [
        {"prompt": "<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
         "chosen": "4<|im_end|>\n", "rejected": "5<|im_end|>\n"},
        {"prompt": "Plain question?", "chosen": "Plain answer.", "rejected": "Other answer."},
    ])
    # Files whose field names differ: mapped with `columns`
    write_jsonl("custom_columns.jsonl", [
        {"question": "Colour of snow?", "good": "White.", "bad": "Green.", "meta": 1},
    ])
    # JSON lines with broken lines, read with skip_invalid_json
    (HERE / "some_invalid_json.jsonl").write_text(
        json.dumps(pref("One?", "Yes.", "No.")) + "\n" + '{"prompt": "Two?", "chosen": \n'
        + json.dumps(pref("Three?", "Yes.", "No.")) + "\n")


if __name__ == "__main__":
    main()
