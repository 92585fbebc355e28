"""Token ids from canonical records: chat templating, label masks, truncation, batches and padding.

prepare encodes each record once with these (`encode_chat`) and stores the ids (`core/data/token_store.py`); the
training and scoring stages read those ids, so every stage sees the same tokens for the same record.
Log-probs of those tokens are `core/model/logprobs.py`.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from components.core.data.chat_template import CHATML_TEMPLATE

IGNORE_INDEX = -100


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False,
           tools: list[dict] | None = None) -> str:
    template = tokenizer.chat_template or CHATML_TEMPLATE
    extra = {"tools": tools} if tools else {}  # only when there are some: a template may test `tools is defined`
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )


def template_supports_tools(tokenizer) -> bool:
    """Whether the chat template renders tool definitions, tool calls and tool results (Qwen2.5, Llama 3.1,
    Mistral, ... do; ChatML and the embedded template do not)."""
    template = tokenizer.chat_template or CHATML_TEMPLATE
    return isinstance(template, str) and "tool_calls" in template and "tools" in template


def chat_markers(tokenizer) -> dict | None:
    """The text a chat template puts around each turn, learned by rendering a probe conversation.

    Returns {"prefix": {role: text before its content}, "suffix": text after a turn's content,
    "special": the tokenizer's special tokens that the rendering uses}, or None when the template does not
    render turns with a common suffix (then pre-templated text cannot be parsed back).
    """
    s, u, a = "\x01S\x01", "\x01U\x01", "\x01A\x01"
    try:
        full = render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u},
                                  {"role": "assistant", "content": a}])
    except Exception:  # a template that rejects system turns, or the probe: no markers
        return None
    if not all(x in full for x in (s, u, a)):
        return None
    suffix = full.split(a, 1)[1].rstrip("\n") or None
    between_su, between_ua = full.split(s, 1)[1].split(u, 1)[0], full.split(u, 1)[1].split(a, 1)[0]
    if not suffix or not between_su.startswith(suffix) or not between_ua.startswith(suffix):
        return None
    user_prefix, assistant_prefix = between_su[len(suffix):].lstrip("\n"), between_ua[len(suffix):].lstrip("\n")
    if "user" not in user_prefix:
        return None
    prefix = {"user": user_prefix, "assistant": assistant_prefix,
              "system": user_prefix.replace("user", "system"), "tool": user_prefix.replace("user", "tool")}
    special = [tok for tok in getattr(tokenizer, "all_special_tokens", []) + list(getattr(
        tokenizer, "added_tokens_encoder", {})) if len(tok) > 1 and tok in full]
    return {"prefix": prefix, "suffix": suffix, "special": sorted(set(special))}


def holds_template(text: str, markers: dict | None) -> bool:
    return bool(markers) and any(tok in text for tok in markers["special"])


def parse_rendered(text: str, markers: dict, default_role: str) -> list[dict]:
    """Turns of text that a chat template already rendered (the inverse of `render`, for that template).

    Text that starts without a role prefix is one `default_role` turn (e.g. a response "Paris.<|im_end|>").
    A trailing generation prompt (an assistant prefix with nothing after it) is dropped. Raises ValueError
    when special tokens are left over that are not turn markers.
    """
    prefixes = markers["prefix"]
    pattern = re.compile("|".join(re.escape(p) for p in sorted(set(prefixes.values()), key=len, reverse=True)))
    role_of = {p: r for r, p in prefixes.items()}
    turns, pos = [], 0
    first = pattern.search(text)
    head = text[: first.start()] if first else text
    bare = head
    for tok in markers["special"]:  # BOS-like tokens before the first turn carry no content
        bare = bare.replace(tok, "")
    if bare.strip():
        content = head.split(markers["suffix"], 1)[0]
        turns.append({"role": default_role, "content": content.strip()})
    pos = first.start() if first else len(text)
    while pos < len(text):
        m = pattern.match(text, pos)
        if not m:
            break
        end = text.find(markers["suffix"], m.end())
        body = text[m.end(): end if end >= 0 else len(text)]
        turns.append({"role": role_of[m.group(0)], "content": body.strip()})
        pos = end + len(markers["suffix"]) if end >= 0 else len(text)
        nxt = pattern.search(text, pos)
        pos = nxt.start() if nxt else len(text)
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()  # "<|im_start|>assistant\n" at the end of a prompt: the generation prompt
    leftover = [tok for tok in markers["special"] if any(tok in t["content"] for t in turns)]
    if leftover or not turns:
        raise ValueError(f"cannot parse the rendered chat template (left over: {', '.join(leftover) or 'no turns'})")
    return turns


def encode_chat(tokenizer, messages: Sequence[dict], tools: list[dict] | None = None,
                cache: dict | None = None, train_from: int = 0) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether it is a trained assistant token: the assistant turns
    from message `train_from` on (a pair's prompt may hold assistant turns, e.g. HH-RLHF's: those are prompt).

    Each assistant turn's text is the difference between the template rendered up to and including
    that turn and the template rendered up to it with a generation prompt. Segments are tokenised
    separately so the prompt/response boundary is always a token boundary. `cache`: a dict the caller keeps
    across the conversations of one record (prompt + chosen, prompt + rejected): their prompt is encoded once."""
    cache = {} if cache is None else cache
    full = render(tokenizer, messages, tools=tools)
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        key = ("prefix", repr(messages[:i]))
        if key not in cache:
            cache[key] = len(render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools))
        start = cache[key]
        # the last turn rendered is `full` itself: don't render it twice more
        upto = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1], tools=tools)
        end = len(upto)
        if not full.startswith(upto) or start > end or start < cursor:
            raise ValueError("chat template is not prefix-stable; cannot locate assistant turns for label masking")
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    segments.append((full[cursor:], False))
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in segments:
        if not text:
            continue
        if ("text", text) not in cache:
            cache[("text", text)] = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += (piece := cache[("text", text)])
        mask += [trained] * len(piece)
    return ids, mask


