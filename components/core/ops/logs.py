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
import sys
from collections.abc import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = ("accelerate", "accelerate.accelerator", "accelerate.checkpointing")


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("ALIGNFLOW_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(level=level, format=FORMAT, force=True)
    if level != "DEBUG":
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


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

    # in logs (dvc repro, Prefect) a bar redrawn 20 times a second is noise: redraw every 10 s there
    interval = 0.1 if sys.stderr.isatty() else 10.0
    return tqdm(total=iterable_total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=interval)
