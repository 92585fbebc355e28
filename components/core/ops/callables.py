"""A params value that names a Python callable (`package.module:function`): a judge, a reward function."""

from __future__ import annotations

import importlib
from collections.abc import Callable


class CallableSpecError(ValueError):
    """A `package.module:function` value that is malformed or cannot be imported; the message names its key."""


def import_callable(spec: str, key: str, malformed: str) -> Callable:
    """`package.module:function` imported; a CallableSpecError naming the params key `key` otherwise."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CallableSpecError(f"{key}={spec!r}: {malformed}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise CallableSpecError(f"{key}={spec!r}: cannot import it ({type(e).__name__}: {e})") from e
    if not callable(fn):
        raise CallableSpecError(f"{key}={spec!r}: {attr} is not callable")
    return fn
