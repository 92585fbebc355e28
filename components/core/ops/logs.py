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


def stage_main(stage: str):
    """Decorate a stage's `main(argv)`: logging set up once; an input error exits 2 with one clear line and
    INPUT_ERROR_MARK (so orchestration knows a retry cannot help); anything else propagates as a traceback."""

    def wrap(fn):
        @functools.wraps(fn)
        def main(argv: list[str] | None = None):
            from components.core.ops import lifeline

            setup_logging()
            lifeline.watch_launcher()  # under `dvc repro`: exit when that dvc process is killed
            try:
                return fn(argv)
            except Exception as e:
                if not is_input_error(e):
                    raise
                print(f"{stage}: error: {e}", file=sys.stderr)
                print(f"{INPUT_ERROR_MARK} ({type(e).__name__}): fix the params or data; retrying cannot help",
                      file=sys.stderr)
                sys.exit(2)

        return main

    return wrap


def progress(iterable_total: int, initial: int, desc: str, enabled: bool) -> Callable:
    import sys

    from tqdm.auto import tqdm

    # in logs (dvc repro, Prefect) a bar redrawn 20 times a second is noise: redraw every 10 s there
    interval = 0.1 if sys.stderr.isatty() else 10.0
    return tqdm(total=iterable_total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=interval)
