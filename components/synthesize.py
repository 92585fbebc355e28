"""synthesize stage: the embedded default task's data (core/sorting.py), in the formats users bring.

SFT demonstrations carry realistic mistakes at rate `demo_noise` (an adjacent swap, a dropped or
duplicated item, an off-by-one value, the list left unsorted), so an SFT model *samples* those
mistakes at about that rate. Preference pairs put the correct answer against one such mistake:
exactly the signal DPO needs to push the mistakes' probability down.

`python -m components.synthesize --params params.yaml` writes `data/raw/sft.jsonl` (TRL `messages`
format) and `data/raw/preferences.jsonl` (TRL `prompt/chosen/rejected`, conversational), the same
public formats users bring. With `synthetic.tool_demos` > 0, sft.jsonl also holds demonstrations of the tool task
(core/lockers.py: tell a locker's code, an `open_locker` tool offered; TRL `messages` + `tools`, OpenAI tool
calls): a share `tool_call_share` calls it and copies its result, the rest answer directly. They teach the model the
tool-call format the `lockers` environment (`grpo.environment`, `grpo.prompts: tools`) rewards.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from components.core.config import Runtime, SyntheticConfig
from components.core.lockers import tool_demos
from components.core.ops.io import write_jsonl
from components.core.ops.logs import stage_main
from components.core.sorting import generate, reward


def run(cfg: SyntheticConfig, *, out_dir: str = "data/raw", runtime: Runtime = Runtime()) -> dict:
    """Write the task's SFT and preference files to out_dir per `cfg` (the `synthetic` params section)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.enabled:
        (out / "README.txt").write_text("synthetic.enabled is false: bring your own data via data.sources\n")
        return {"sft": 0, "preference": 0}
    sft, preferences = generate(cfg.n_sft, cfg.n_preference, cfg.min_items, cfg.max_items, cfg.max_value,
                                cfg.demo_noise, runtime.seed)
    noisy = sum(
        reward(r["messages"][0]["content"], r["messages"][1]["content"]) < 1.0 for r in sft
    )
    tools = tool_demos(cfg.tool_demos, cfg.tool_call_share, runtime.seed)
    write_jsonl(out / "sft.jsonl", sft + tools)
    write_jsonl(out / "preferences.jsonl", preferences)
    return {"sft": len(sft) + len(tools), "preference": len(preferences), "sft_noisy": noisy,
            **({"tool_demos": len(tools), "tool_calls": sum(len(r["messages"]) > 2 for r in tools)} if tools else {})}


@stage_main("synthesize")
def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/raw")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    result = run(p.synthetic, out_dir=args.out, runtime=Runtime.of(p))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
