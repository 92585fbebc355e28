"""Loading models and tokenizers, and the precision they load and compute in.

`resolve_mixed_precision` turns `compute.mixed_precision: auto` into bf16 / fp16 / fp32 for the machine; a trained
model keeps fp32 master weights (autocast supplies bf16/fp16 compute), a frozen one (reference, evaluation, a LoRA
base) loads in `frozen_dtype`. `stored_dtype` reads the dtype a saved model declares, so a stage writes its model
back in the dtype it was given.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

def resolve_mixed_precision(requested: str) -> str:
    """`auto` = bf16 on a GPU that has it, else fp16 on GPU, fp32 ("no") on CPU."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"

def autocast(device: torch.device, mixed_precision: str):
    """bf16/fp16 autocast on a GPU for code that runs outside an Accelerator (evaluation); fp32 on CPU.

    Training loops use `accelerator.autocast()`, which reads the same resolved setting.
    """
    mp = resolve_mixed_precision(mixed_precision)
    if device.type != "cuda" or mp == "no":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if mp == "bf16" else torch.float16)

def frozen_dtype(mixed_precision: str) -> torch.dtype:
    """Weights of a model that is only scored (reference, evaluation, a LoRA base): bf16 on a GPU that trains
    in bf16 (half the memory, the precision autocast computes in anyway), else fp32."""
    on_gpu = torch.cuda.is_available()
    return torch.bfloat16 if on_gpu and resolve_mixed_precision(mixed_precision) == "bf16" else torch.float32

def load_model(path: str, trust_remote_code: bool = False, lora: dict | None = None, *, frozen: bool = False,
               mixed_precision: str = "auto", gradient_checkpointing: bool | str = False):
    """Causal LM in fp32 master weights (autocast supplies bf16/fp16 compute); `frozen` (scoring only) or the
    base under LoRA in `frozen_dtype`. Optional LoRA via peft; gradient checkpointing (`auto` = above 100M)."""
    from transformers import AutoModelForCausalLM

    lora_on = bool(lora and lora.get("enabled"))
    dtype = frozen_dtype(mixed_precision) if frozen or lora_on else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)
    model.config.use_cache = False
    if frozen:
        return model.requires_grad_(False).eval()
    enable_gradient_checkpointing(model, gradient_checkpointing)
    if lora_on:
        from peft import LoraConfig, get_peft_model

        if checkpointing(model):
            model.enable_input_require_grads()
        model = get_peft_model(
            model,
            LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                       target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"),
        )
    return model

def enable_gradient_checkpointing(model, setting: bool | str) -> None:
    """Recompute activations in backward when `setting` is true, or "auto" and the model is above 100M parameters."""
    n_params = sum(p.numel() for p in model.parameters())
    if setting is True or (setting == "auto" and n_params > 100e6):
        # non-reentrant: works with DDP/FSDP and with inputs that do not require grad
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        log.info("gradient checkpointing on (%.0fM parameters)", n_params / 1e6)

def checkpointing(model) -> bool:
    """Whether activation (gradient) checkpointing is on, by the name this transformers has (the old one warns)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name, False))

def stored_dtype(path: str) -> torch.dtype | None:
    """The dtype a model's weights were stored in (config.json `dtype` / `torch_dtype`), if it says."""
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    raw = json.loads(config.read_text())
    name = raw.get("dtype") or raw.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None

def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:  # many base models ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok
