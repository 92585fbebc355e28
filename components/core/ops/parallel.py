"""An ordered, bounded map over worker processes: what prepare tokenises its records with.

`ordered_map(fn, jobs, workers)` runs `fn(payload)` for each `(tag, payload)` of `jobs` and yields
`(tag, result)` in the order of `jobs`. At most `window` jobs are in flight, so a generator of a billion jobs is
read as fast as the workers take them, never ahead: memory stays flat (multiprocessing's own `imap` drains its
input iterator into a queue as fast as it can). With one worker it runs in this process, without a pool.

Workers are forked where the platform can (they inherit what the parent loaded, e.g. a tokenizer, without
pickling it), spawned elsewhere; `initializer(*initargs)` runs in each either way. A worker's exception is
raised in the parent when its job's turn comes; leaving the generator early (an error in the consumer, a
`break`) terminates the pool.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and `taskset` set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_workers(requested: int) -> int:
    """`requested` worker processes, or every available core for 0."""
    return requested if requested > 0 else available_cores()


def ordered_map(fn: Callable, jobs: Iterable[tuple[object, object]], workers: int, window: int | None = None,
                initializer: Callable | None = None, initargs: tuple = ()) -> Iterator[tuple[object, object]]:
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for tag, payload in jobs:
            yield tag, fn(payload)
        return
    window = window or 2 * workers
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = mp.get_context(method).Pool(workers, initializer=initializer, initargs=initargs)
    try:
        pending: deque = deque()
        for tag, payload in jobs:
            pending.append((tag, pool.apply_async(fn, (payload,))))
            while len(pending) >= window:
                tag_done, result = pending.popleft()
                yield tag_done, result.get()
        while pending:
            tag_done, result = pending.popleft()
            yield tag_done, result.get()
        pool.close()
        pool.join()
    finally:
        pool.terminate()
