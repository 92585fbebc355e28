"""Public data formats -> canonical records: schema detection per file, validation, normalisation.

A canonical record is {"messages"} (sft), {"prompt", "chosen", "rejected"} (preference) or
{"prompt", "completion", "label"} (unpaired), each a list of {role, content} turns. `file_schema` decides
a file's schema from its first record (and the source's `kind`), `check_schema` holds every later record
to it (a mismatch is a `DataError`), and `normalise` turns one record into canonical form or raises
`Drop(reason, detail)`, which prepare counts per reason. The formats are listed in prepare.py's docstring.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from components.core.readers import DataError

REASONS = (
    "bad_utf8",
    "wrong_type",
    "empty_field",
    "identical_pair",
    "duplicate",
    "prompt_too_long",
    "too_long",
)


ROLES = ("system", "user", "assistant")


KINDS = ("sft", "preference", "unpaired")


# schema -> (kind, required fields, in the order they are named in messages)
SCHEMAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "preference": ("preference", ("prompt", "chosen", "rejected")),
    "preference_implicit": ("preference", ("chosen", "rejected")),
    "sft_messages": ("sft", ("messages",)),
    "sft_prompt_completion": ("sft", ("prompt", "completion")),
    "unpaired": ("unpaired", ("prompt", "completion", "label")),
}


_SURROGATE = re.compile("[\ud800-\udfff]")


_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")


class Drop(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _guess_schema(record: dict) -> str | None:
    if "chosen" in record or "rejected" in record:
        return "preference" if "prompt" in record else "preference_implicit"
    if "label" in record:
        return "unpaired"
    if "messages" in record:
        return "sft_messages"
    if "completion" in record:
        return "sft_prompt_completion"
    return None


def _missing_field(record: dict, schema: str, loc: str, note: str = "") -> None:
    required = SCHEMAS[schema][1]
    missing = [f for f in required if f not in record]
    if missing:
        raise DataError(
            f"{loc}: field '{missing[0]}': missing (schema '{schema}' expects {'/'.join(required)}){note}"
        )


def file_schema(record: dict, kind: str, loc: str) -> str:
    """The schema of a file, from its first record (and the source's kind)."""
    guess = _guess_schema(record)
    keys = ", ".join(sorted(map(str, record))) or "none"
    if kind == "auto":
        if guess is None:
            raise DataError(
                f"{loc}: record matches no known format (fields: {keys}; expected prompt/chosen/rejected, "
                "chosen/rejected, messages, prompt/completion or prompt/completion/label)"
            )
        schema = guess
    elif guess is not None and SCHEMAS[guess][0] == kind:
        schema = guess
    else:
        schema = {
            "preference": "preference" if "prompt" in record else "preference_implicit",
            "sft": "sft_messages" if "messages" in record else "sft_prompt_completion",
            "unpaired": "unpaired",
        }[kind]
        note = f"; kind is '{kind}'" + (f" but the record looks like '{guess}'" if guess else "")
        _missing_field(record, schema, loc, note)
        raise DataError(
            f"{loc}: kind '{kind}' disagrees with the record, which looks like '{guess}' (fields: {keys})"
        )
    _missing_field(record, schema, loc)
    return schema


def check_schema(record: dict, schema: str, loc: str, first_loc: str) -> None:
    """Every record of a file must have the file's schema."""
    _missing_field(record, schema, loc, f"; schema set by {first_loc}")
    guess = _guess_schema(record)
    if guess != schema:
        extra = next((f for f in SCHEMAS[guess][1] if f not in SCHEMAS[schema][1]), SCHEMAS[guess][1][0])
        raise DataError(
            f"{loc}: field '{extra}': unexpected, record looks like '{guess}' but the file's schema is "
            f"'{schema}' (set by {first_loc}); one file holds one schema"
        )


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _as_messages(value: object, name: str, default_role: str | None) -> list[dict]:
    """A field as a non-empty list of {role, content} turns (a string becomes one default_role turn)."""
    if value is None:
        raise Drop("empty_field", f"field '{name}': null")
    if isinstance(value, str) and default_role is not None:
        messages = [{"role": default_role, "content": value}]
    elif isinstance(value, list):
        messages = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise Drop("wrong_type", f"field '{name}': item {i} is not a {{role, content}} message")
            if m["role"] not in ROLES:
                raise Drop(
                    "wrong_type",
                    f"field '{name}': item {i} has role {m['role']!r} (allowed: {', '.join(ROLES)})",
                )
            content = m.get("content")
            if content is not None and not isinstance(content, str):
                raise Drop(
                    "wrong_type",
                    f"field '{name}': item {i} content is a {type(content).__name__}, not a string",
                )
            messages.append({"role": m["role"], "content": content or ""})
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
        if not m["content"].strip():
            raise Drop("empty_field", f"field '{name}': turn {i} ({m['role']}) is empty")
    return messages


def _parse_hh(text: str, name: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [user a, assistant b] (contents stripped)."""
    parts = _HH_MARKER.split(text.lstrip())  # [before, speaker, content, speaker, content, ...]
    if len(parts) < 3 or parts[0].strip():
        raise Drop("wrong_type", f"field '{name}': not a '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript")
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _is_hh(value: object) -> bool:
    return isinstance(value, str) and value.lstrip(" \n").startswith("Human:")


def _prompt(value: object) -> list[dict]:
    if _is_hh(value):  # "\n\nHuman: q\n\nAssistant:" -> [user q] (the trailing empty cue is dropped)
        turns = _parse_hh(value, "prompt")
        if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns = turns[:-1]
        return _non_empty(turns, "prompt")
    return _as_messages(value, "prompt", "user")


def _ends_with_user(prompt: list[dict]) -> list[dict]:
    if prompt[-1]["role"] != "user":
        raise Drop("wrong_type", f"field 'prompt': last turn is {prompt[-1]['role']}, expected user")
    return prompt


def _same_turn(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"].split() == b["content"].split()


def _response(value: object, prompt: list[dict], name: str, strip: bool = False) -> list[dict]:
    """Assistant turn(s) of a response; leading turns repeating the prompt (UltraFeedback) are removed."""
    if strip and isinstance(value, str):
        value = value.strip()
    turns = _as_messages(value, name, "assistant")
    if len(turns) > len(prompt) and all(_same_turn(t, p) for t, p in zip(turns, prompt, strict=False)):
        turns = turns[len(prompt) :]
    return _assistant_only(turns, name)


def _assistant_only(turns: list[dict], name: str) -> list[dict]:
    other = next((t["role"] for t in turns if t["role"] != "assistant"), None)
    if other:
        raise Drop("wrong_type", f"field '{name}': has a {other} turn that is not part of the prompt")
    return turns


def _conversation(value: object, name: str) -> list[dict]:
    if isinstance(value, str):
        return _non_empty(_parse_hh(value, name), name)
    return _as_messages(value, name, None)


def _label(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if value is None:
        raise Drop("empty_field", "field 'label': null")
    raise Drop("wrong_type", f"field 'label': {value!r} is not a boolean (true/false, 1/0)")


def _pair(chosen: list[dict], rejected: list[dict]) -> None:
    if chosen == rejected:
        raise Drop("identical_pair", "fields 'chosen' and 'rejected' are identical")


def normalise(schema: str, record: dict) -> tuple[str, dict]:
    """(kind, content) of one record in canonical form; raises Drop for a bad record."""
    fields = SCHEMAS[schema][1]
    if any(_SURROGATE.search(s) for f in fields for s in _strings(record[f])):
        raise Drop("bad_utf8", "undecodable bytes or lone surrogates in the text")
    if schema == "preference":
        hh = _is_hh(record["prompt"])
        prompt = _ends_with_user(_prompt(record["prompt"]))
        chosen = _response(record["chosen"], prompt, "chosen", strip=hh)
        rejected = _response(record["rejected"], prompt, "rejected", strip=hh)
        _pair(chosen, rejected)
        return "preference", {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if schema == "preference_implicit":
        chosen = _conversation(record["chosen"], "chosen")
        rejected = _conversation(record["rejected"], "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and _same_turn(chosen[shared], rejected[shared]):
            shared += 1
        while shared and chosen[shared - 1]["role"] != "user":
            shared -= 1
        if not shared:
            raise Drop("wrong_type", "fields 'chosen'/'rejected': share no prompt ending with a user turn")
        prompt = chosen[:shared]
        responses = []
        for name, turns in (("chosen", chosen[shared:]), ("rejected", rejected[shared:])):
            if not turns:
                raise Drop("wrong_type", f"field '{name}': no assistant turn after the prompt")
            if any(t["role"] != "assistant" for t in turns):
                raise Drop(
                    "wrong_type",
                    f"field '{name}': goes on with a user turn after the shared prompt "
                    "(chosen and rejected diverge before their final assistant turn)",
                )
            responses.append(turns)
        _pair(*responses)
        return "preference", {"prompt": prompt, "chosen": responses[0], "rejected": responses[1]}
    if schema == "sft_messages":
        messages = _as_messages(record["messages"], "messages", None)
        if not any(m["role"] == "assistant" for m in messages):
            raise Drop("wrong_type", "field 'messages': no assistant turn")
        return "sft", {"messages": messages}
    if schema == "sft_prompt_completion":
        prompt = _prompt(record["prompt"])
        return "sft", {"messages": prompt + _response(record["completion"], prompt, "completion")}
    prompt = _ends_with_user(_prompt(record["prompt"]))
    completion = _response(record["completion"], prompt, "completion")
    return "unpaired", {"prompt": prompt, "completion": completion, "label": _label(record["label"])}


def conversations(kind: str, content: dict) -> list[list[dict]]:
    if kind == "sft":
        return [content["messages"]]
    if kind == "preference":
        return [content["prompt"] + content["chosen"], content["prompt"] + content["rejected"]]
    return [content["prompt"] + content["completion"]]
