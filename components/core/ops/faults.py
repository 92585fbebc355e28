"""Fault injection for the resume, retry and registry tests: a hard exit at a chosen training step; a pause
inside the registry lock."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

def maybe_crash(step: int) -> None:
    """Fault injection for resume and retry tests: a hard exit (no clean-up, like SIGKILL) at a step.

    ALIGNFLOW_CRASH_AT_STEP=N exits at step N. With ALIGNFLOW_CRASH_MARKER=<file> it does so only
    while that file does not exist (it is created first), i.e. once: the retry then succeeds.
    """
    import os

    if os.environ.get("ALIGNFLOW_CRASH_AT_STEP") != str(step):
        return
    marker = os.environ.get("ALIGNFLOW_CRASH_MARKER")
    if marker:
        if Path(marker).exists():
            return
        Path(marker).write_text(str(step))
    log.error("ALIGNFLOW_CRASH_AT_STEP=%d: simulated crash", step)
    os._exit(137)


def hold_in_registry_lock() -> None:
    """ALIGNFLOW_REGISTRY_LOCK_HOLD_S=S: wait S seconds after taking the registry lock, before reading the alias
    it is about to move, so that a test can race two promotions (only the lock can keep them apart)."""
    import os
    import time

    hold = os.environ.get("ALIGNFLOW_REGISTRY_LOCK_HOLD_S")
    if hold:
        time.sleep(float(hold))
