"""A stage started by `dvc repro` exits when that `dvc` process is gone.

Killing `dvc repro` (Ctrl-C twice, SIGKILL, a CI timeout) does not kill the stage's children: an orphaned
trainer would keep writing outputs while a second `dvc repro` removes the lock and checks outputs out under
it. So each stage entry point (core/logs.stage_main) records its ancestors up to the `dvc` process, and a
daemon thread exits the stage (code 143) as soon as one of them disappears; its last checkpoint is intact
and the next run resumes from it. Linux only (/proc); elsewhere, and outside DVC, it does nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
POLL_S = 1.0


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])  # after "(comm)": state ppid ... starttime is the 22nd field


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def is_dvc(argv: list[str]) -> bool:
    """`dvc repro ...`, `dvc exp run ...` or `python -m dvc repro ...`."""
    names = [os.path.basename(a) for a in argv]
    starts = [i for i, n in enumerate(names) if n == "dvc" or (n == "-m" and i + 1 < len(names) and names[i + 1] == "dvc")]
    return bool(starts) and any(a in ("repro", "exp") for a in names[starts[0]:])


def launcher_chain(pid: int | None = None, max_depth: int = 8) -> list[tuple[int, int]]:
    """(pid, start time) of this process's ancestors up to and including the dvc process; [] if none."""
    chain = []
    current = pid or os.getpid()
    for _ in range(max_depth):
        stat = _stat(current)
        if stat is None:
            return []
        ppid, _ = stat
        parent = _stat(ppid)
        if ppid <= 1 or parent is None:
            return []
        chain.append((ppid, parent[1]))
        if is_dvc(_cmdline(ppid)):
            return chain
        current = ppid
    return []


def watch_launcher() -> bool:
    """Start the watchdog when this stage runs under `dvc repro`; returns whether it watches."""
    if not Path("/proc/self/stat").exists() or os.environ.get("ALIGNFLOW_NO_LIFELINE"):
        return False
    chain = launcher_chain()
    if not chain:
        return False

    def watch() -> None:
        while True:
            time.sleep(POLL_S)
            for pid, started in chain:
                stat = _stat(pid)
                if stat is None or stat[1] != started:  # gone (or the pid was reused)
                    log.error("the dvc process that started this stage (pid %d) is gone: stopping; the last "
                              "checkpoint is kept and the next run resumes from it", chain[-1][0])
                    os._exit(143)

    threading.Thread(target=watch, name="alignflow-lifeline", daemon=True).start()
    return True
