"""What the tokenised-records artifact saves: each stage loading the token ids prepare wrote, against each stage
tokenising the text records itself (what sft, reference, dpo, reward_model and evaluate did before).

    .venv/bin/python benchmarks/token_artifact.py                       # 4,000 pairs + 8,000 SFT records
    .venv/bin/python benchmarks/token_artifact.py --pairs 40000 --sft 40000 --min-items 30 --max-items 60

Data: the embedded sorting task (core/sorting.generate) with the embedded tokenizer (models/base, run
`dvc repro bootstrap` first). Per split file, best of --repeats rounds, in this one process:
- tokenise: `tokens.tokenize_pair` / `tokens.encode_chat` over the .jsonl (the old per-stage cost, paid by every
  stage on every process);
- write: `token_store.write_for` (encoding once and writing the parquet files: an upper bound on what prepare
  pays more now, since it encoded every record for its length checks before too);
- load: `token_store.load_pairs` / `load_sft` (the new per-stage cost).
Prints a table and writes benchmarks/results/token_artifact.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--sft", type=int, default=8000)
    parser.add_argument("--min-items", type=int, default=None, help="default: params.yaml synthetic.min_items")
    parser.add_argument("--max-items", type=int, default=None, help="default: params.yaml synthetic.max_items")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", default=str(ROOT / "models/base"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/token_artifact.json"))
    args = parser.parse_args(argv)

    from components.core import sorting
    from components.core.config import load_params
    from components.core.data import token_store
    from components.core.data.tokens import IGNORE_INDEX, encode_chat, tokenize_pair
    from components.core.model import loading
    from components.core.ops.io import read_jsonl, write_jsonl

    params = load_params(str(ROOT / "params.yaml"))
    syn = params.synthetic
    lo, hi = args.min_items or syn.min_items, args.max_items or syn.max_items
    sft, pref = sorting.generate(args.sft, args.pairs, lo, hi, syn.max_value, syn.demo_noise, params.seed)
    tokenizer = loading.load_tokenizer(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="token_artifact-"))
    write_jsonl(work / "pref_train.jsonl", [{"id": f"p{i}", **r} for i, r in enumerate(pref)])
    write_jsonl(work / "sft_train.jsonl", [{"id": f"s{i}", **r} for i, r in enumerate(sft)])
    big = 10**9

    def tokenise_pairs():
        return [tokenize_pair(tokenizer, r, big, big) for r in read_jsonl(work / "pref_train.jsonl")]

    def tokenise_sft():
        out = []
        for r in read_jsonl(work / "sft_train.jsonl"):
            ids, mask = encode_chat(tokenizer, r["messages"])
            out.append((ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]))
        return out

    write_s, meta = best_of(lambda: token_store.write_for(work, tokenizer), args.repeats)
    rows = {}
    for name, tokenise, load in (
        ("pref_train", tokenise_pairs, lambda: token_store.load_pairs(work / "pref_train.jsonl", tokenizer, big, big)),
        ("sft_train", tokenise_sft, lambda: token_store.load_sft(work / "sft_train.jsonl", tokenizer, big)),
    ):
        tokenise_s, from_text = best_of(tokenise, args.repeats)
        load_s, from_tokens = best_of(load, args.repeats)
        if name == "pref_train":
            same = [{k: p[k] for k in ("id", "prompt_ids", "chosen_ids", "rejected_ids")} for p in from_tokens] \
                == from_text
        else:
            same = from_tokens == from_text
        if not same:
            raise SystemExit(f"{name}: the stored ids differ from the text path's: the artifact is wrong")
        rows[name] = {"records": meta["rows"][name], "tokens": meta["tokens"][name], "tokenise_s": tokenise_s,
                      "load_s": load_s, "speedup": tokenise_s / load_s}
    file_bytes = {p.name: p.stat().st_size for p in sorted((work / "tokens").glob("*.parquet"))}

    print(f"{'split':<12}{'records':>9}{'tokens':>11}{'tokenise':>11}{'load':>9}{'ratio':>8}")
    for name, r in rows.items():
        print(f"{name:<12}{r['records']:>9}{r['tokens']:>11}{r['tokenise_s']:>10.2f}s{r['load_s']:>8.2f}s"
              f"{r['speedup']:>7.1f}x")
    print(f"encode once + write parquet (prepare's extra cost is at most this): {write_s:.2f} s; "
          f"files {sum(file_bytes.values()) / 1e6:.1f} MB")
    result = {"benchmark": "token_artifact", "command": " ".join([sys.executable, *sys.argv]),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.machine(),
              "python": platform.python_version(), "tokenizer": args.tokenizer, "items": [lo, hi],
              "repeats": args.repeats, "splits": rows, "write_s": write_s, "file_bytes": file_bytes,
              "definitions": {"tokenise_s": "one stage tokenising the .jsonl itself (before), per process",
                              "load_s": "one stage loading the ids prepare wrote (now), per process",
                              "write_s": "encoding once and writing the parquet files: at most prepare's extra "
                                         "cost (it encoded every record for its length checks before too)"}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
