"""The errors the client raises, all under :class:`PolicyClientError`::

    PolicyClientError              base of everything the client raises
    ├── PolicyServerError          the server answered with an error status (.status, .error, .detail)
    ├── PolicyTimeoutError         no answer within timeout_s (or the call's deadline)
    ├── PolicyConnectionError      could not connect (after retries)
    └── ObservationSpecError       an observation does not match the server's input spec
                                   (.field names it); raised before anything is sent

Transport errors are chained (``raise ... from``).
"""

from __future__ import annotations

__all__ = [
    "ObservationSpecError",
    "PolicyClientError",
    "PolicyConnectionError",
    "PolicyServerError",
    "PolicyTimeoutError",
]


class PolicyClientError(Exception):
    """Base of the errors this client raises."""


class PolicyServerError(PolicyClientError):
    """The server answered with an error status; ``detail`` is the server's message;
    ``retry_after_s`` the seconds a 503's ``Retry-After`` asks to wait (None: not retryable)."""

    def __init__(self, status: int, error: str, detail: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status} {error}" + (f": {detail}" if detail else ""))
        self.status = status
        self.error = error
        self.detail = detail
        self.retry_after_s = retry_after_s


class PolicyTimeoutError(PolicyClientError):
    """The server did not answer within the timeout."""


class PolicyConnectionError(PolicyClientError):
    """The server could not be reached, after the configured retries."""


class ObservationSpecError(PolicyClientError, ValueError):
    """An observation does not match the model's input spec; ``field`` is the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"observation field {field!r}: {message}")
        self.field = field
