"""Every command in the README's (and flows/README's) shell blocks, checked against what would run it: the
project's own argument parsers (`alignflow`, `python -m flows.pipeline`), DVC's parser (and its sweep grammar:
`-S 'k=a,b'` is a grid of two), the files and params keys they name. Commands that need what CI has not (a GPU,
the network, a container runtime, a long-running server) are listed as such here, so a new kind of command must
be placed somewhere: an unknown program fails the test. The commands that run the pipeline are run for real by
the integration tests (test_dvc, test_flow, test_serving, test_real_model).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "flows/README.md")
# needs what CI does not have: checked for the files they name only
ELSEWHERE = {"pip": "the network", "vllm": "a GPU", "docker": "a container runtime",
             "prefect": "a Prefect server (tests/integration/test_team.py runs one)", "git": "a remote"}


def shell_commands(doc: str) -> list[str]:
    """The simple commands of a document's ```bash blocks: continuations joined, comments, `&&`, `&` split off."""
    text = (ROOT / doc).read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            code = " ".join(shlex.split(line, comments=True))  # quotes kept per token below
            if not code:
                continue
            tokens = shlex.split(line, comments=True)
            part: list[str] = []
            for token in [*tokens, "&&"]:
                if token in ("&&", "&", ";", "||"):
                    if part:
                        commands.append(shlex.join(part))
                    part = []
                else:
                    part.append(token)
    return commands


ALL = [(doc, cmd) for doc in DOCS for cmd in shell_commands(doc)]


def params_keys() -> set[str]:
    def walk(d: dict, prefix: str = "") -> set[str]:
        keys = set()
        for k, v in d.items():
            keys.add(prefix + k)
            if isinstance(v, dict):
                keys |= walk(v, f"{prefix}{k}.")
        return keys

    return walk(yaml.safe_load((ROOT / "params.yaml").read_text()))


def check_dvc(args: list[str]) -> None:
    from dvc.cli.parser import get_main_parser
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps

    get_main_parser().parse_args(args)  # exits (SystemExit) on an unknown command or option
    sets = [args[i + 1] for i, a in enumerate(args) if a in ("-S", "--set-param")]
    for value in sets:
        key, _, values = value.partition("=")
        assert key in params_keys(), f"-S {value}: params.yaml has no {key}"
        if "," in values:  # a grid: one experiment per value (`-S k=a -S k=b` would keep only b)
            assert "--queue" in args, f"dvc exp run -S {value}: a sweep needs --queue"
            assert len(get_hydra_sweeps(to_path_overrides([value]))) == len(values.split(","))
    keys = [k for k in sets]
    assert len({k.partition("=")[0] for k in keys}) == len(keys), f"{args}: one -S per key (the last one wins)"


def check(cmd: str) -> None:
    tokens = shlex.split(cmd)
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # VAR=value cmd
        tokens = tokens[1:]
    program, args = tokens[0], tokens[1:]
    if program in ("export", ".", "source", "cd"):
        return
    if program in ELSEWHERE:
        named = [a for a in args if "/" in a and not a.startswith(("http", "-"))]
        for path in named:
            assert (ROOT / path).exists() or path.endswith("/") or "." not in path, f"{cmd}: {path} missing"
        return
    if program.startswith("./") or program == "bash":
        script = program if program.startswith("./") else args[0]
        assert (ROOT / script).is_file(), f"{cmd}: no {script}"
        mode = args[1] if program == "bash" and len(args) > 1 else None
        if mode:
            assert f'"{mode}"' in (ROOT / script).read_text() or f"= {mode}" in (ROOT / script).read_text(), cmd
        return
    if program == "cp":
        assert (ROOT / args[0]).is_file(), f"{cmd}: no {args[0]}"
        return
    if program == "dvc":
        check_dvc(args)
        return
    if program == "alignflow":
        from components import cli

        cli._parser().parse_args(args)
        return
    if program in ("python", "torchrun"):
        module = args[args.index("-m") + 1]
        rest = args[args.index("-m") + 2:]
        if module == "flows.pipeline":
            from flows import pipeline

            argv = rest if rest and not rest[0].startswith("-") else ["run", *rest]
            pipeline._parser().parse_args(argv)
            return
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{cmd}: no module {module}"
        return
    if program == "curl":
        body = json.loads(args[args.index("-d") + 1])
        assert body["messages"] and all({"role", "content"} <= set(m) for m in body["messages"]), cmd
        assert any(a.endswith("/invocations") for a in args), cmd
        return
    raise AssertionError(f"{cmd}: no check for `{program}`; add one (or list it in ELSEWHERE with the reason)")


@pytest.mark.parametrize("doc, cmd", ALL, ids=[f"{d}: {c[:60]}" for d, c in ALL])
def test_every_documented_command_is_one_that_works(doc, cmd):
    try:
        check(cmd)
    except SystemExit as e:  # an argparse rejection
        raise AssertionError(f"{doc}: `{cmd}` is rejected by its parser (exit {e.code})") from e


def test_the_checks_catch_what_was_wrong_before():
    with pytest.raises(AssertionError, match="one -S per key"):
        check("dvc exp run -S dpo.beta=0.05 -S dpo.beta=0.2 --queue")  # DVC keeps only 0.2
    with pytest.raises(AssertionError, match="params.yaml has no dpo.betta"):
        check("dvc exp run -S dpo.betta=0.1")
    with pytest.raises(SystemExit):
        check("alignflow promote --bogus")
    with pytest.raises(AssertionError, match="no check for `frobnicate`"):
        check("frobnicate --now")
    assert len(ALL) > 20  # the blocks were found


def test_the_readme_results_table_is_the_recorded_run():
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts/results_table.py")
    results_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_table)
    recorded = json.loads(results_table.RECORD.read_text())
    assert results_table.render(recorded) in (ROOT / "README.md").read_text(), \
        "README's results table: paste `python scripts/results_table.py` after `--record`ing a fresh run"
