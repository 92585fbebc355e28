"""What a stage prints and records about its run: one short closing line, none of the third-party notices a user
cannot act on, and a git/dirty that means the user's tree."""

from __future__ import annotations

import logging

from components.core.ops import logs


def test_the_closing_line_is_short_and_names_the_file_with_everything():
    result = {"train/loss": 0.5488559603691101, "eval/loss": 0.61234, "steps": 500, "seconds": 31.64,
              **{f"other/{i}": float(i) for i in range(200)}}
    line = logs.result_line("sft", result, ("train/loss", "eval/loss", "steps", "missing"), "metrics/sft.json")
    assert line == "sft done in 31.6 s: train/loss 0.5489, eval/loss 0.6123, steps 500 (all: metrics/sft.json)"
    long = logs.result_line("evaluate", {f"eval/k{i}": 0.1 * i for i in range(60)}, tuple(f"eval/k{i}" for i in range(60)),
                            "metrics/eval.json")
    assert len(long) <= logs.RESULT_LINE_CHARS and long.endswith(", … (all: metrics/eval.json)")


def test_accelerates_expected_notices_are_dropped_and_its_other_warnings_kept(caplog):
    logs.quiet_third_party()
    other = logging.getLogger("accelerate.utils.other")
    launch = logging.getLogger("accelerate.commands.launch")
    with caplog.at_level(logging.WARNING):
        other.warning("Removed shared tensor {'lm_head.weight'} while saving. This should be OK")
        other.warning("[RANK 0] Removed shared tensor {'lm_head.weight'} while saving.")  # accelerate's adapter
        launch.warning("The following values were not passed to `accelerate launch` and had defaults used instead:\n"
                       "\t`--num_cpu_threads_per_process` was set to `2` to improve out-of-box performance")
        launch.warning("The following values were not passed to `accelerate launch` and had defaults used instead:\n"
                       "\t`--dynamo_backend` was set to a value of `'no'`\n"
                       "\t`--num_cpu_threads_per_process` was set to `2` to improve out-of-box performance")
        other.warning("Detected kernel version 4.0, which is below the recommended minimum")
    kept = [r.getMessage().splitlines()[0] for r in caplog.records]
    assert kept == ["The following values were not passed to `accelerate launch` and had defaults used instead:",
                    "Detected kernel version 4.0, which is below the recommended minimum"]
    logs.quiet_third_party()  # idempotent: one filter per logger
    assert sum(isinstance(f, logs._Drop) for f in other.filters) == 1


def test_git_dirty_is_the_users_tree_not_what_the_pipeline_rewrites(tmp_path):
    import subprocess

    from components.core.ops.tracking import git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for rel in ("dvc.lock", "metrics/sft.json", "plots/sft.csv", "params.yaml"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("v1\n")
    git("add", "-A")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "init")
    for rel in ("dvc.lock", "metrics/sft.json", "plots/sft.csv"):  # what a stage run rewrites
        (tmp_path / rel).write_text("v2\n")
    assert git_state(tmp_path)["git/dirty"] == "false"
    (tmp_path / "params.yaml").write_text("v2\n")  # what the user changed
    assert git_state(tmp_path)["git/dirty"] == "true"


def test_a_progress_bar_in_a_log_file_redraws_on_lines_of_its_own():
    import io

    out = io.StringIO()
    lines = logs._Lines(out)
    for chunk in ("\rsft:   0%| | 0/500", "\rsft:  16%| | 79/500 [loss=1.18]", "\rsft: 100%| | 500/500", "\n"):
        lines.write(chunk)
    lines.write("2026-12-02 INFO sft done\n")
    assert out.getvalue().splitlines() == ["sft:   0%| | 0/500", "sft:  16%| | 79/500 [loss=1.18]",
                                           "sft: 100%| | 500/500", "2026-12-02 INFO sft done"]
