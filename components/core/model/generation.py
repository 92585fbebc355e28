"""Sampling from a policy: seeded, batched HF `generate`, and the tokens that end a turn.

evaluate generates with it for every policy; `alignflow promote` re-scores registered versions through
eval/judges.score_prompts, so both see the same samples for the same model, prompts and seed.
"""

from __future__ import annotations

import logging

import torch

from components.core.data.tokens import prompt_ids_for_generation
from components.core.model.loading import load_tokenizer
from components.core.ops.logs import progress

log = logging.getLogger(__name__)

def _eos(tokenizer, generation_config) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return sorted(i for i in ids if i is not None)

def eos_ids(model, tokenizer) -> list[int]:
    """The tokens that end a turn: the tokenizer's eos and the model's generation config's."""
    return _eos(tokenizer, model.generation_config)

def generation_eos(model_dir: str, tokenizer) -> list[int]:
    """eos_ids of a saved model without loading its weights (its generation_config.json, else the tokenizer's)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        config = None
    return _eos(tokenizer, config)

@torch.no_grad()
def generate_tokens(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, temperature: float, top_p: float,
    batch_size: int, seed: int, desc: str = "generate",
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt_ids, response_ids) per prompt; response_ids end with the eos token when one was produced.

    Left-padded batches in the given order. Batch k samples under torch.manual_seed(seed + k), so a
    batch's samples do not depend on which batches ran before it, and two models evaluated on the same
    prompts draw the same random numbers (common random numbers: a less noisy comparison).
    Sampling is plain temperature / top-p: generation defaults a checkpoint may ship (top_k, repetition
    penalty, ...) are overridden, so the samples are from the policy and the KL estimate means something.
    """
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0, "min_p": 0.0}
        if temperature > 0 else {"do_sample": False}
    )
    model.eval()
    encoded = [prompt_ids_for_generation(tokenizer, p) for p in prompts]
    responses: list[list[int]] = []
    bar = progress(len(prompts), 0, desc, enabled=True)
    for k, start in enumerate(range(0, len(encoded), batch_size)):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)  # (B, T)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        torch.manual_seed(seed + k)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, min_new_tokens=0,
            num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos, pad_token_id=pad_id,
            use_cache=True, **sampling,
        )  # (B, T + new)
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            responses.append(row[:cut])
        bar.update(len(chunk))
    bar.close()
    return encoded, responses

def generate_responses(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, temperature: float, top_p: float,
    batch_size: int, seed: int, desc: str = "generate",
) -> list[str]:
    """Response text per prompt (batched, left-padded, seeded per batch, greedy when temperature is 0)."""
    _, responses = generate_tokens(model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size, seed, desc)
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]

def load_eval_model(model_dir: str, trust_remote_code: bool = False):
    """A frozen causal LM for evaluation: on the GPU if there is one (bf16 weights where it has bf16: a frozen
    model needs no fp32 masters), else fp32 on the CPU."""
    from transformers import AutoModelForCausalLM

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code, dtype=dtype)
    return model.to("cuda" if on_gpu else "cpu").eval()

def load_causal_lm(model_dir: str, trust_remote_code: bool = False):
    """(model, tokenizer) for evaluation (`load_eval_model`)."""
    return load_eval_model(model_dir, trust_remote_code), load_tokenizer(model_dir, trust_remote_code)

def response_length(response_ids: list[int], eos: list[int]) -> int:
    """Generated tokens, the closing eos not counted."""
    return len(response_ids) - (1 if response_ids and response_ids[-1] in eos else 0)
