"""Public data formats -> canonical records: format detection per file, validation, normalisation.

A canonical record is {"messages"} (sft), {"prompt", "chosen", "rejected"} (preference) or
{"prompt", "completion", "label"} (unpaired), each a list of turns {role, content} (role system, user,
assistant or tool; an assistant turn may carry `tool_calls`), plus "tools" (JSON schemas) when the record
has any. `file_format` decides a file's format from its first record (and the source's `kind`),
`check_format` holds every later record to it (a mismatch is a `DataError`), and `normalise` turns one
record into canonical form or raises `Drop(reason, detail)`, which prepare counts per reason. FORMATS
lists them all; prepare.py's docstring and the README's table give an example of each.

Why this file is long: it is one table of formats and one small normaliser per format, over shared turn
helpers (roles, typed parts, tool calls, HH transcripts). Split in two, each format's rules would live in
two files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from components.core.data.readers import DataError

REASONS = (
    "bad_utf8",
    "invalid_json",
    "wrong_type",
    "empty_field",
    "unsupported_content",
    "tools_unsupported",
    "pretemplated",
    "identical_pair",
    "duplicate",
    "prompt_too_long",
    "too_long",
    "prompt_mismatch",
)
ROLES = ("system", "user", "assistant", "tool")
# Other names the public formats use for a role (ShareGPT, LLaMA-Factory, OpenAI legacy, Gemini, HH).
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant",
                "observation": "tool", "function": "tool", "ipython": "tool", "developer": "system"}
KINDS = ("sft", "preference", "unpaired")
LABEL_FIELDS = ("label", "kto_tag", "tag")  # TRL, LLaMA-Factory, and the shorthand some datasets use

# format -> (kind, required fields, where it comes from). Detection takes the first format whose fields
# the record has, so the more specific formats come first. "label" stands for any of LABEL_FIELDS.
FORMATS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "openai_preference": ("preference", ("input", "preferred_output", "non_preferred_output"),
                          "OpenAI preference fine-tuning"),
    "sharegpt_preference": ("preference", ("conversations", "chosen", "rejected"), "LLaMA-Factory ShareGPT"),
    "alpaca_preference": ("preference", ("instruction", "chosen", "rejected"), "LLaMA-Factory Alpaca"),
    "preference": ("preference", ("prompt", "chosen", "rejected"), "TRL standard / conversational"),
    "preference_implicit": ("preference", ("chosen", "rejected"), "TRL implicit prompt, HH-RLHF"),
    "sharegpt_unpaired": ("unpaired", ("conversations", "label"), "LLaMA-Factory ShareGPT KTO"),
    "alpaca_unpaired": ("unpaired", ("instruction", "output", "label"), "LLaMA-Factory Alpaca KTO"),
    "unpaired": ("unpaired", ("prompt", "completion", "label"), "TRL unpaired (KTO)"),
    "messages_unpaired": ("unpaired", ("messages", "label"), "messages + label (KTO)"),
    "sharegpt": ("sft", ("conversations",), "ShareGPT (FastChat, LLaMA-Factory)"),
    "xtuner": ("sft", ("conversation",), "xtuner"),
    "alpaca": ("sft", ("instruction", "output"), "Alpaca"),
    "sft_messages": ("sft", ("messages",), "TRL / OpenAI fine-tuning messages"),
    "sft_prompt_completion": ("sft", ("prompt", "completion"), "TRL prompt-completion"),
}

# every field name some format uses: a record's field that is one of them is not a typo of another
FIELD_NAMES = frozenset(f for _, fields, _ in FORMATS.values() for f in fields) | set(LABEL_FIELDS)

_SURROGATE = re.compile("[\ud800-\udfff]")
# HH-RLHF transcripts: "\n\nHuman: ...\n\nAssistant: ..." and the single-newline variant some copies use
_HH_MARKER = re.compile(r"(?:^|\n)(Human|Assistant):")


class Drop(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- detection


def _has(record: dict, field: str) -> bool:
    return any(f in record for f in LABEL_FIELDS) if field == "label" else field in record


def _guess_format(record: dict, kind: str = "auto") -> str | None:
    for name, (format_kind, fields, _) in FORMATS.items():
        if (kind == "auto" or format_kind == kind) and all(_has(record, f) for f in fields):
            return name
    return None


def _expected(kind: str) -> str:
    return "; ".join(f"{'/'.join(fields)} ({origin})" for k, fields, origin in FORMATS.values()
                     if kind in ("auto", k))


def near_miss(record: dict, kind: str = "auto") -> tuple[str, dict[str, str]] | None:
    """(format, {expected field: the record's field that looks like a typo of it}) for the first format whose
    fields the record has, but for near-misses (`choosen` for `chosen`, `Prompt` for `prompt`); None if none."""
    import difflib

    keys = [str(k) for k in record]
    for name, (format_kind, fields, _) in FORMATS.items():
        if kind not in ("auto", format_kind):
            continue
        typos = {}
        for field in (f for f in fields if not _has(record, f)):
            wanted = LABEL_FIELDS if field == "label" else (field,)
            close = [c for w in wanted for c in difflib.get_close_matches(w, keys, n=1, cutoff=0.75)
                     if c.lower() not in FIELD_NAMES or c.lower() == w]
            if not close:
                break
            typos[field] = close[0]
        else:
            if typos:
                return name, typos
    return None


def file_format(record: dict, kind: str, loc: str) -> str:
    """The format of a file, from its first record (and the source's kind)."""
    keys = ", ".join(sorted(map(str, record))) or "none"
    name = _guess_format(record, kind)
    if name is not None:
        return name
    if (near := near_miss(record, kind)) is not None:
        fmt, typos = near
        field, found = next(iter(typos.items()))
        raise DataError(f"{loc}: field '{found}': did you mean '{field}'? (fields: {keys}; format '{fmt}', "
                        f"{FORMATS[fmt][2]}, expects {'/'.join(FORMATS[fmt][1])}; rename it in the file or map it "
                        f"in params: data.sources[].columns: {{{field}: {found}}})")
    if kind == "auto":
        raise DataError(f"{loc}: record matches no known format (fields: {keys}); expected one of: {_expected(kind)}")
    other = _guess_format(record)
    looks = f"; it looks like '{other}' ({FORMATS[other][0]} data)" if other else ""
    raise DataError(f"{loc}: kind '{kind}': record matches no {kind} format (fields: {keys}){looks}; "
                    f"the {kind} formats are: {_expected(kind)}")


def check_format(record: dict, name: str, loc: str, first_loc: str) -> None:
    """Every record of a file must have the file's format (set by its first record)."""
    fields = FORMATS[name][1]
    missing = [f for f in fields if not _has(record, f)]
    if missing:
        raise DataError(f"{loc}: field '{missing[0]}': missing (format '{name}' expects {'/'.join(fields)}; "
                        f"format set by {first_loc})")
    guess = _guess_format(record)
    if guess != name and guess is not None and FORMATS[guess][1] != fields:
        extra = next((f for f in FORMATS[guess][1] if f not in fields), FORMATS[guess][1][0])
        raise DataError(f"{loc}: field '{extra}': unexpected, record looks like '{guess}' but the file's format "
                        f"is '{name}' (set by {first_loc}); one file holds one format")


def apply_columns(record: dict, columns: dict[str, str]) -> dict:
    """Rename a file's fields to the canonical ones (`columns: {canonical: field in the file}`)."""
    if not columns:
        return record
    out = {k: v for k, v in record.items() if k not in columns.values()}
    for canonical, field in columns.items():
        if field in record:
            out[canonical] = record[field]
    return out


# ----------------------------------------------------------------------------- turns


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _text(content: object, name: str, i: int) -> str:
    """A turn's content as text: a string, or typed parts whose text parts are joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                what = f"a {kind!r} part" if kind else f"a part of type {type(part).__name__}"
                raise Drop("unsupported_content", f"field '{name}': item {i} content has {what}; only text is trained on")
        return "\n".join(texts)
    raise Drop("wrong_type", f"field '{name}': item {i} content is a {type(content).__name__}, not a string")


def _tool_calls(value: object, name: str, i: int) -> list[dict]:
    """OpenAI-style tool calls, arguments decoded from JSON strings (chat templates serialise them)."""
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise Drop("wrong_type", f"field '{name}': item {i} tool_calls is not a list of objects")
    calls = []
    for call in value:
        fn = call.get("function", call)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise Drop("wrong_type", f"field '{name}': item {i} has a tool call without a function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass  # keep the string: some templates print it as is
        calls.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return calls


def _turn(m: object, name: str, i: int) -> dict:
    """One message of any of the formats: {role, content}, ShareGPT {from, value}, OpenAI tool calls."""
    if not isinstance(m, dict):
        raise Drop("wrong_type", f"field '{name}': item {i} is not a {{role, content}} message")
    role, content = (m.get("role"), m.get("content")) if "role" in m else (m.get("from"), m.get("value"))
    if not isinstance(role, str):
        raise Drop("wrong_type", f"field '{name}': item {i} is not a {{role, content}} message")
    role_key = role.lower()
    if role_key == "function_call":  # ShareGPT: the value is the call as JSON
        try:
            call = json.loads(content) if isinstance(content, str) else content
        except json.JSONDecodeError:
            raise Drop("wrong_type", f"field '{name}': item {i} function_call value is not JSON") from None
        calls = call if isinstance(call, list) else [call]
        return {"role": "assistant", "content": "", "tool_calls": _tool_calls(calls, name, i)}
    role_key = ROLE_ALIASES.get(role_key, role_key)
    if role_key not in ROLES:
        raise Drop("wrong_type", f"field '{name}': item {i} has role {role!r} (allowed: {', '.join(ROLES)} "
                                 f"and {', '.join(sorted(ROLE_ALIASES))})")
    turn = {"role": role_key, "content": _text(content, name, i)}
    if m.get("tool_calls"):
        turn["tool_calls"] = _tool_calls(m["tool_calls"], name, i)
    if role_key == "tool":
        for key in ("name", "tool_call_id"):
            if isinstance(m.get(key), str):
                turn[key] = m[key]
    return turn


def _as_messages(value: object, name: str, default_role: str | None) -> list[dict]:
    """A field as a non-empty list of turns (a string becomes one default_role turn, a dict one turn)."""
    if value is None:
        raise Drop("empty_field", f"field '{name}': null")
    if isinstance(value, str) and default_role is not None:
        messages = [{"role": default_role, "content": value}]
    elif isinstance(value, dict) and ("role" in value or "from" in value):  # a single message
        messages = [_turn(value, name, 0)]
    elif isinstance(value, list):
        messages = [_turn(m, name, i) for i, m in enumerate(value)]
    else:
        expected = "a string or a list of messages" if default_role else "a list of messages"
        raise Drop("wrong_type", f"field '{name}': expected {expected}, got {type(value).__name__}")
    return _non_empty(messages, name)


def _non_empty(messages: list[dict], name: str) -> list[dict]:
    # An empty system turn carries nothing; drop the turn rather than the record.
    messages = [m for m in messages if m["role"] != "system" or m["content"].strip()]
    if not messages:
        raise Drop("empty_field", f"field '{name}': no turns")
    for i, m in enumerate(messages):
        if not m["content"].strip() and not m.get("tool_calls"):
            raise Drop("empty_field", f"field '{name}': turn {i} ({m['role']}) is empty")
    return messages


def _parse_hh(text: str, name: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' (or single newlines) -> [user a, assistant b], contents stripped."""
    parts = _HH_MARKER.split(text.lstrip())  # [before, speaker, content, speaker, content, ...]
    if len(parts) < 3 or parts[0].strip():
        raise Drop("wrong_type", f"field '{name}': not a '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript")
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _is_hh(value: object) -> bool:
    return isinstance(value, str) and value.lstrip(" \n").startswith("Human:")


def _prompt(value: object, name: str = "prompt") -> list[dict]:
    if _is_hh(value):  # "\n\nHuman: q\n\nAssistant:" -> [user q] (the trailing empty cue is dropped)
        turns = _parse_hh(value, name)
        if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns = turns[:-1]
        return _non_empty(turns, name)
    return _as_messages(value, name, "user")


def _ends_with_user(prompt: list[dict], name: str = "prompt") -> list[dict]:
    if prompt[-1]["role"] not in ("user", "tool"):
        raise Drop("wrong_type", f"field '{name}': last turn is {prompt[-1]['role']}, expected user")
    return prompt


def _same_turn(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"].split() == b["content"].split() and \
        a.get("tool_calls") == b.get("tool_calls")


def _response(value: object, prompt: list[dict], name: str, strip: bool = False) -> list[dict]:
    """Assistant turn(s) of a response; leading turns repeating the prompt (UltraFeedback) are removed."""
    if strip and isinstance(value, str):
        value = value.strip()
    turns = _as_messages(value, name, "assistant")
    if len(turns) > len(prompt) and all(_same_turn(t, p) for t, p in zip(turns, prompt, strict=False)):
        turns = turns[len(prompt) :]
    return _assistant_only(turns, name)


def _assistant_only(turns: list[dict], name: str) -> list[dict]:
    # tool results may sit between an assistant's tool call and its final answer
    other = next((t["role"] for t in turns if t["role"] not in ("assistant", "tool")), None)
    if other:
        raise Drop("wrong_type", f"field '{name}': has a {other} turn that is not part of the prompt")
    if turns[-1]["role"] != "assistant":
        raise Drop("wrong_type", f"field '{name}': does not end with an assistant turn")
    return turns


def _conversation(value: object, name: str) -> list[dict]:
    if isinstance(value, str):
        return _non_empty(_parse_hh(value, name), name)
    return _as_messages(value, name, None)


def _label(record: dict) -> bool:
    field = next(f for f in LABEL_FIELDS if f in record)
    value = record[field]
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if value is None:
        raise Drop("empty_field", f"field '{field}': null")
    raise Drop("wrong_type", f"field '{field}': {value!r} is not a boolean (true/false, 1/0)")


def _pair(chosen: list[dict], rejected: list[dict]) -> None:
    if chosen == rejected:
        raise Drop("identical_pair", "fields 'chosen' and 'rejected' are identical")


def _tools(record: dict, container: dict | None = None) -> list[dict]:
    """The record's tool definitions (a list, or LLaMA-Factory's JSON string); [] when there are none."""
    value = (container if container is not None else record).get("tools")
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Drop("wrong_type", "field 'tools': a string that is not JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise Drop("wrong_type", "field 'tools': expected a list of tool definitions")
    return value


def _with_system(record: dict, turns: list[dict]) -> list[dict]:
    """A top-level `system` field (ShareGPT, Alpaca) becomes the first turn."""
    system = record.get("system")
    if isinstance(system, str) and system.strip() and not (turns and turns[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *turns]
    return turns


def _split_last_answer(messages: list[dict], name: str) -> tuple[list[dict], list[dict]]:
    """(prompt, trailing assistant turns) of a conversation."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    if end == len(messages):
        raise Drop("wrong_type", f"field '{name}': does not end with an assistant turn")
    if not end:
        raise Drop("wrong_type", f"field '{name}': no user turn before the assistant's answer")
    return _ends_with_user(messages[:end], name), messages[end:]


def _alpaca_prompt(record: dict) -> list[dict]:
    """Alpaca: history [[q, a], ...] turns, then instruction + "\\n" + input as the user turn."""
    instruction, extra = record.get("instruction"), record.get("input")
    for field, value in (("instruction", instruction), ("input", extra)):
        if value is not None and not isinstance(value, str):
            raise Drop("wrong_type", f"field '{field}': expected a string, got {type(value).__name__}")
    if not (instruction or "").strip():
        raise Drop("empty_field", "field 'instruction': empty")
    turns = []
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise Drop("wrong_type", "field 'history': expected a list of [instruction, response] pairs")
    for q, a in history:
        turns += [{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}]
    query = instruction if not (extra or "").strip() else f"{instruction}\n{extra}"
    return _non_empty(_with_system(record, [*turns, {"role": "user", "content": query}]), "instruction")


def _xtuner(record: dict) -> list[dict]:
    conversation = record["conversation"]
    if not isinstance(conversation, list) or not conversation:
        raise Drop("wrong_type", "field 'conversation': expected a non-empty list of {input, output} turns")
    turns = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not isinstance(turn.get("input"), str) or not isinstance(turn.get("output"), str):
            raise Drop("wrong_type", f"field 'conversation': item {i} is not an {{input, output}} turn")
        if i == 0 and isinstance(turn.get("system"), str) and turn["system"].strip():
            turns.append({"role": "system", "content": turn["system"]})
        turns += [{"role": "user", "content": turn["input"]}, {"role": "assistant", "content": turn["output"]}]
    return _non_empty(turns, "conversation")


def _implicit_pair(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) of two whole conversations: the prompt is their shared opening."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and _same_turn(chosen[shared], rejected[shared]):
        shared += 1
    while shared and chosen[shared - 1]["role"] != "user":
        shared -= 1
    if not shared:
        raise Drop("wrong_type", "fields 'chosen'/'rejected': share no prompt ending with a user turn")
    responses = []
    for name, turns in (("chosen", chosen[shared:]), ("rejected", rejected[shared:])):
        if not turns:
            raise Drop("wrong_type", f"field '{name}': no assistant turn after the prompt")
        if any(t["role"] != "assistant" for t in turns):
            raise Drop("wrong_type", f"field '{name}': goes on with a user turn after the shared prompt "
                                     "(chosen and rejected diverge before their final assistant turn)")
        responses.append(turns)
    return chosen[:shared], responses[0], responses[1]


# ----------------------------------------------------------------------------- normalise


def normalise(name: str, record: dict) -> tuple[str, dict]:
    """(kind, content) of one record of format `name` in canonical form; raises Drop for a bad record."""
    fields = [f for f in FORMATS[name][1] if f != "label"]
    if any(_SURROGATE.search(s) for f in fields for s in _strings(record[f])):
        raise Drop("bad_utf8", "undecodable bytes or lone surrogates in the text")
    kind, content = _normalise(name, record)
    tools = _tools(record["input"]) if name == "openai_preference" and isinstance(record["input"], dict) else _tools(record)
    if tools:
        content["tools"] = tools
    margin = record.get("margin")  # TRL's reward-data column: how much better chosen is (reward_model reads it)
    if kind == "preference" and isinstance(margin, int | float) and not isinstance(margin, bool):
        content["margin"] = float(margin)
    return kind, content


def _normalise(name: str, record: dict) -> tuple[str, dict]:
    if name == "preference":
        hh = _is_hh(record["prompt"])
        prompt = _ends_with_user(_prompt(record["prompt"]))
        chosen = _response(record["chosen"], prompt, "chosen", strip=hh)
        rejected = _response(record["rejected"], prompt, "rejected", strip=hh)
        _pair(chosen, rejected)
        return "preference", {"prompt": _with_system(record, prompt), "chosen": chosen, "rejected": rejected}
    if name == "preference_implicit":
        prompt, chosen, rejected = _implicit_pair(_conversation(record["chosen"], "chosen"),
                                                  _conversation(record["rejected"], "rejected"))
        _pair(chosen, rejected)
        return "preference", {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if name == "openai_preference":
        source = record["input"]
        if not isinstance(source, dict) or "messages" not in source:
            raise Drop("wrong_type", "field 'input': expected an object with 'messages'")
        prompt = _ends_with_user(_as_messages(source["messages"], "input.messages", None), "input.messages")
        chosen = _response(record["preferred_output"], prompt, "preferred_output")
        rejected = _response(record["non_preferred_output"], prompt, "non_preferred_output")
        _pair(chosen, rejected)
        return "preference", {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if name == "sharegpt_preference":
        prompt = _ends_with_user(_with_system(record, _as_messages(record["conversations"], "conversations", None)),
                                 "conversations")
        chosen = _response(record["chosen"], prompt, "chosen")
        rejected = _response(record["rejected"], prompt, "rejected")
        _pair(chosen, rejected)
        return "preference", {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if name == "alpaca_preference":
        prompt = _alpaca_prompt(record)
        chosen = _response(record["chosen"], prompt, "chosen")
        rejected = _response(record["rejected"], prompt, "rejected")
        _pair(chosen, rejected)
        return "preference", {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if name == "unpaired":
        prompt = _ends_with_user(_prompt(record["prompt"]))
        completion = _response(record["completion"], prompt, "completion")
        return "unpaired", {"prompt": _with_system(record, prompt), "completion": completion, "label": _label(record)}
    if name in ("messages_unpaired", "sharegpt_unpaired"):
        field = "messages" if name == "messages_unpaired" else "conversations"
        messages = _with_system(record, _as_messages(record[field], field, None))
        prompt, completion = _split_last_answer(messages, field)
        return "unpaired", {"prompt": prompt, "completion": completion, "label": _label(record)}
    if name == "alpaca_unpaired":
        prompt = _alpaca_prompt(record)
        completion = _response(record["output"], prompt, "output")
        return "unpaired", {"prompt": prompt, "completion": completion, "label": _label(record)}
    if name == "alpaca":
        prompt = _alpaca_prompt(record)
        return "sft", {"messages": prompt + _response(record["output"], prompt, "output")}
    if name == "xtuner":
        return "sft", {"messages": _xtuner(record)}
    if name == "sft_prompt_completion":
        prompt = _prompt(record["prompt"])
        return "sft", {"messages": _with_system(record, prompt) + _response(record["completion"], prompt, "completion")}
    field = "messages" if name == "sft_messages" else "conversations"  # sft_messages, sharegpt
    messages = _with_system(record, _as_messages(record[field], field, None))
    if not any(m["role"] == "assistant" for m in messages):
        raise Drop("wrong_type", f"field '{field}': no assistant turn")
    return "sft", {"messages": messages}


def validate(kind: str, content: dict) -> None:
    """Re-check the shape of a canonical record whose turns were rewritten (e.g. parsed from template text)."""
    if kind == "sft":
        if not any(m["role"] == "assistant" for m in _non_empty(content["messages"], "messages")):
            raise Drop("wrong_type", "field 'messages': no assistant turn")
        return
    _ends_with_user(_non_empty(content["prompt"], "prompt"))
    for key in ("chosen", "rejected") if kind == "preference" else ("completion",):
        _assistant_only(_non_empty(content[key], key), key)


def conversations(kind: str, content: dict) -> list[list[dict]]:
    if kind == "sft":
        return [content["messages"]]
    if kind == "preference":
        return [content["prompt"] + content["chosen"], content["prompt"] + content["rejected"]]
    return [content["prompt"] + content["completion"]]


def uses_tools(content: dict) -> bool:
    """Whether a canonical record needs a chat template that renders tools."""
    return bool(content.get("tools")) or any(
        m["role"] == "tool" or m.get("tool_calls")
        for key, turns in content.items() if key != "tools" and isinstance(turns, list) for m in turns)
