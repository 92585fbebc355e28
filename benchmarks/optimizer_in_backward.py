"""Peak memory and step time of the optimizer step fused into backward (`sft/dpo.optimizer_in_backward`,
components/core/train/in_backward.py) against the usual AdamW step, on a Qwen2.5-0.5B-shaped model.

    .venv/bin/python benchmarks/optimizer_in_backward.py                 # CPU, fp32, ~5 min on 2 cores
    python benchmarks/optimizer_in_backward.py --device cuda             # GPU, fp32 master weights

Each mode runs in its own subprocess (`--child normal|fused`), so each peak is that mode's alone: the same
random Qwen2.5-0.5B-shaped model (benchmarks/dpo_vs_trl.py's `QWEN2_5_0_5B`: hidden 896, 24 layers, 14/2
heads, MLP 4864, the 151,936-row tied embedding / LM head; 494M parameters, seeded), the same `--steps`
optimizer steps of an SFT-like token-mean NLL (the sft stage's `batch_nll` and `collate_sequences`) on
`--batch-size` x `--seq-len` random tokens, the stages' own optimizer and schedule (`loop.make_optimizer`,
`loop.make_scheduler`), with gradient checkpointing as the stages' `auto` sets it (on above 100M parameters).
`normal`: backward, then `optimizer.step()` and `zero_grad`, no clipping (the setting the fused step
requires); `fused`: backward only.

Measured: peak RSS (`ru_maxrss`, after building the model and at the end), on CUDA also
`torch.cuda.max_memory_allocated`; seconds per step (every step, and the mean without the first, which also
allocates the Adam moments). Writes benchmarks/results/optimizer_in_backward_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
MODES = ("normal", "fused")


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(mode: str, args: argparse.Namespace) -> dict:
    """One mode's run in this (fresh) process: build, train `args.steps` steps, measure."""
    import torch
    from dpo_vs_trl import QWEN2_5_0_5B
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from components.core.data.tokens import collate_sequences
    from components.core.model import loading
    from components.core.model.logprobs import batch_nll
    from components.core.train import loop

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", str(os.cpu_count()))))
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN2_5_0_5B, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = Qwen2ForCausalLM(config).to(device)
    loading.enable_gradient_checkpointing(model, args.gradient_checkpointing)
    model.train()
    rss_model = rss_bytes()
    fused = mode == "fused"
    optimizer = loop.make_optimizer(model, 1e-5, 0.0, in_backward=fused)
    schedule = loop.make_scheduler(optimizer, "cosine", 0, args.steps)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 32000, (args.batch_size, args.seq_len), generator=gen).tolist()
    seqs = [(ids, ids) for ids in tokens]  # every token trained, as an SFT row of pure response
    batch = collate_sequences(seqs, pad_id=2).to(device)
    seconds, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        nll, n = batch_nll(model, batch)
        (nll / n).backward()
        if not fused:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        losses.append((nll / n).item())
    out = {"mode": mode, "params": sum(p.numel() for p in model.parameters()),
           "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
           "peak_rss_bytes": rss_bytes(), "rss_after_model_bytes": rss_model,
           "seconds_per_step": seconds,
           "mean_seconds_per_step_after_first": sum(seconds[1:]) / max(1, len(seconds) - 1),
           "losses": losses}
    if device.type == "cuda":
        out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--gradient-checkpointing", default="auto", choices=("auto", "true", "false"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.gradient_checkpointing = {"true": True, "false": False}.get(args.gradient_checkpointing, "auto")
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{mode}: peak RSS {results[mode]['peak_rss_bytes'] / 2**30:.2f} GiB, "
              f"{results[mode]['mean_seconds_per_step_after_first']:.2f} s/step", flush=True)
    normal, fused = results["normal"], results["fused"]
    summary = {
        "peak_rss_gib": {m: round(r["peak_rss_bytes"] / 2**30, 3) for m, r in results.items()},
        "peak_rss_ratio_fused_to_normal": fused["peak_rss_bytes"] / normal["peak_rss_bytes"],
        "peak_rss_saved_gib": (normal["peak_rss_bytes"] - fused["peak_rss_bytes"]) / 2**30,
        "seconds_per_step_ratio_fused_to_normal":
            fused["mean_seconds_per_step_after_first"] / normal["mean_seconds_per_step_after_first"],
        "same_losses": normal["losses"] == fused["losses"],
    }
    if "cuda_max_memory_allocated_bytes" in fused:
        summary["cuda_max_allocated_ratio_fused_to_normal"] = (
            fused["cuda_max_memory_allocated_bytes"] / normal["cuda_max_memory_allocated_bytes"])
    result = {"benchmark": "optimizer_in_backward", "device": args.device,
              "job": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                      "gradient_checkpointing": str(args.gradient_checkpointing), "dtype": "float32",
                      "optimizer": "AdamW (0.9, 0.95), no weight decay, no clipping, cosine"},
              "modes": results, "summary": summary,
              "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"optimizer_in_backward_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
