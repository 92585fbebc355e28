"""Shared fixtures. Everything is built offline; no hub access."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

# test modules share helpers by name (`from test_prepare import records`, `from test_training import stage`) from
# whichever directory they sit in
for _dir in ("unit", "integration"):
    sys.path.insert(0, str(Path(__file__).parent / _dir))


PLAIN_CHATML = ("{% for message in messages %}"
                "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A small byte-level BPE tokenizer with plain ChatML (no tools: the data tests count tool records a template
    cannot render as dropped), saved as a HF tokenizer dir.

    Byte-level: any text encodes (unseen words fall back to byte tokens), so token counts are real.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "What is the capital of France? Paris is the capital of France.",
        "Sort the numbers 3 1 2 into 1 2 3. Hello! How can I help you today?",
        "user assistant system You are a helpful assistant. Yes. No.",
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|im_end|>")
    fast.chat_template = PLAIN_CHATML
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------- pipeline fixtures

import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_PARAMS = REPO / "configs" / "params" / "tiny.yaml"


def pipeline_env(root: Path) -> dict[str, str]:
    """Environment for stage subprocesses: this venv first on PATH, offline, tracking in `root`."""
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db",
        GIT_AUTHOR_NAME="alignflow-tests", GIT_AUTHOR_EMAIL="tests@alignflow.invalid",
        GIT_COMMITTER_NAME="alignflow-tests", GIT_COMMITTER_EMAIL="tests@alignflow.invalid",
        ALIGNFLOW_LOG_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false",
    )
    for key in ("ALIGNFLOW_CRASH_AT_STEP", "ALIGNFLOW_CRASH_MARKER", "ALIGNFLOW_PARENT_RUN_ID", "ALIGNFLOW_FLOW_RUN_ID"):
        env.pop(key, None)
    return env


def make_repo_copy(dst: Path, params: Path = TINY_PARAMS) -> Path:
    """A fresh git + DVC checkout of this project's tracked (and new, not ignored) files, with `params`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        # outputs of an earlier run (dvc.lock, committed metrics/plots) stay out: the copy starts clean
        if src.is_file() and not rel.startswith(("tests/", "benchmarks/", "metrics/", "plots/", "reports/")) \
                and rel != "dvc.lock":
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    shutil.copy2(params, dst / "params.yaml")
    env = pipeline_env(dst)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dst, env=env, check=True, capture_output=True)
    return dst


def torchrun(nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` on a free port: test files run side by side (xdist), so no fixed ports."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]


@contextlib.contextmanager
def competing_load(processes: int = 2):
    """Busy loops beside a stage, as on a machine shared with other jobs: under such load GRPO's weights differed
    run to run before the stages switched on deterministic kernels (components/core/ops/determinism.py)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run_cmd(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or pipeline_env(cwd), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A repo copy on the tiny params after one full `dvc repro` (shared: copy it before mutating)."""
    root = make_repo_copy(tmp_path_factory.mktemp("tiny_repo"))
    run_cmd(["dvc", "repro"], root)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """models/base and data/prepared for the tiny params, built in-process (no DVC): for stage tests."""
    from components import bootstrap, prepare, synthesize
    from components.core.config import Runtime, SourceConfig, load_params

    root = tmp_path_factory.mktemp("tiny_data")
    p = load_params(TINY_PARAMS)
    runtime = Runtime.of(p)
    bootstrap.run(p.model, synthetic=p.synthetic, out_dir=str(root / "models/base"), runtime=runtime)
    synthesize.run(p.synthetic, out_dir=str(root / "data/raw"), runtime=runtime)
    data = p.data.model_copy(update={"sources": [SourceConfig(path=str(root / "data/raw"))]})
    prepare.run(data, tokenizer_path=str(root / "models/base"), out_dir=str(root / "data/prepared"),
                metrics_path=str(root / "metrics/prepare.json"), runtime=runtime)
    shutil.copy2(TINY_PARAMS, root / "params.yaml")
    return root


# ----------------------------------------------------------------------------- parallel runs (pytest-xdist)

# Heaviest first, so that the two workers of `scripts/test.sh` finish together: xdist hands each worker two
# scopes at the start (here pipeline + grpo, team + training), then one at a time.
HEAVY_FIRST = ("pipeline", "test_team.py", "test_grpo.py", "test_training.py", "test_real_model.py", "test_rlhf.py")
PIPELINE_FILES = ("test_dvc.py", "test_flow.py")  # they share the tiny `dvc repro` (tiny_repo)


def scope_of(path: str) -> str:
    """The unit a worker takes whole: a test file (so its module and session fixtures are built once), with
    test_dvc.py and test_flow.py as one."""
    return "pipeline" if path.endswith(PIPELINE_FILES) else path


def pytest_collection_modifyitems(config, items):
    """Heaviest scopes first (the order xdist hands them out); without xdist only the order changes."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(scope_of(item.path.name), len(rank)))  # stable: file order kept
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs it when one is lent)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


try:
    import xdist  # noqa: F401  (a dev dependency; plain pytest runs without it)
except ImportError:
    pass
else:
    def pytest_xdist_make_scheduler(config, log):
        """--dist loadscope with scope_of as the scope. (xdist's loadgroup ignores xdist_group marks under
        pytest 9 here: it split one file's tests over both workers, building its fixtures twice.)"""
        if config.getvalue("dist") != "loadscope":
            return None
        from xdist.scheduler import LoadScopeScheduling

        class FileScopes(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return scope_of(nodeid.split("::", 1)[0])

        return FileScopes(config, log)


# ----------------------------------------------------------------------------- registry and serving tests


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Two real tiny Llamas sharing one tokenizer (with the ChatML template): different seeds."""
    from components.bootstrap import build_model, build_tokenizer
    from components.core import sorting as synthetic

    root = tmp_path_factory.mktemp("models")
    tok = build_tokenizer(synthetic.corpus(3, 4, 9, 0), 300)
    dirs = {}
    for label, seed in (("a", 1), ("b", 2)):
        model = build_model(tok, 32, 2, 2, 1, 64, 128, seed)
        dirs[label] = root / label
        model.save_pretrained(dirs[label])
        tok.save_pretrained(dirs[label])
    return dirs


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite file with the schema created (migrations take seconds: do them once)."""
    import mlflow

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path
