"""The `alignflow` command: register a model, promote it past the gate, roll back, show the registry.

    alignflow register [--params params.yaml]            # the DVC `register` stage
    alignflow promote  [--version N] [--dry-run] [--json]
    alignflow rollback
    alignflow status   [--json]

Exit codes: 0 success (promote: promoted, already champion, or --dry-run whatever the decision);
1 error (bad params, no challenger, nothing to roll back to, MLflow failure, bad arguments);
2 promote: the gate rejected the candidate (champion unchanged, decision recorded on the candidate).
The tracking/registry store is MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from components import register

EXIT_OK, EXIT_ERROR, EXIT_REJECTED = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 on a usage error, which would read as "gate rejected": make it 1.
    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alignflow", description=__doc__.splitlines()[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("register", help="log models/dpo to MLflow, register a version, alias it challenger")
    register.add_register_arguments(p)

    p = sub.add_parser("promote", help="gate the challenger against the champion; move champion if it passes")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--version", default=None, help="candidate version (default: the challenger alias)")
    p.add_argument("--dry-run", action="store_true", help="decide and print; move no alias, write no tag (re-scores are still cached)")
    p.add_argument("--data-dir", default="data/prepared", help="held-out prompts: <data-dir>/pref_eval.jsonl")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")

    p = sub.add_parser("rollback", help="move champion back to the version it replaced")
    p.add_argument("--params", default="params.yaml")

    p = sub.add_parser("status", help="registered versions, aliases, key metrics")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--json", action="store_true")
    return parser


# ----------------------------------------------------------------------------- output


def format_decision(result: dict) -> str:
    champ = f"v{result['champion']}" if result["champion"] else "none"
    head = f"{result['model_name']}: candidate v{result['candidate']} vs champion {champ}"
    if result.get("eval_set"):
        head += (f" on {result['num_prompts']} held-out prompts (eval set {result['eval_set']}): "
                 f"mean score {result['candidate_mean']:.4f} vs {result['champion_mean']:.4f}")
    lines = [head, f"  {'check':<6}  detail"]
    lines += [f"  {r.split(' ', 1)[0]:<6}  {r.split(' ', 1)[1]}" for r in result["reasons"]]
    verdict = {"promoted": f"PROMOTED: champion {champ} -> v{result['candidate']}",
               "rejected": f"REJECTED: champion stays {champ}",
               "noop": "NOTHING TO DO"}[result["decision"]]
    if result["dry_run"] and result["decision"] != "noop":
        verdict = f"DRY RUN, would be {verdict} (nothing changed)"
    return "\n".join([*lines, verdict])


def format_status(result: dict) -> str:
    aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(result["aliases"].items())) or "none"
    lines = [f"{result['model_name']}  aliases: {aliases}",
             f"  {'ver':>4}  {'aliases':<20} {'reward':>7} {'sft':>7} {'win':>6} {'kl':>7} {'len':>5}  "
             f"{'decision':<10} {'created':<25} commit"]
    for row in result["versions"]:
        m = row["metrics"]

        def cell(key: str, width: int, digits: int = 3, m=m) -> str:
            return f"{m[key]:>{width}.{digits}f}" if key in m else f"{'-':>{width}}"

        lines.append(
            f"  {row['version']:>4}  {','.join(row['aliases']):<20} {cell('eval/reward_mean', 7)} "
            f"{cell('eval/sft/reward_mean', 7)} {cell('eval/win_rate_vs_sft', 6)} "
            f"{cell('eval/kl_to_reference', 7, 2)} {cell('eval/length_ratio', 5, 2)}  "
            f"{row['decision'] or '-':<10} {row['created']:<25} {row['git_commit'][:10]}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands


def _run(args) -> int:
    from components.core.config import load_params

    p = load_params(args.params)
    name = p.registry.model_name
    if args.command == "register":
        result = register.register_from_params(args.params, args.model_dir, args.metrics, args.eval_report, args.out)
        print(json.dumps({k: result[k] for k in ("name", "version", "run_id", "model_uri", "alias")}))
        return EXIT_OK
    if args.command == "promote":
        e = p.evaluate
        result = register.promote(
            name, p.registry.gate.model_dump(), version=args.version, dry_run=args.dry_run,
            pref_eval_path=os.path.join(args.data_dir, "pref_eval.jsonl"), num_prompts=e.num_prompts,
            judge=e.judge, judge_path=e.judge_path, max_new_tokens=e.max_new_tokens, temperature=e.temperature,
            top_p=e.top_p, batch_size=e.batch_size, bootstrap_samples=e.bootstrap_samples, seed=p.seed,
        )
        print(json.dumps(result, indent=2) if args.json else format_decision(result))
        return EXIT_OK if result["passed"] or args.dry_run else EXIT_REJECTED
    if args.command == "rollback":
        result = register.rollback(name)
        print(f"{name}: champion v{result['demoted']} -> v{result['champion']} (rolled back)")
        return EXIT_OK
    if args.command == "status":
        result = register.status(name)
        print(json.dumps(result, indent=2) if args.json else format_status(result))
        return EXIT_OK
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    from components.core.config import ParamsError
    from components.core.logs import setup_logging
    from components.register import RegistryError

    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (1): return it like any other outcome
        return int(e.code or 0)
    setup_logging()
    try:
        return _run(args)
    except (ParamsError, RegistryError, FileNotFoundError) as e:
        print(f"alignflow {args.command}: error: {e}", file=sys.stderr)
    except Exception as e:  # unexpected: keep the traceback, still exit 1 (2 means "rejected")
        traceback.print_exc()
        print(f"alignflow {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
