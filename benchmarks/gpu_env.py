"""The GPU check's helpers (benchmarks/gpu_check.sh): what the machine is, vLLM generation, and the summary.

    python benchmarks/gpu_env.py --out gpu_env.json                      # torch, CUDA, GPUs, bf16, nvidia-smi
    python benchmarks/gpu_env.py --vllm models/base --out gpu_vllm.json  # vLLM greedy vs transformers greedy
    python benchmarks/gpu_env.py --summarize DIR --dry-run 0 --out DIR/gpu_check.json

The summary reads DIR/logs/steps.jsonl (each step's rc and seconds) and the results files the steps wrote, keeps
their headline figures (speed-up over TRL, MFU, peak memory ratios), and exits 1 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADLINES = {  # results file -> the summary keys kept from it
    "gpu_dpo_vs_trl.json": ("speedup_end_to_end", "ours_mfu", "trl_mfu", "peak_memory_ratio", "ours_tokens_per_s"),
    "gpu_grpo_vs_trl.json": ("speedup_wall", "tokens_per_s_ratio", "peak_memory_ratio", "peak_cuda_memory_ratio"),
    "gpu_dpo_vs_trl_smollm2.json": ("speedup_end_to_end", "ours_mfu", "trl_mfu", "peak_memory_ratio"),
    "gpu_vllm.json": ("prompts", "identical_to_transformers", "vllm_tokens_per_s"),
}


def environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    smi = shutil.which("nvidia-smi")
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda_available": cuda,
        "cuda_version": torch.version.cuda, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "nvidia_smi": subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip() if smi else None,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def vllm_generation(model_dir: str, max_tokens: int = 32) -> dict:
    """Greedy answers of vLLM and of transformers on the held-out prompts of data/prepared: identical or not."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from components.core.ops.io import read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
               for r in read_jsonl(ROOT / "data/prepared/pref_eval.jsonl")[:32]]
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3)
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    seconds = time.perf_counter() - start
    ours = [list(o.outputs[0].token_ids) for o in outputs]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    same = 0
    for prompt, theirs in zip(prompts, ours, strict=True):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.cuda()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        same += out[: len(theirs)] == theirs
    return {"prompts": len(prompts), "identical_to_transformers": same,
            "vllm_tokens_per_s": sum(map(len, ours)) / seconds}


def summarize(directory: Path, dry_run: bool) -> tuple[dict, bool]:
    steps = [json.loads(line) for line in (directory / "logs/steps.jsonl").read_text().splitlines() if line]
    figures = {}
    for name, keys in HEADLINES.items():
        path = directory / name
        if path.exists():
            result = json.loads(path.read_text())
            source = result.get("summary", result)
            if source and all(isinstance(v, dict) for v in source.values()):  # dpo_vs_trl: {job: summary}
                source = source.get("steps") or next(iter(source.values()))
            figures[name.removesuffix(".json")] = {k: source.get(k) for k in keys if k in source}
    ok = all(s.get("rc") in (0, None) for s in steps)
    env = directory / "gpu_env.json"
    return {"dry_run": dry_run, "passed": ok, "steps": steps, "figures": figures,
            "environment": json.loads(env.read_text()) if env.exists() else None}, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--vllm", metavar="MODEL_DIR")
    parser.add_argument("--summarize", metavar="DIR")
    parser.add_argument("--dry-run", type=int, default=0)
    args = parser.parse_args(argv)
    ok = True
    if args.summarize:
        result, ok = summarize(Path(args.summarize), bool(args.dry_run))
    elif args.vllm:
        result = vllm_generation(args.vllm)
    else:
        result = environment()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
