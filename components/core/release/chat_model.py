"""The registered chat model: OpenAI-style chat completions from a causal LM, as `mlflow models serve` runs it.

MLflow loads this file on its own (a model from code: `mlflow.pyfunc.log_model(python_model=<this file>)`), in
the serving process, so it imports only the standard library, torch, transformers and mlflow: a serving image
needs no alignflow. The weights, tokenizer and chat template are the artifact `hf_model`, a plain Hugging Face
directory (what `alignflow export` writes out).

Request (the body of POST /invocations, or pyfunc `predict`'s input), as OpenAI's chat completions API:

    {"messages": [{"role": "user", "content": "..."}], "max_tokens": 32, "temperature": 0, "top_p": 1.0,
     "stop": ["\\n"], "n": 1, "custom_inputs": {"seed": 0, "return_token_ids": false}}

- The model's own chat template renders the messages with the assistant's generation prompt, tokenised without
  added special tokens: the ids alignflow's prepare stores for the same prompt.
- `temperature` 0 is greedy decoding (what OpenAI clients send for reproducible answers); above 0, plain
  temperature / top-p sampling (no top-k or repetition penalty a checkpoint may ship), as evaluate samples.
- Generation stops at the end-of-turn tokens (the tokenizer's eos and the generation config's), at a `stop`
  string (left out of the answer, as OpenAI does) or after `max_tokens`; `finish_reason` says which.
- The answer is the assistant text only. A prompt whose tokens plus `max_tokens` exceed the model's context is
  refused with both numbers. Bad requests raise MlflowException(INVALID_PARAMETER_VALUE): the server answers 400
  with the reason.
Defaults for max_tokens, temperature and top_p are the ones evaluate sampled with (the model config).
"""

from __future__ import annotations

import math
import threading
import time
import uuid

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

ARTIFACT = "hf_model"  # the artifact key of the Hugging Face directory
ROLES = ("system", "user", "assistant", "tool")
MAX_CHOICES = 8
MAX_STOP = 4  # OpenAI's limit on stop sequences
UNBOUNDED = 10**8  # tokenizers without a real limit report model_max_length ~1e30


