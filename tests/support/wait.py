"""One way to wait for a state: poll a condition until it holds or a deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    condition: Callable[[], T], timeout_s: float, what: str, *, every_s: float = 0.05,
    context: Callable[[], object] | None = None,
) -> T:
    """Call ``condition`` until it returns something truthy, and return that; AssertionError
    naming ``what`` (and the last value) if ``timeout_s`` passes first, followed by what
    ``context()`` returns then (a server's log, say), when given. An exception ``condition``
    raises ends the wait at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            message = f"not within {timeout_s} s: {what} (last: {value!r})"
            raise AssertionError(message if context is None else f"{message}\n{context()}")
        time.sleep(every_s)
