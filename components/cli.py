"""The `alignflow` command: register a model, promote it past the gate, roll back, show the registry.

    alignflow register [--params params.yaml]            # the DVC `register` stage
    alignflow promote  [--version N] [--dry-run] [--json]
    alignflow rollback
    alignflow status   [--json]
    alignflow summary  [--json]                          # headline results of the last pipeline run
    alignflow serve-check VERSION|ALIAS [--json]         # does the version serve as it was evaluated? (recorded)
    alignflow serve    [--alias champion] [--host 127.0.0.1] [--port 5000]   # mlflow models serve, OpenAI chat
    alignflow export   VERSION|ALIAS --out DIR           # a plain Hugging Face directory + alignflow_lineage.json

Exit codes: 0 success (promote: promoted, already champion, or --dry-run whatever the decision);
1 error (bad params, no challenger, nothing to roll back to, MLflow failure, bad arguments);
2 promote: the gate rejected the candidate (champion unchanged, decision recorded on the candidate);
  serve-check: the version does not serve as it was evaluated (recorded on it).
The tracking/registry store is MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from components import register
from components.core.release import registry

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

    p = sub.add_parser("summary", help="headline results of the last pipeline run, read from its outputs")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("serve-check", help="serving parity of a version: served greedy answers = the pipeline's")
    p.add_argument("ref", metavar="VERSION|ALIAS", help="a version number (3, v3) or an alias (champion)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--data-dir", default="data/prepared", help="held-out prompts: <data-dir>/pref_eval.jsonl")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("serve", help="serve a version as an OpenAI-style chat model (mlflow models serve)")
    p.add_argument("--alias", default="champion", help="alias or version number to serve (default: champion)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--env-manager", default="local", choices=["local", "virtualenv", "uv", "conda"],
                   help="local: this environment (default); the others build one from the model's requirements")
    p.add_argument("--workers", type=int, default=None, help="server processes (each loads the model)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--print-command", action="store_true", help="print the mlflow command instead of running it")

    p = sub.add_parser("export", help="a version or alias as a plain Hugging Face directory (vLLM, TGI, transformers)")
    p.add_argument("ref", metavar="VERSION|ALIAS")
    p.add_argument("--out", required=True, help="directory to write (must be empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--params", default="params.yaml")
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


def read_summary(metrics_dir: str = "metrics", report: str = "reports/eval/index.html",
                 registration: str = "reports/registration.json") -> dict:
    """What the last pipeline run produced, from its output files (absent ones are None)."""
    def load(path: str) -> dict | None:
        return json.loads(open(path).read()) if os.path.exists(path) else None

    return {"sft": load(os.path.join(metrics_dir, "sft.json")), "dpo": load(os.path.join(metrics_dir, "dpo.json")),
            "eval": load(os.path.join(metrics_dir, "eval.json")), "registration": load(registration),
            "report": report if os.path.exists(report) else None}


def format_summary(s: dict, tracking_uri: str) -> str:
    """A few lines a person reads at a glance: SFT, each trained policy, the report, the registry."""
    def pct(v: float) -> str:
        return f"{v:.1%}"

    def ci(m: dict, key: str, fmt) -> str:
        return f"[{fmt(m[key + '_ci_low'])}, {fmt(m[key + '_ci_high'])}]" if key + "_ci_low" in m else ""

    lines = ["alignflow: results of the last pipeline run"]
    e, sft = s["eval"] or {}, s["sft"] or {}
    if sft:
        parts = [f"held-out loss {sft['eval/loss_first']:.2f} -> {sft['eval/loss']:.2f}"] if "eval/loss" in sft else []
        if "eval/sft/reward_mean" in e:
            parts.append(f"judge reward {e['eval/sft/reward_mean']:.3f}")
        if "eval/sft/reward_eq_1" in e:
            parts.append(f"exact {pct(e['eval/sft/reward_eq_1'])}")
        steps = sft.get("steps", "?")
        lines.append(f"  {'SFT':<9} " + ("   ".join(parts) or f"{steps} steps"))
    else:
        lines.append(f"  {'SFT':<9} not run yet (dvc repro sft)")
    if e:
        lines.append(
            f"  {'DPO':<9} judge reward {e['eval/reward_mean']:.3f} (Δ {e['eval/reward_delta']:+.3f} "
            f"{ci(e, 'eval/reward_delta', lambda v: f'{v:+.3f}')})   win rate vs SFT {pct(e['eval/win_rate_vs_sft'])} "
            f"[{pct(e['eval/win_rate_ci_low'])}, {pct(e['eval/win_rate_ci_high'])}]"
            + (f"   exact {pct(e['eval/reward_eq_1'])}" if "eval/reward_eq_1" in e else ""))
        lines.append(f"  {'':<9} preference accuracy {pct(e['eval/rewards/accuracies'])}   KL to SFT "
                     f"{e['eval/kl_to_reference']:.2f} nats   length x{e['eval/length_ratio']:.2f}   "
                     f"({int(e['eval/num_prompts'])} held-out prompts)")
    else:
        lines.append(f"  {'DPO':<9} not evaluated yet (dvc repro evaluate)")
    for name in ("grpo", "ppo", "rloo"):
        g = f"eval/{name}/"
        if g + "reward_mean" not in e:
            continue
        rm = f"   reward-model score {e[g + 'rm_score_mean']:+.2f}" if g + "rm_score_mean" in e else ""
        lines.append(
            f"  {name.upper():<9} judge reward {e[g + 'reward_mean']:.3f} (Δ {e[g + 'reward_delta']:+.3f} "
            f"{ci(e, g + 'reward_delta', lambda v: f'{v:+.3f}')})   win rate vs SFT {pct(e[g + 'win_rate_vs_sft'])}, "
            f"vs DPO {pct(e[g + 'win_rate_vs_dpo'])}" + (f"   exact {pct(e[g + 'reward_eq_1'])}" if g + "reward_eq_1" in e else "")
            + f"   KL to SFT {e[g + 'kl_to_reference']:.2f}   length x{e[g + 'length_ratio']:.2f}{rm}")
    lines.append(f"  {'report':<9} {s['report'] or 'not written yet'}")
    r = s["registration"]
    if r:
        lines.append(f"  {'registry':<9} {r['name']} v{r['version']} = {r['alias']} in {tracking_uri}; "
                     "gate it with `alignflow promote`, list with `alignflow status`")
    else:
        lines.append(f"  {'registry':<9} nothing registered yet (dvc repro register)")
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
        result = registry.promote(name, p.registry.gate, p.evaluate, version=args.version, dry_run=args.dry_run,
                                  pref_eval_path=os.path.join(args.data_dir, "pref_eval.jsonl"), seed=p.seed)
        print(json.dumps(result, indent=2) if args.json else format_decision(result))
        return EXIT_OK if result["passed"] or args.dry_run else EXIT_REJECTED
    if args.command == "rollback":
        result = registry.rollback(name)
        print(f"{name}: champion v{result['demoted']} -> v{result['champion']} (rolled back)")
        return EXIT_OK
    if args.command == "summary":
        from components.core.ops import tracking

        result = read_summary()
        print(json.dumps(result, indent=2) if args.json else format_summary(result, tracking.tracking_uri()))
        return EXIT_OK
    if args.command == "status":
        result = registry.status(name)
        print(json.dumps(result, indent=2) if args.json else format_status(result))
        return EXIT_OK
    return _run_serving(args, p)


def _run_serving(args, p) -> int:
    from components.core.release import deploy

    name = p.registry.model_name
    if args.command == "serve-check":
        result = deploy.serve_check(name, args.ref, os.path.join(args.data_dir, "pref_eval.jsonl"),
                                    p.registry.parity_prompts, p.evaluate.max_new_tokens, p.model.trust_remote_code)
        verdict = "PASS" if result["passed"] else "FAIL"
        print(json.dumps(result, indent=2) if args.json else f"{name} v{result['version']}: serving parity {verdict}: "
              + result["detail"] + "".join(f"\n  {m}" for m in result["mismatches"][1:5]))
        return EXIT_OK if result["passed"] else EXIT_REJECTED
    if args.command == "serve":
        cmd = deploy.serve_command(name, args.alias, args.host, args.port, args.env_manager, args.workers)
        if args.print_command:
            print(" ".join(cmd))
            return EXIT_OK
        os.environ.setdefault("MLFLOW_TRACKING_URI", deploy.registry_uri())  # the server reads the same registry
        print(f"alignflow serve: {name}@{args.alias} on http://{args.host}:{args.port}/invocations "
              "(OpenAI-style chat; Ctrl-C stops)", file=sys.stderr, flush=True)
        os.execv(cmd[0], cmd)  # the server replaces this process: signals and exit code are mlflow's
    if args.command == "export":
        result = deploy.export(name, args.ref, args.out, force=args.force)
        print(f"{name} v{result['version']} -> {result['out']} (lineage: {deploy.LINEAGE_FILE})")
        return EXIT_OK
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    from components.core.config import ParamsError
    from components.core.ops.logs import setup_logging
    from components.core.release.registry import RegistryError

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