def bad_request(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _plain(value):
    """A JSON value out of what MLflow's schema enforcement hands over (numpy scalars and arrays, NaN for absent)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def as_request(model_input, params: dict | None = None) -> dict:
    """One request dict from a dict, a one-row DataFrame or a list of messages (params: pyfunc params, merged in)."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a pandas DataFrame
        rows = model_input.to_dict(orient="records")
        if len(rows) != 1:
            raise bad_request(f"one chat request at a time, got {len(rows)} rows")
        model_input = rows[0]
    if isinstance(model_input, list):
        model_input = {"messages": model_input}
    if not isinstance(model_input, dict):
        raise bad_request(f"a chat request is a JSON object with 'messages', got {type(model_input).__name__}")
    request = {k: _plain(v) for k, v in {**model_input, **(params or {})}.items()}
    return {k: v for k, v in request.items() if v is not None}


def check_messages(messages) -> list[dict]:
    """The messages as the template gets them ({role, content, ...}); one line naming the first bad one."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise bad_request(f"messages[{i}].content is missing")
        if content is not None and not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string (text only), got {type(content).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _number(request: dict, key: str, default, low: float, high: float, kind=float):
    value = request.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
        raise bad_request(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not low <= value <= high:
        raise bad_request(f"'{key}' must be in [{low}, {high}], got {value}")
    return kind(value)


def sampling_settings(request: dict, defaults: dict) -> dict:
    """max_tokens, temperature, top_p, stop, n, seed of a request (defaults: the model config's)."""
    if request.get("stream"):
        raise bad_request("'stream' is not supported by this server: send stream false (or leave it out)")
    stop = request.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise bad_request(f"'stop' must be a string or a list of up to {MAX_STOP} non-empty strings")
    custom = request.get("custom_inputs") or {}
    seed = custom.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request(f"custom_inputs.seed must be an integer, got {seed!r}")
    return {
        "max_tokens": _number(request, "max_tokens", defaults.get("max_tokens", 256), 1, UNBOUNDED, int),
        "temperature": _number(request, "temperature", defaults.get("temperature", 1.0), 0.0, 2.0),
        "top_p": _number(request, "top_p", defaults.get("top_p", 1.0), 0.0, 1.0),
        "n": _number(request, "n", 1, 1, MAX_CHOICES, int),
        "stop": stop,
        "seed": seed,
        "return_token_ids": bool(custom.get("return_token_ids", False)),
    }


def context_length(model_config, tokenizer) -> int:
    """The most tokens the model takes: its position limit, or the tokenizer's when that is lower and real."""
    limits = [getattr(model_config, k, None) for k in ("max_position_embeddings", "n_positions", "seq_length")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    real = [int(x) for x in limits if isinstance(x, int | float) and 0 < x < UNBOUNDED]
    return min(real) if real else UNBOUNDED


def check_context(prompt_tokens: int, max_tokens: int, limit: int) -> None:
    if prompt_tokens + max_tokens > limit:
        raise bad_request(
            f"this model's maximum context length is {limit} tokens; the request needs {prompt_tokens + max_tokens} "
            f"({prompt_tokens} in the messages, {max_tokens} max_tokens): shorten the messages or lower max_tokens")


def cut_answer(new_ids: list[int], text_of, eos: set[int], stop: list[str], max_tokens: int) -> tuple[list[int], str, str]:
    """(ids up to and including the end-of-turn token, assistant text, finish_reason) of generated ids."""
    end = next((i + 1 for i, t in enumerate(new_ids) if t in eos), None)
    ids = new_ids[:end] if end is not None else new_ids
    text = text_of([t for t in ids if t not in eos])
    hits = [text.find(s) for s in stop if s in text]
    if hits:
        return ids, text[: min(hits)].strip(), "stop"
    reason = "stop" if end is not None else "length" if len(ids) >= max_tokens else "stop"
    return ids, text.strip(), reason


class ChatLM(PythonModel):
    """An OpenAI-style chat model over a Hugging Face causal LM (see the module docstring)."""

    # The request is checked here (as_request, check_messages, sampling_settings) after MLflow enforced the signature's
    # OpenAI chat schema; no type-hint validation (as MLflow's own ChatModel), which would also warn at every load.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts[ARTIFACT]
        config = dict(context.model_config or {})
        self.name = config.get("model_name", "alignflow")
        self.defaults = {k: config[k] for k in ("max_tokens", "temperature", "top_p") if k in config}
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        on_gpu = torch.cuda.is_available()
        dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda" if on_gpu else "cpu").eval()
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        eos = {self.tokenizer.eos_token_id} | set(configured if isinstance(configured, list) else [configured])
        self.eos = sorted(i for i in eos if i is not None)
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else self.eos[0]
        self.limit = context_length(self.model.config, self.tokenizer)
        self._lock = threading.Lock()  # the server runs requests in threads: one generate at a time on the model

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        extra = {"tools": tools} if tools else {}
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        except Exception as e:  # the template's own checks (e.g. roles must alternate)
            raise bad_request(f"the chat template rejected the messages: {e}") from e
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def predict(self, context, model_input, params: dict | None = None) -> dict:
        request = as_request(model_input, params)
        messages = check_messages(request.get("messages"))
        settings = sampling_settings(request, self.defaults)
        ids = self.prompt_ids(messages, request.get("tools"))
        check_context(len(ids), settings["max_tokens"], self.limit)
        choices, completion_tokens, token_ids = [], 0, []
        with self._lock:
            for index in range(settings["n"]):
                new = self._generate(ids, settings, index)
                kept, text, reason = cut_answer(new, self._decode, set(self.eos), settings["stop"],
                                                settings["max_tokens"])
                completion_tokens += len(kept)
                token_ids.append(kept)
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "finish_reason": reason})
        response = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.name, "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(ids) + completion_tokens},
        }
        if settings["return_token_ids"]:
            response["custom_outputs"] = {"prompt_token_ids": ids, "completion_token_ids": token_ids}
        return response

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _generate(self, ids: list[int], settings: dict, index: int) -> list[int]:
        import torch

        device = next(self.model.parameters()).device
        temperature = settings["temperature"]
        sampling = ({"do_sample": True, "temperature": temperature, "top_p": settings["top_p"], "top_k": 0,
                     "min_p": 0.0} if temperature > 0 else {"do_sample": False})
        if temperature > 0 and settings["seed"] is not None:
            torch.manual_seed(settings["seed"] + index)
        stops = {"stop_strings": settings["stop"], "tokenizer": self.tokenizer} if settings["stop"] else {}
        with torch.no_grad():
            out = self.model.generate(
                input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                                        device=device),
                max_new_tokens=settings["max_tokens"], min_new_tokens=0, num_beams=1, repetition_penalty=1.0,
                no_repeat_ngram_size=0, eos_token_id=self.eos, pad_token_id=self.pad, use_cache=True,
                **sampling, **stops,
            )  # (1, T + new)
        return out[0, len(ids):].tolist()


mlflow.models.set_model(ChatLM())