def encode_prompt_response(tokenizer, prompt: Sequence[dict], response: Sequence[dict],
                           tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) for a prompt (which may hold assistant turns) and its response turn(s)."""
    return split_response(*encode_chat(tokenizer, list(prompt) + list(response), tools, train_from=len(prompt)))


def split_response(ids: list[int], mask: list[bool]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of encode_chat's output: from the first to the last trained token (template
    tokens after the last assistant turn, e.g. "\n", are not part of the response)."""
    first, last = (mask.index(True), len(mask) - mask[::-1].index(True)) if True in mask else (len(ids), len(ids))
    return ids[:first], ids[first:last]


def prompt_ids_for_generation(tokenizer, prompt: Sequence[dict], tools: list[dict] | None = None) -> list[int]:
    text = render(tokenizer, prompt, add_generation_prompt=True, tools=tools)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- batching


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index batches of similar length, in a seeded random order.

    Shuffle, cut into chunks of 50 batches, sort each chunk by length, cut into batches, then shuffle
    the batches: padding drops to a few percent while the order stays random (the usual "megabatch"
    trick). Deterministic in (seed, epoch) so a resumed run sees the same batches.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_right(seqs: Sequence[Sequence[int]], value: int, length: int | None = None) -> torch.Tensor:
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


@dataclass
class TokenBatch:
    """Right-padded causal-LM batch. labels hold IGNORE_INDEX where no loss is taken."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), or (B, 1, T, T) bool for packed rows (core/data/packing.py)
    labels: torch.Tensor  # (B, T)
    position_ids: torch.Tensor | None = None  # packed rows: restarting at each example
    packed_tokens: int | None = None  # packed rows: their real tokens (the 4D mask does not count them)

    def to(self, device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                          None if self.position_ids is None else self.position_ids.to(device), self.packed_tokens)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return self.packed_tokens if self.packed_tokens is not None else int(self.attention_mask.sum())


def collate_sequences(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> TokenBatch:
    """seqs: (input_ids, labels) pairs, labels already IGNORE_INDEX-masked."""
    ids = pad_right([s[0] for s in seqs], pad_id)
    labels = pad_right([s[1] for s in seqs], IGNORE_INDEX, ids.shape[1])
    mask = pad_right([[1] * len(s[0]) for s in seqs], 0, ids.shape[1])
    return TokenBatch(ids, mask, labels)


def prompt_response_to_sequence(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    return list(prompt_ids) + list(response_ids), [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)


def collate_pairs(pairs: Sequence[dict], pad_id: int) -> TokenBatch:
    """Chosen and rejected of B pairs stacked into one (2B, T) batch: rows [0, B) chosen, [B, 2B) rejected.

    One forward pass for both halves (as in the DPO reference implementation's `concatenated_inputs`).
    Each pair dict holds `prompt_ids`, `chosen_ids`, `rejected_ids`.
    """
    seqs = [prompt_response_to_sequence(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
    seqs += [prompt_response_to_sequence(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    return collate_sequences(seqs, pad_id)


def tokenize_pair(tokenizer, record: dict, max_length: int, max_prompt_length: int) -> dict:
    """Token ids of one canonical preference record, truncated as TRL does (`truncate_pair`: the prompt keeps its
    last `max_prompt_length` tokens, the end of a prompt mattering most; each response is cut so prompt + response
    <= max_length). prepare drops over-long records, so it only bites when max_length is lowered after prepare."""
    tools = record.get("tools")
    prompt_ids, chosen_ids = encode_prompt_response(tokenizer, record["prompt"], record["chosen"], tools)
    rejected_prompt_ids, rejected_ids = encode_prompt_response(tokenizer, record["prompt"], record["rejected"], tools)
    if rejected_prompt_ids != prompt_ids:  # one prompt is scored for both responses (shared-prompt rows)
        raise ValueError(f"record {record['id']}: the chat template renders the prompt into other tokens before the "
                         "rejected response than before the chosen one; chosen and rejected must share the prompt")
    return truncate_pair({"id": record["id"], "prompt_ids": prompt_ids, "chosen_ids": chosen_ids,
                          "rejected_ids": rejected_ids}, max_length, max_prompt_length)


def truncate_pair(pair: dict, max_length: int, max_prompt_length: int) -> dict:
    """The prompt's last `max_prompt_length` tokens, each response cut so prompt + response <= max_length."""
    prompt_ids = list(pair["prompt_ids"])[-max_prompt_length:]
    room = max(1, max_length - len(prompt_ids))
    return {"id": pair["id"], "prompt_ids": prompt_ids, "chosen_ids": list(pair["chosen_ids"])[:room],
            "rejected_ids": list(pair["rejected_ids"])[:room]}


def pair_token_hash(pair: dict) -> str:
    """Identity of the exact tokens a pair is scored on (prompt, chosen, rejected): what a cached reference
    log-prob belongs to. Changes with the tokenizer, the chat template, max_length or max_prompt_length."""
    blob = ",".join(map(str, pair["prompt_ids"])) + "|" + ",".join(map(str, pair["chosen_ids"])) + "|" + \
        ",".join(map(str, pair["rejected_ids"]))
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def pair_length(pair: dict) -> int:
    return len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))


@dataclass
class SharedPromptBatch:
    """B pairs as B rows `[left pad | prompt | chosen | rejected | right pad]`: the prompt is computed once.

    position_ids restart the rejected response at the prompt's end, and the 4D mask keeps rejected tokens
    from seeing chosen ones, so each response is conditioned on exactly its prompt, as in two separate rows.
    Prompts are left-padded to a common end `start`, so every response token lies in the last
    `keep = T - start + 1` positions: the LM head runs on those only.
    """

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, 1, T, T) bool, True = may attend
    targets: torch.Tensor  # (B, K) response token ids by slot (slot = position - start), IGNORE_INDEX elsewhere
    source: torch.Tensor  # (B, K) index into the kept logits of the position that predicts each slot
    segment: torch.Tensor  # (B, K) 1 chosen, 2 rejected, 0 none
    keep: int  # logits_to_keep = K + 1


def collate_shared_prompt(pairs: Sequence[dict], pad_id: int) -> SharedPromptBatch:
    b = len(pairs)
    start = max(len(p["prompt_ids"]) for p in pairs)
    k = max(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    t = start + k
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, t), dtype=torch.long)
    segment_full = torch.zeros((b, t), dtype=torch.long)  # 0 pad, 3 prompt, 1 chosen, 2 rejected
    targets = torch.full((b, k), IGNORE_INDEX, dtype=torch.long)
    source = torch.zeros((b, k), dtype=torch.long)
    for row, p in enumerate(pairs):
        prompt, chosen, rejected = p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]
        np_, nc, nr = len(prompt), len(chosen), len(rejected)
        off = start - np_
        input_ids[row, off:start] = torch.as_tensor(prompt)
        input_ids[row, start : start + nc] = torch.as_tensor(chosen)
        input_ids[row, start + nc : start + nc + nr] = torch.as_tensor(rejected)
        position_ids[row, off:start] = torch.arange(np_)
        position_ids[row, start : start + nc] = torch.arange(np_, np_ + nc)
        position_ids[row, start + nc : start + nc + nr] = torch.arange(np_, np_ + nr)
        segment_full[row, off:start] = 3
        segment_full[row, start : start + nc] = 1
        segment_full[row, start + nc : start + nc + nr] = 2
        targets[row, : nc + nr] = torch.as_tensor(list(chosen) + list(rejected))
        # kept logit j sits at position start - 1 + j and predicts the token at start + j; the first
        # rejected token is predicted by the prompt's last position (kept index 0), like the first chosen one
        source[row, : nc + nr] = torch.arange(nc + nr)
        if nr:
            source[row, nc] = 0
    q = segment_full[:, :, None]  # (B, T, 1)
    kv = segment_full[:, None, :]  # (B, 1, T)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = causal & (kv != 0) & (q != 0) & ~((q == 2) & (kv == 1))
    mask |= torch.eye(t, dtype=torch.bool)  # padding rows attend to themselves: no all-masked row (NaN in sdpa)
    segment = segment_full[:, start:]
    return SharedPromptBatch(input_ids, position_ids, mask[:, None], targets, source, segment, k + 1)


