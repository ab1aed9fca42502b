"""One way to wait for a state: poll a condition until it holds or a deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(condition: Callable[[], T], timeout_s: float, what: str, *, every_s: float = 0.05) -> T:
    """Call ``condition`` until it returns something truthy, and return that; AssertionError
    naming ``what`` (and the last value) if ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what} (last: {value!r})")
        time.sleep(every_s)
