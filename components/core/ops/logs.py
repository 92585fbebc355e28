"""Logging, configured once, by the entry point (`main()` of a stage or of the `alignflow` CLI).

Modules only call `logging.getLogger(...)`; nothing is configured on import. The level comes from
ALIGNFLOW_LOG_LEVEL (default INFO). accelerate logs every file of every checkpoint at INFO ("Saving current
state to ...", "Model weights saved in ..."): a dozen lines per save that bury the stage's own output, so
its loggers stay at WARNING unless ALIGNFLOW_LOG_LEVEL=DEBUG.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = ("accelerate", "accelerate.accelerator", "accelerate.checkpointing")
# Third-party warnings that say nothing a user can act on here, dropped at their logger (whole message matched):
# - accelerate warns at every save of a model with tied embeddings that it dropped the tied copy (expected: the
#   weights are tied again on load);
# - `accelerate launch` warns that it chose --num_cpu_threads_per_process itself (the launcher sets the threads),
#   dropped only when that is all it lists: a notice about other defaults still shows.
DROPPED = {
    "accelerate.utils.other": (re.compile(r"Removed shared tensor .*", re.S),),
    "accelerate.commands.launch": (re.compile(
        r"The following values were not passed to `accelerate launch` and had defaults used instead:\n"
        r"\t`--num_cpu_threads_per_process` was set [^\t]*"),),
}
_RANK = re.compile(r"^\[RANK \d+\] ")
RESULT_LINE_CHARS = 200  # a stage's closing line; the full result is its metrics file


class _Drop(logging.Filter):
    def __init__(self, patterns: tuple[re.Pattern, ...]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = _RANK.sub("", record.getMessage(), count=1)  # accelerate's multi-process logger adds "[RANK n] "
        return not any(p.fullmatch(message) for p in self.patterns)


def quiet_third_party() -> None:
    """Drop the DROPPED warnings and the progress bars of model loading and artifact downloads (transformers'
    "Loading weights", MLflow's "Downloading artifacts"): lines that redraw in a log file and bury the stage's own."""
    for name, patterns in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(patterns))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers / huggingface_hub import
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("ALIGNFLOW_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(level=level, format=FORMAT, force=True)
    if level != "DEBUG":
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        quiet_third_party()


def result_line(stage: str, result: dict, keys: tuple[str, ...], where: str) -> str:
    """A stage's closing line: a few headline numbers (those of `keys` it has) and the file that holds them all,
    at most RESULT_LINE_CHARS."""
    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    parts = [f"{k} {fmt(result[k])}" for k in keys if k in result]
    seconds = result.get("seconds")
    head = f"{stage} done" + (f" in {seconds:.1f} s" if isinstance(seconds, int | float) else "")
    tail = f" (all: {where})"
    body = ", ".join(parts)
    room = RESULT_LINE_CHARS - len(head) - len(tail) - 2
    if len(body) > room:
        body = body[: room - 1].rsplit(", ", 1)[0] + ", …"
    return f"{head}: {body}{tail}" if body else head + tail


# Printed by a stage that fails on its inputs (params, data, a diverging run): the flow does not retry it.
INPUT_ERROR_MARK = "[alignflow] input error"
_INPUT_ERRORS = {"ParamsError", "DataError", "NonFiniteLossError", "DivergenceError", "JudgeError",
                 "StaleReferenceError", "TokenizedError"}


def is_input_error(e: BaseException) -> bool:
    """Errors a re-run with the same params and data would hit again (by class name: no imports here)."""
    return bool({c.__name__ for c in type(e).__mro__} & _INPUT_ERRORS)


def put_back(stage: str, absent: list[str]) -> None:
    """After a failed run: the stage's last good outputs back in the workspace, said on stderr (nothing to do
    when none was absent at the start)."""
    from components.core.ops import outputs

    if not absent:
        return

    restored, failed = outputs.restore(stage, absent)
    if restored:
        print(f"{stage}: failed; put back its last good outputs (as dvc.lock records them): {', '.join(restored)}",
              file=sys.stderr)
    for path, why in failed.items():
        print(f"{stage}: failed; could not put back {path} ({why}): `dvc checkout {stage}` or `dvc pull {stage}`",
              file=sys.stderr)


def exit_input_error(stage: str, e: BaseException, then: Callable[[], None] | None = None) -> None:
    """Exit 2 with the error on one line and INPUT_ERROR_MARK (no traceback: there is no bug to debug); `then`
    runs between the two (its own lines follow the error)."""
    print(f"{stage}: error: {e}", file=sys.stderr)
    if then is not None:
        then()
    print(f"{INPUT_ERROR_MARK} ({type(e).__name__}): fix the params or data; retrying cannot help", file=sys.stderr)
    sys.exit(2)


def stage_main(stage: str):
    """Decorate a stage's `main(argv)`: logging set up once; the leftovers of killed writes of its outputs swept;
    an input error exits 2 with one clear line and INPUT_ERROR_MARK (so orchestration knows a retry cannot help),
    anything else propagates as a traceback; after any failure the outputs `dvc repro` removed are put back as
    dvc.lock records them (ops/outputs.py), and the message says which."""

    def wrap(fn):
        @functools.wraps(fn)
        def main(argv: list[str] | None = None):
            from components.core.ops import lifeline, outputs

            setup_logging()
            lifeline.watch_launcher()  # under `dvc repro`: exit when that dvc process is killed
            main_process = os.environ.get("RANK", "0") == "0"  # one process of a distributed launch does files
            outs = outputs.stage_outs(stage) if main_process else []
            outputs.sweep(outs)
            absent = outputs.absent(outs)
            try:
                result = fn(argv)
            except BaseException as e:
                if isinstance(e, SystemExit) and e.code in (0, None):
                    raise
                if isinstance(e, Exception) and is_input_error(e):
                    exit_input_error(stage, e, then=functools.partial(put_back, stage, absent))
                put_back(stage, absent)
                raise
            outputs.stash_uncached(outs)
            return result

        return main

    return wrap


def progress(iterable_total: int, initial: int, desc: str, enabled: bool) -> Callable:
    import sys

    from tqdm.auto import tqdm

    # in logs (dvc repro, Prefect) a bar redrawn 20 times a second is noise: redraw every 10 s there, each redraw
    # on its own line (a terminal's carriage returns would glue them into one line of a log file)
    tty = sys.stderr.isatty()
    return tqdm(total=iterable_total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=tty,
                ncols=None if tty else 100, mininterval=0.1 if tty else 10.0,
                file=sys.stderr if tty else _Lines(sys.stderr))


class _Lines:
    """A stream for tqdm outside a terminal: every redraw becomes a line of its own."""

    def __init__(self, stream):
        self.stream = stream
        self.line_start = True  # nothing on the current line yet: a redraw needs no newline first

    def write(self, text: str) -> int:
        text = text.replace("\r", "\n")
        while "\n\n" in text:
            text = text.replace("\n\n", "\n")
        if self.line_start:
            text = text.lstrip("\n")
        if text:
            self.line_start = text.endswith("\n")
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
