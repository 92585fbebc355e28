"""End to end on the tiny default through DVC: a full `dvc repro`, a no-op second run, and which
stages a param change re-runs (changing dpo.* must never re-run SFT or the reference pass)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_cmd

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALL_STAGES = ["bootstrap", "synthesize", "sources@src0", "sources@src1", "prepare", "sft", "reference", "dpo",
              "grpo", "reward_model", "ppo", "rloo", "evaluate", "register"]


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w@-]+)'", output)


def set_param(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_full_repro_writes_every_artifact(tiny_repo):
    for rel in ("models/base/config.json", "models/base/tokenizer.json", "data/raw/sft.jsonl",
                "data/prepared/pref_train.jsonl", "models/sft/model.safetensors", "artifacts/ref_logps/train.pt",
                "models/dpo/model.safetensors", "models/grpo/model.safetensors", "artifacts/rollouts/config.json",
                "models/reward_model/model.safetensors", "models/ppo/model.safetensors", "models/rloo/model.safetensors",
                "artifacts/rollouts_ppo/config.json", "artifacts/rollouts_rloo/config.json",
                "reports/eval/index.html", "reports/eval/reward_model_calibration.png", "reports/registration.json"):
        assert (tiny_repo / rel).exists(), rel
    prepare = json.loads((tiny_repo / "metrics/prepare.json").read_text())
    assert prepare["read/total"] == prepare["kept/total"] + prepare["dropped/total"]
    sft = json.loads((tiny_repo / "metrics/sft.json").read_text())
    assert sft["eval/loss"] < sft["eval/loss_first"]
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(ALL_STAGES)
    evaluated = json.loads((tiny_repo / "metrics/eval.json").read_text())
    for name in ("grpo", "ppo", "rloo"):
        for key in ("reward_mean", "win_rate_vs_dpo", "kl_to_reference", "rm_score_mean"):
            assert f"eval/{name}/{key}" in evaluated, (name, key)
    assert "eval/sft/rm_score_mean" in evaluated and "eval/rm_score_mean" in evaluated
    page = (tiny_repo / "reports/eval/index.html").read_text()
    assert "GRPO response" in page and "PPO response" in page and "RLOO response" in page
    assert "Methods side by side" in page and "reward-model score" in page
    registration = json.loads((tiny_repo / "reports/registration.json").read_text())  # the version serves as evaluated
    assert registration["tags"]["serving/parity"] == "pass" and registration["alias"] == "challenger"
    assert registration["serving_parity"].startswith("4/4 held-out prompts identical (prompt tokens vs the token")


def test_register_candidate_grpo_registers_the_grpo_model_under_the_gates_names(tiny_repo, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root, symlinks=True)
    set_param(root, "register", "candidate", "grpo")
    assert stages_run(run_cmd(["dvc", "repro", "register"], root).stdout) == ["register"]
    registration = json.loads((root / "reports/registration.json").read_text())
    evaluated = json.loads((root / "metrics/eval.json").read_text())
    tags = registration["tags"]
    assert tags["alignflow/candidate"] == "grpo"
    assert float(tags["eval/reward_mean"]) == pytest.approx(evaluated["eval/grpo/reward_mean"])
    assert float(tags["eval/kl_to_reference"]) == pytest.approx(evaluated["eval/grpo/kl_to_reference"])
    assert tags["serving/parity"] == "pass"  # an online policy serves as evaluated too


def test_second_repro_does_nothing(tiny_repo):
    out = run_cmd(["dvc", "repro"], tiny_repo).stdout
    assert stages_run(out) == []
    assert "didn't change" in out


@pytest.mark.parametrize(
    "section, key, value, direct",
    [
        # register's lineage hash covers every params section but register.gate: it is directly stale too
        ("sft", "learning_rate", 1.0e-3, ["sft", "register"]),
        ("dpo", "beta", 0.2, ["dpo", "evaluate", "register"]),  # evaluate reads beta for the implicit reward
        ("dpo", "loss", "ipo", ["dpo", "register"]),
        ("reference", "batch_size", 3, ["reference", "register"]),
        ("evaluate", "temperature", 0.7, ["evaluate", "register"]),
        ("grpo", "beta", 0.1, ["grpo", "register"]),  # a GRPO change never touches SFT, reference or DPO
        ("reward_model", "learning_rate", 5.0e-4, ["reward_model", "register"]),  # nor does the reward model
        ("ppo", "kl_coef", 0.1, ["ppo", "rloo", "register"]),  # one section, two stages
        ("register", "candidate", "grpo", ["register"]),
        ("register", "gate", {"min_prompts": 10}, []),  # the gate is applied by promote, not by register
    ],
)
def test_param_change_invalidates_only_its_stages(tiny_repo, tmp_path, section, key, value, direct):
    """`--dry` shows the stages whose own deps changed (downstream ones follow once outputs change)."""
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root, symlinks=True)
    set_param(root, section, key, value)
    out = run_cmd(["dvc", "repro", "--dry"], root).stdout
    assert stages_run(out) == direct


def test_sft_change_reruns_sft_and_everything_after(tiny_repo, tmp_path):
    """A real SFT re-run, then every stage after it is stale (a dry run: running them all proves nothing more)."""
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root, symlinks=True)
    set_param(root, "sft", "learning_rate", 1.0e-3)
    assert stages_run(run_cmd(["dvc", "repro", "sft"], root).stdout) == ["sft"]
    out = run_cmd(["dvc", "repro", "--dry"], root).stdout
    assert sorted(stages_run(out)) == sorted(["reference", "dpo", "grpo", "reward_model", "ppo", "rloo",
                                              "evaluate", "register"])


def test_a_new_reward_model_reruns_only_what_depends_on_it(tiny_repo, tmp_path):
    """Issue 14 item 4: a retrained reward model makes ppo, rloo, evaluate and register stale; sft, reference,
    dpo and grpo never are."""
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root, symlinks=True)
    before = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    set_param(root, "reward_model", "center_rewards_coefficient", 0.1)
    assert stages_run(run_cmd(["dvc", "repro", "reward_model"], root).stdout) == ["reward_model"]
    after = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert after["reward_model"]["outs"] != before["reward_model"]["outs"]
    stale = stages_run(run_cmd(["dvc", "repro", "--dry"], root).stdout)
    assert sorted(stale) == ["evaluate", "ppo", "register", "rloo"]


def test_beta_sweep_reuses_sft_and_reference(tiny_repo, tmp_path):
    """A real second run with only dpo.beta changed: SFT and the reference artifact are not touched."""
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root, symlinks=True)
    before = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    set_param(root, "dpo", "beta", 0.3)
    out = run_cmd(["dvc", "repro"], root).stdout
    assert stages_run(out) == ["dpo", "evaluate", "register"]
    after = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for name in ("sft", "reference"):
        assert after[name]["outs"] == before[name]["outs"]
    assert after["dpo"]["outs"] != before["dpo"]["outs"]
    assert json.loads((root / "metrics/dpo.json").read_text())["beta"] == 0.3


def test_editing_a_user_source_reruns_prepare_and_everything_after(tiny_repo, tmp_path):
    """The user's data file is a DVC dependency: edit it and prepare re-runs, and every stage that reads
    the data that changed (here preference pairs only: not SFT) becomes stale; leave it alone, or only
    touch it, and nothing runs."""
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root, symlinks=True)
    mine = root / "data" / "mine.jsonl"
    pairs = [{"prompt": f"Sort ascending: {i} 1", "chosen": f"1 {i}", "rejected": f"{i} 1"} for i in range(2, 8)]
    mine.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["sources"].append({"path": "data/mine.jsonl", "kind": "preference"})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    out = run_cmd(["dvc", "repro", "prepare"], root).stdout
    assert stages_run(out) == ["sources@src2", "prepare"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert [d for d in lock["sources@src2"]["deps"] if d["path"] == "data/mine.jsonl"][0]["md5"]  # hashed by DVC
    kept = json.loads((root / "metrics/prepare.json").read_text())["file/data/mine.jsonl/kept"]
    assert kept == 6

    assert stages_run(run_cmd(["dvc", "repro", "prepare"], root).stdout) == []  # a no-op stays a no-op
    mine.touch()
    assert stages_run(run_cmd(["dvc", "repro", "prepare"], root).stdout) == []  # same bytes: still a no-op

    mine.write_text("".join(json.dumps(p) + "\n" for p in pairs[:4]))  # the user shrinks the file
    out = run_cmd(["dvc", "repro", "prepare"], root).stdout
    assert stages_run(out) == ["sources@src2", "prepare"]
    assert json.loads((root / "metrics/prepare.json").read_text())["file/data/mine.jsonl/kept"] == 4
    # only the preference data changed: the stages that read it are stale, SFT is not (its files are unchanged;
    # register follows once the model it registers changes)
    stale = stages_run(run_cmd(["dvc", "repro", "--dry"], root).stdout)
    assert "sft" not in stale
    assert set(stale) - {"register"} == {"reference", "dpo", "grpo", "reward_model", "ppo", "rloo", "evaluate"}


def commit_all(root: Path) -> None:
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "pipeline run"]):
        run_cmd(cmd, root)


def test_a_failed_stage_loses_nothing(tiny_repo, tmp_path):
    """dvc repro removes a stage's outputs before running it; when the stage fails they come back by themselves, as
    dvc.lock records them: the model from the DVC cache, metrics and plots (uncached, and not committed here) from
    the copy the stage kept when it last succeeded. Leftovers of a killed write are swept when the stage starts."""
    import subprocess

    from conftest import pipeline_env

    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root, symlinks=True)
    outs = ["models/dpo/model.safetensors", "models/dpo/config.json", "metrics/dpo.json", "plots/dpo.csv"]
    before = {p: (root / p).read_bytes() for p in outs}
    lock_before = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["dpo"]
    leftover = root / "models/.dpo.tmp-killed"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a model")
    params_before = (root / "params.yaml").read_text()
    set_param(root, "dpo", "learning_rate", 1000.0)  # diverges within a few steps (no NaN needed)
    proc = subprocess.run(["dvc", "repro", "dpo"], cwd=root, env=pipeline_env(root), capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and ("training diverged" in output or "non-finite loss" in output), output[-2000:]
    put_back = re.search(r"dpo: failed; put back its last good outputs \(as dvc.lock records them\): (.*)", output)
    assert put_back and set(put_back.group(1).split(", ")) == {"models/dpo", "metrics/dpo.json", "plots/dpo.csv"}, \
        output[-2000:]
    assert {p: (root / p).read_bytes() for p in outs} == before
    assert yaml.safe_load((root / "dvc.lock").read_text())["stages"]["dpo"] == lock_before  # lock kept
    assert not leftover.exists()
    (root / "params.yaml").write_text(params_before)
    assert stages_run(run_cmd(["dvc", "repro", "--dry"], root).stdout) == []  # everything as before


def _experiments(obj, found=None) -> list[tuple[dict, dict]]:
    """(params, metrics) of every experiment in `dvc exp show --json` output."""
    found = [] if found is None else found
    if isinstance(obj, dict):
        data = obj.get("data")
        if isinstance(data, dict) and "params" in data and "metrics" in data:
            params = data["params"].get("params.yaml", {}).get("data", {})
            metrics = data["metrics"].get("metrics/eval.json", {}).get("data", {})
            found.append((params, metrics))
        for v in obj.values():
            _experiments(v, found)
    elif isinstance(obj, list):
        for v in obj:
            _experiments(v, found)
    return found


def test_a_queued_experiment_logs_to_the_project_and_carries_its_metrics(tiny_repo, tmp_path):
    from conftest import pipeline_env
    from mlflow import MlflowClient

    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root, symlinks=True)
    commit_all(root)
    env = pipeline_env(root)
    env.pop("MLFLOW_TRACKING_URI")  # the default: the project's mlflow.db, whatever the workspace
    # an evaluate-only change: the queued workspace runs evaluate and register (a stage that opens an MLflow
    # run with artifacts), not a training stage again (test_beta_sweep_reuses_sft_and_reference re-trains dpo)
    run_cmd(["dvc", "exp", "run", "--queue", "-S", "evaluate.temperature=0.7", "--name", "temp07"], root, env=env)
    run_cmd(["dvc", "exp", "run", "--run-all", "-j", "1"], root, env=env, timeout=900)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "alignflow"]
    eval_runs = client.search_runs([experiment.experiment_id], "tags.`alignflow/stage` = 'evaluate'")
    assert len(eval_runs) == 2  # the base run and the queued experiment's, in the project's store
    assert all(not r.info.artifact_uri.startswith(str(root / ".dvc")) for r in eval_runs)  # artifacts too
    exps = _experiments(json.loads(run_cmd(["dvc", "exp", "show", "--json"], root, env=env).stdout))
    swept = [m for p, m in exps if p.get("evaluate", {}).get("temperature") == 0.7]
    assert swept and all(isinstance(m.get("eval/reward_mean"), float) for m in swept)  # metrics, not "!"


def _screenshot_purple(chromium: str, page: Path, shot: Path) -> int:
    """Pixels in DVC's colour for the workspace's series (#945dd6) on a headless Chromium screenshot of page."""
    import subprocess

    from PIL import Image

    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,1000", "--virtual-time-budget=10000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("RGB")
    pixels = image.get_flattened_data() if hasattr(image, "get_flattened_data") else image.getdata()
    return sum(1 for r, g, b in pixels if abs(r - 148) < 40 and abs(g - 93) < 40 and abs(b - 214) < 40)


def test_dvc_plots_render_offline_with_titled_axes(tiny_repo, tmp_path):
    """`dvc plots show` draws the curves without a network (configs/dvc/plots.html inlines Vega), every plot has its
    axes and titles, and DVC's stock page (Vega from a CDN) stays blank here: the check can fail."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no headless Chromium on this machine")
    curves = ["sft_loss", "dpo_loss", "dpo_rewards", "grpo_reward", "eval_reward_sft_vs_dpo"]  # the images aside
    out = tmp_path / "plots"
    run_cmd(["dvc", "plots", "show", "-o", str(out), *curves], tiny_repo)
    page = (out / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and 'src="http' not in page
    specs = json.loads(run_cmd(["dvc", "plots", "show", "--json"], tiny_repo).stdout)["data"]
    vega = {name: p[0]["content"] for name, p in specs.items() if p and p[0]["type"] == "vega"}
    assert sorted(vega) == ["dpo_loss", "dpo_rewards", "eval_reward_sft_vs_dpo", "grpo_reward", "sft_loss"]
    for name, spec in vega.items():  # explicit axes with titles, never DVC's fallback `y`
        assert spec["title"]["text"] and spec["encoding"]["x"]["title"] and spec["encoding"]["y"]["title"] != "y", name
    assert _screenshot_purple(chromium, out / "index.html", tmp_path / "offline.png") > 2000

    from dvc_render.html import PAGE_HTML  # DVC's own page: Vega from its CDN

    (tmp_path / "stock.html").write_text(PAGE_HTML)
    stock = tmp_path / "stock"
    run_cmd(["dvc", "plots", "show", "-o", str(stock), "--html-template", str(tmp_path / "stock.html"), *curves],
            tiny_repo)
    assert _screenshot_purple(chromium, stock / "index.html", tmp_path / "stock.png") < 200