@dataclass
class GroupBatch:
    """B groups (one prompt, G completions each) as B rows `[left pad | prompt | c_1 | ... | c_G | right pad]`.

    The prompt is computed once per group instead of G times (online RL samples G completions per prompt).
    Each completion's positions restart at the prompt's end and the 4D mask lets it see only the prompt and
    itself, so every completion is conditioned exactly as in its own row. `index` maps each completion's
    tokens (row b*G + j, token t) to its slot in the kept logits (flattened (B, K)); `mask` marks real tokens.
    """

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, 1, T, T) bool
    targets: torch.Tensor  # (B, K) completion token ids by slot
    source: torch.Tensor  # (B, K) kept-logit index predicting each slot
    index: torch.Tensor  # (B * G, C) flat slot index of each completion token
    mask: torch.Tensor  # (B * G, C) bool
    keep: int  # logits_to_keep = K + 1


def collate_groups(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[Sequence[int]]],
                   pad_id: int) -> GroupBatch:
    b = len(prompts)
    g = len(completions[0])
    start = max(len(p) for p in prompts)
    k = max(max(sum(len(c) for c in cs), 1) for cs in completions)
    c_max = max(max(len(c) for c in cs) for cs in completions) or 1
    t = start + k
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, t), dtype=torch.long)
    seg = torch.zeros((b, t), dtype=torch.long)  # 0 pad, -1 prompt, j + 1 completion j
    targets = torch.full((b, k), IGNORE_INDEX, dtype=torch.long)
    source = torch.zeros((b, k), dtype=torch.long)
    index = torch.zeros((b * g, c_max), dtype=torch.long)
    mask = torch.zeros((b * g, c_max), dtype=torch.bool)
    for row, (prompt, cs) in enumerate(zip(prompts, completions, strict=True)):
        np_ = len(prompt)
        input_ids[row, start - np_ : start] = torch.as_tensor(prompt)
        position_ids[row, start - np_ : start] = torch.arange(np_)
        seg[row, start - np_ : start] = -1
        off = 0
        for j, c in enumerate(cs):
            n = len(c)
            if n:
                input_ids[row, start + off : start + off + n] = torch.as_tensor(c)
                position_ids[row, start + off : start + off + n] = torch.arange(np_, np_ + n)
                seg[row, start + off : start + off + n] = j + 1
                targets[row, off : off + n] = torch.as_tensor(c)
                # kept logit i sits at position start - 1 + i; a completion's first token is predicted by the
                # prompt's last position (kept index 0), the others by the token before them
                source[row, off : off + n] = torch.arange(off, off + n)
                source[row, off] = 0
                index[row * g + j, :n] = row * k + torch.arange(off, off + n)
                mask[row * g + j, :n] = True
            off += n
    q, kv = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    attend = causal & (q != 0) & (kv != 0) & ((kv == -1) | (kv == q))
    attend |= torch.eye(t, dtype=torch.bool)  # padding rows attend to themselves: no all-masked row (NaN in sdpa)
    return GroupBatch(input_ids, position_ids, attend[:, None], targets, source, index, mask, k + 1)

