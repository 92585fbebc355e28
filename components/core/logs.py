"""Logging, configured once, by the entry point (`main()` of a stage or of the `alignflow` CLI).

Modules only call `logging.getLogger(...)`; nothing is configured on import. The level comes from
ALIGNFLOW_LOG_LEVEL (default INFO). accelerate logs every file of every checkpoint at INFO ("Saving current
state to ...", "Model weights saved in ..."): a dozen lines per save that bury the stage's own output, so
its loggers stay at WARNING unless ALIGNFLOW_LOG_LEVEL=DEBUG.
"""

from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = ("accelerate", "accelerate.accelerator", "accelerate.checkpointing")


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("ALIGNFLOW_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(level=level, format=FORMAT, force=True)
    if level != "DEBUG":
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
