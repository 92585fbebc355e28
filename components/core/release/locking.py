"""The registry lock: what every alias move (promote, rollback, register's `challenger`) holds while it re-reads
the alias and moves it (compare-and-set, `registry.py`).

A file lock on this machine (next to a SQLite store, else under ~/.cache/alignflow/locks) and, when the tracking
URI is a server and a Prefect API is configured (the team set-up), also a slot of a Prefect global concurrency
limit (`alignflow-registry-<digest>`, limit 1, created on first use): server-side, so it holds across machines,
and leased (a holder that dies frees it when its lease runs out). MLflow has no transactions; the team's Prefect
server is the compare-and-set authority. Against a tracking server without a Prefect API the lock is per
machine, and a warning says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("alignflow.registry")

LOCK_TIMEOUT_S = 600.0
LEASE_S = 120.0  # the server-side slot's lease (renewed while held): how long a dead holder blocks the registry


class RegistryError(RuntimeError):
    """A registry state the command cannot act on (no challenger, nothing to roll back to, ...)."""


def _digest(uri: str, model_name: str) -> str:
    """One name per tracking store and model, shared by the file lock and the server's concurrency limit."""
    return hashlib.sha256(f"{uri}\0{model_name}".encode()).hexdigest()[:16]


def _lock_path(model_name: str) -> Path:
    from components.core.ops import tracking

    uri = tracking.tracking_uri()
    digest = _digest(uri, model_name)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return db.parent / f".{db.name}.{digest}.lock"
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alignflow" / "locks"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{digest}.lock"


@contextlib.contextmanager
def registry_lock(model_name: str, timeout_s: float = LOCK_TIMEOUT_S):
    """Exclusive lock for moving the aliases of `model_name`: this machine's file lock, then the team's
    server-side slot when there is one (both released when the process dies)."""
    from components.core.ops import faults

    with _file_lock(model_name, timeout_s), _server_lock(model_name, timeout_s):
        faults.hold_in_registry_lock()
        yield


def _prefect_api_url() -> str | None:
    """The configured Prefect API (env or profile), or None; without importing Prefect when the env says none."""
    if os.environ.get("PREFECT_API_URL") == "":
        return None
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextlib.contextmanager
def _server_lock(model_name: str, timeout_s: float):
    """A slot of the Prefect global concurrency limit for this tracking server + model, when the tracking URI is
    a server and a Prefect API is configured; nothing otherwise (a warning against a server)."""
    from components.core.ops import tracking

    uri = tracking.tracking_uri()
    if not uri.startswith(("http://", "https://")):
        yield  # a local store: one machine, the file lock covers it
        return
    api = _prefect_api_url()
    if api is None:
        log.warning("%s: tracking server %s but no Prefect API (PREFECT_API_URL): alias moves are locked on this "
                    "machine only; promote from one machine, or configure the team's Prefect server", model_name, uri)
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = "alignflow-registry-" + _digest(uri, model_name)
    try:
        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    except ObjectAlreadyExists:
        pass
    except Exception as e:
        raise RegistryError(f"{model_name}: cannot reach the Prefect server at {api} for the registry lock "
                            f"({type(e).__name__}: {e}); nothing changed") from e
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True,
                                           lease_duration=LEASE_S))
        except TimeoutError:
            raise RegistryError(f"{model_name}: another registry command on the team's server holds {name} for "
                                f"over {timeout_s:g}s; nothing changed") from None
        yield


@contextlib.contextmanager
def _file_lock(model_name: str, timeout_s: float):
    import fcntl

    path = _lock_path(model_name)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(f"{model_name}: another registry command holds {path} for over "
                                        f"{timeout_s:g}s; nothing changed") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


