"""A bounded load test of the served chat model: start-up, first answer, latency and throughput under concurrency,
and malformed requests answered 4xx with the server still up.

    python benchmarks/serving_load.py [--alias challenger] [--requests 200] [--concurrency 8] \
        [--out benchmarks/results/serving_load_cpu.json]

Serves a version of the project's registered model (`alignflow serve --alias ...`, which runs `mlflow models
serve`) on 127.0.0.1, as a user would after `./scripts/run.sh` (the default pipeline registers a challenger), and
sends held-out prompts as OpenAI-style chat requests (greedy, evaluate's max_new_tokens), `--concurrency` at a time,
with a malformed body every 10th request. The peer, on the same machine in the same run, is the pipeline's own
greedy generation of the same prompts in process, one at a time (unless `--no-check`): every served answer must
equal it, and the served throughput is quoted as a ratio of its prompts per second.

Stdlib only at import (tests/integration/test_serving.py imports `load_test` and `MALFORMED`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, body, what the 400's message must say): no messages, wrong role, missing role, not a list, bad number,
# streaming, over the context, not JSON
MALFORMED = [
    ("no messages", {"temperature": 0}, "input fields"),
    ("empty messages", {"messages": []}, "non-empty list"),
    ("wrong role", {"messages": [{"role": "robot", "content": "hi"}]}, "role is 'robot'"),
    ("missing role", {"messages": [{"content": "hi"}]}, "role"),
    ("messages not a list", {"messages": "hi"}, "list"),
    ("negative temperature", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ("stream", {"messages": [{"role": "user", "content": "hi"}], "stream": True}, "stream"),
    ("over the context", {"messages": [{"role": "user", "content": "1 " * 5000}]}, "maximum context length"),
    ("not JSON", "{not json", "JSON"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body, timeout: float = 120.0) -> tuple[int, dict | str, float]:
    """(HTTP status, parsed JSON or text, seconds) of one POST."""
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    seconds = time.perf_counter() - start
    try:
        return status, json.loads(raw), seconds
    except ValueError:
        return status, raw.decode(errors="replace"), seconds


def wait_up(base: str, process: subprocess.Popen, timeout: float = 180.0) -> float:
    """Seconds until GET /ping answers 200 (raises if the server exits or never answers)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{base}/ping did not answer within {timeout:.0f} s")


def load_test(url: str, requests: list[dict], concurrency: int, malformed_every: int = 10) -> dict:
    """Send the well-formed `requests` with a MALFORMED body after every `malformed_every`th, `concurrency` at a
    time. Returns counts, per-request results and latency percentiles of the well-formed ones."""
    jobs: list[tuple[str, object, str | None]] = []
    for i, body in enumerate(requests):
        jobs.append(("ok", body, None))
        if malformed_every and (i + 1) % malformed_every == 0:
            name, bad, reason = MALFORMED[(i // malformed_every) % len(MALFORMED)]
            jobs.append((name, bad, reason))
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda job: (job, post(url, job[1])), jobs))
    wall = time.perf_counter() - start
    good = [(job, r) for job, r in results if job[0] == "ok"]
    bad = [(job, r) for job, r in results if job[0] != "ok"]
    latencies = sorted(r[2] for _, r in good)
    failures = [f"{job[0]}: HTTP {r[0]} {str(r[1])[:200]}" for job, r in good if r[0] != 200]
    failures += [f"{job[0]}: expected 4xx mentioning {job[2]!r}, got HTTP {r[0]} {str(r[1])[:200]}"
                 for job, r in bad if not (400 <= r[0] < 500 and job[2].lower() in str(r[1]).lower())]
    tokens = sum(r[1]["usage"]["completion_tokens"] for _, r in good if r[0] == 200)
    return {
        "requests": len(good), "malformed": len(bad), "concurrency": concurrency, "failures": failures,
        "answers": [r[1] for _, r in good], "wall_s": wall,
        "requests_per_s": len(good) / wall, "completion_tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies), "p95_s": latencies[max(0, int(round(0.95 * len(latencies))) - 1)],
    }


def held_out_requests(n: int, max_tokens: int) -> list[dict]:
    from components.core.eval.judges import eval_prompts

    prompts = eval_prompts(str(ROOT / "data/prepared/pref_eval.jsonl"), 0)
    return [{"messages": prompts[i % len(prompts)][1], "temperature": 0, "max_tokens": max_tokens} for i in range(n)]


def pipeline_answers(model_dir: str, requests: list[dict], max_tokens: int) -> list[str]:
    from components.core.model.generation import generate_responses, load_causal_lm

    model, tokenizer = load_causal_lm(model_dir)
    return generate_responses(model, tokenizer, [r["messages"] for r in requests], max_tokens, 0.0, 1.0, 1, 0,
                              desc="pipeline")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alias", default="challenger")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--no-check", action="store_true", help="skip comparing answers with the pipeline's")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/serving_load_cpu.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from components.core.config import load_params

    p = load_params(str(ROOT / "params.yaml"))
    max_tokens = p.evaluate.max_new_tokens
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "components.cli", "serve", "--alias", args.alias, "--port", str(port)]
    start = time.perf_counter()
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        up_s = wait_up(base, server)
        requests = held_out_requests(args.requests, max_tokens)
        status, first, _ = post(f"{base}/invocations", requests[0])
        first_answer_s = time.perf_counter() - start
        if status != 200:
            raise RuntimeError(f"first request: HTTP {status} {first}")
        result = load_test(f"{base}/invocations", requests, args.concurrency)
        alive = urllib.request.urlopen(f"{base}/ping", timeout=5).status == 200
    finally:
        server.terminate()
        server.wait(30)
    mismatched = in_process_s = None
    if not args.no_check:
        start = time.perf_counter()
        want = pipeline_answers(str(ROOT / f"models/{p.registry.candidate}"), requests, max_tokens)
        in_process_s = time.perf_counter() - start
        got = [a["choices"][0]["message"]["content"] for a in result["answers"]]
        mismatched = sum(g != w for g, w in zip(got, want, strict=True))
    summary = {k: v for k, v in result.items() if k != "answers"}
    summary.update(startup_s=up_s, first_answer_s=first_answer_s, server_alive_after=alive,
                   answers_differing_from_pipeline=mismatched, in_process_s=in_process_s,
                   # the peer: the same answers generated in process, one prompt at a time (load included)
                   served_vs_in_process=(result["requests_per_s"] / (len(requests) / in_process_s)
                                         if in_process_s else None))
    record = {"benchmark": "serving_load", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "spec": {"alias": args.alias, "requests": args.requests, "concurrency": args.concurrency,
                       "max_tokens": max_tokens, "model": p.registry.model_name},
              "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"start-up {up_s:.1f} s, first answer {first_answer_s:.1f} s after launch; {summary['requests']} requests "
          f"({summary['malformed']} malformed) at concurrency {args.concurrency}: p50 {summary['p50_s'] * 1000:.0f} ms, "
          f"p95 {summary['p95_s'] * 1000:.0f} ms, {summary['requests_per_s']:.1f} req/s, "
          f"{summary['completion_tokens_per_s']:.0f} tokens/s; failures {len(summary['failures'])}; "
          f"answers differing from the pipeline's: {mismatched}; server up after: {alive}; served throughput "
          f"{summary['served_vs_in_process'] or float('nan'):.2f}x the pipeline's in-process generation")
    for f in summary["failures"][:10]:
        print("  " + f)
    return 0 if not summary["failures"] and alive and not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
