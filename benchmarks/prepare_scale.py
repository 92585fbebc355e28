"""prepare at scale: time and peak memory from 40k to 2M records, on 1 process and on every core, against the
prepare of another git revision (the in-memory, one-core prepare before streaming) in the same run.

    .venv/bin/python benchmarks/prepare_scale.py                                  # 40k, 400k, 2M; baseline HEAD~
    # (1 process and the baseline up to 400k: their time grows as expected, and 2M takes ~10 min a run on 2 cores)
    .venv/bin/python benchmarks/prepare_scale.py --records 40000 --baseline ''    # no baseline

Data: the embedded sorting task (core/sorting.generate, params.yaml's synthetic settings), two SFT records to one
preference pair as in the default, written as two .jsonl sources, tokenised with the embedded tokenizer
(models/base: run `dvc repro bootstrap` first). Each measured run is `prepare.run` in a fresh subprocess; a sampler
reads the proportional set size (PSS: shared pages split between the processes sharing them) of the process and
its workers every 50 ms, so the peak counts a forked worker's copy-on-write pages once. The outputs of every run
of one size (every worker count, and the baseline) must be the same bytes, or the script fails.
Prints a table and writes benchmarks/results/prepare_scale.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys
from components import prepare
from components.core.config import DataConfig, Runtime
spec = json.loads(sys.argv[1])
cfg = DataConfig(**spec["data"])
prepare.run(cfg, tokenizer_path=spec["tokenizer"], out_dir=spec["out"], metrics_path=spec["metrics"],
            runtime=Runtime(seed=spec["seed"]))
"""


def write_sources(work: Path, records: int, seed: int) -> list[str]:
    """records: 2/3 SFT, 1/3 preference pairs, generated in chunks (memory flat here too)."""
    from components.core import sorting
    from components.core.config import load_params

    syn = load_params(str(ROOT / "params.yaml")).synthetic
    paths = [work / "sft.jsonl", work / "pref.jsonl"]
    chunk = 20_000
    with open(paths[0], "w") as sft_f, open(paths[1], "w") as pref_f:
        for i, start in enumerate(range(0, records, chunk)):
            n = min(chunk, records - start)
            n_sft = (2 * n) // 3
            sft, pref = sorting.generate(n_sft, n - n_sft, syn.min_items, syn.max_items, syn.max_value,
                                         syn.demo_noise, seed * 1_000_003 + i)
            sft_f.writelines(json.dumps(r) + "\n" for r in sft)
            pref_f.writelines(json.dumps(r) + "\n" for r in pref)
    return [str(p) for p in paths]


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out += map(int, children)
        frontier += map(int, children)
    return out


def measure(code_root: Path, spec: dict) -> dict:
    """Run prepare.run from code_root in a subprocess: wall seconds and peak PSS of its process tree (GB)."""
    env = {**os.environ, "PYTHONPATH": str(code_root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=code_root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, peak_main, processes = 0, 0, 1
    done = threading.Event()

    def sample():
        nonlocal peak, peak_main, processes
        while not done.is_set():
            pids = _tree(proc.pid)
            sizes = [_pss_kb(p) for p in pids]
            peak, peak_main = max(peak, sum(sizes)), max(peak_main, sizes[0])
            processes = max(processes, len(pids))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"prepare failed ({code_root}): {err[-2000:]}")
    return {"seconds": round(wall, 2), "peak_pss_gb": round(peak / 2**20, 3), "peak_main_pss_gb": round(peak_main / 2**20, 3),
            "processes": processes}


def digest(directory: Path) -> str:
    """The outputs' identity: every file's bytes, but a parquet file's content (schema with its metadata, and rows):
    the row groups of a token file are cut at 16,384 rows now, where the baseline wrote one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(directory)).encode() + b"\0")
        if f.suffix == ".parquet":
            table = pq.read_table(f).combine_chunks()
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as stream:
                stream.write_table(table)
            h.update(sink.getvalue().to_pybytes())
        else:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def cpu_ceiling(workers: int, n: int = 15_000_000) -> float:
    """The machine's own parallel speed-up on `workers` processes of pure Python arithmetic (no I/O, no sharing):
    the most any process pool can get here (shared or oversubscribed virtual cores give less than `workers`)."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    for _ in range(workers):
        _burn(n)
    serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_burn, [n] * workers)
    return round(serial / (time.perf_counter() - t0), 2)


def baseline_tree(rev: str, work: Path) -> Path:
    path = work / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), rev], check=True,
                   capture_output=True)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[40_000, 400_000, 2_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1 and every available core")
    parser.add_argument("--baseline", default="HEAD~", help="git revision of the prepare to compare ('' for none)")
    parser.add_argument("--baseline-max", type=int, default=400_000, help="largest size the baseline runs on")
    parser.add_argument("--one-worker-max", type=int, default=400_000,
                        help="largest size the 1-process run is measured on (the speed-up is measured below it)")
    parser.add_argument("--tokenizer", default=str(ROOT / "models/base"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/prepare_scale.json"))
    args = parser.parse_args(argv)

    from components.core.ops.parallel import available_cores

    workers = args.workers or sorted({1, available_cores()})
    work = Path(tempfile.mkdtemp(prefix="prepare_scale-"))
    base = baseline_tree(args.baseline, work) if args.baseline else None
    results = []
    try:
        for n in args.records:
            sources = write_sources(work, n, seed=0)
            data = {"sources": [{"path": p} for p in sources], "eval_fraction": 0.1, "max_length": 128,
                    "max_prompt_length": 96, "min_kept_fraction": 0.0}
            runs = [("ours", w) for w in workers if w > 1 or n <= args.one_worker_max or len(workers) == 1] + ([("baseline", 1)] if base and n <= args.baseline_max else [])
            digests = set()
            for side, w in runs:
                out = work / f"out-{side}-{w}"
                spec = {"data": data if side == "baseline" else {**data, "num_proc": w}, "tokenizer": args.tokenizer,
                        "out": str(out / "prepared"), "metrics": str(out / "prepare.json"), "seed": 0}
                row = {"records": n, "side": side, "workers": w, **measure(base if side == "baseline" else ROOT, spec)}
                digests.add(digest(out / "prepared"))
                results.append(row)
                print(json.dumps(row), flush=True)
                subprocess.run(["rm", "-rf", str(out)], check=True)
            if len(digests) != 1:
                raise SystemExit(f"{n} records: the outputs differ between runs: {sorted(digests)}")
    finally:
        if base:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
        subprocess.run(["rm", "-rf", str(work)], check=False)

    ceiling = {str(w): cpu_ceiling(w) for w in workers if w > 1}
    summary = {"machine": {"cores": available_cores(), "python": platform.python_version(),
                           "processor": platform.processor() or platform.machine(),
                           "cpu_speedup_ceiling": ceiling},
               "baseline": args.baseline, "date": time.strftime("%Y-%m-%d"), "runs": results}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"the machine's own speed-up on pure Python arithmetic (the ceiling for any pool): {ceiling}")
    print(f"{'records':>9} {'side':>9} {'workers':>7} {'seconds':>8} {'rec/s':>8} {'peak PSS GB':>11}")
    for r in results:
        print(f"{r['records']:>9} {r['side']:>9} {r['workers']:>7} {r['seconds']:>8.1f} "
              f"{r['records'] / r['seconds']:>8.0f} {r['peak_pss_gb']:>11.2f}")


if __name__ == "__main__":
    main()
