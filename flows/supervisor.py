"""Run a command as a supervised process group: stream its output line by line, enforce a wall-clock
limit on the whole group (SIGTERM, then SIGKILL), and never leave a stage process behind.

Used by the flow's tasks (flows/pipeline.py) for every `dvc repro` / `alignflow promote` they start.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

KILL_GRACE_S = 20.0  # SIGTERM -> SIGKILL: time for accelerate/torchrun to shut their workers down


class StageTimeout(RuntimeError):
    """A command ran past its limit; its whole process group was killed."""


def run_command(
    cmd: list[str],
    cwd: str | Path,
    env: dict[str, str] | None,
    timeout_s: float,
    on_line: Callable[[str], object] = print,
    kill_grace_s: float = KILL_GRACE_S,
) -> int:
    """Run `cmd` in a new process group, streaming merged stdout/stderr to `on_line` line by line.

    The limit is enforced on the process group itself: on timeout the group (dvc, accelerate, its
    workers, anything they spawned) gets SIGTERM, then SIGKILL after `kill_grace_s`, and StageTimeout is
    raised. The group is also taken down when we are interrupted (Prefect cancellation, Ctrl-C), and
    stragglers are killed after a normal exit, so no stage process outlives its task. Returns the exit code.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own session + process group: pgid == pid, signals to us don't reach it
    )
    pgid = proc.pid
    reader = threading.Thread(target=_pump_lines, args=(proc.stdout, on_line), daemon=True)
    reader.start()
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        on_line(f"timeout: {' '.join(cmd)} ran past {timeout_s:g}s; terminating process group {pgid}")
        _kill_group(pgid, kill_grace_s)
        raise StageTimeout(f"{' '.join(cmd)} exceeded {timeout_s:g}s; process group {pgid} killed") from None
    except BaseException:  # cancelled or interrupted: take the stage down with us
        _kill_group(pgid, kill_grace_s)
        raise
    finally:
        _kill_group(pgid, kill_grace_s)  # stragglers that outlived the leader (no-op when none)
        try:
            proc.wait(timeout=5)  # reap the leader
        except subprocess.TimeoutExpired:
            pass
        reader.join(timeout=5)


def _pump_lines(stream, on_line: Callable[[str], object]) -> None:
    # Split on \n and \r as bytes arrive: tqdm redraws with \r and no newline until the bar closes, so
    # readline() would hold a whole training run's progress until its end.
    pending = b""
    while chunk := os.read(stream.fileno(), 65536):
        *lines, pending = re.split(rb"[\r\n]", pending + chunk)
        for line in lines:
            _emit(line, on_line)
    _emit(pending, on_line)
    stream.close()


def _emit(raw: bytes, on_line: Callable[[str], object]) -> None:
    line = raw.decode(errors="replace").rstrip()
    if line.strip():
        try:
            on_line(line)
        except Exception:  # a logging hiccup must not stall the pipe (and with it the child)
            pass


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in the group (zombies wait for a reaper, not for us)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # not Linux: signal 0 (counts zombies, so may wait out the grace)
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc_dir.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _kill_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the group, wait up to grace_s for it to exit, then SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not _group_alive(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.05)
