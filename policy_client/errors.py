"""The errors the client raises, all under :class:`PolicyClientError`::

    PolicyClientError              base of everything the client raises
    ├── PolicyServerError          the server answered with an error status (.status, .error, .detail)
    ├── PolicyTimeoutError         no answer within timeout_s (or the call's deadline)
    ├── PolicyConnectionError      could not connect (after retries)
    ├── ObservationSpecError       an observation does not match the server's input spec
    │                              (.field names it); raised before anything is sent
    └── EpisodeStopped             a ChunkRunner stopped its episode: the version it was
                                   pinned to was retired (.episode_id, .version, .served)

Transport errors are chained (``raise ... from``).
"""

from __future__ import annotations

__all__ = [
    "EpisodeStopped",
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
    ``retry_after_s`` the seconds a 503's ``Retry-After`` asks to wait (None: not retryable);
    ``body`` the whole JSON answer (a 409 ``version not served`` names ``served_versions``)."""

    def __init__(self, status: int, error: str, detail: str = "", retry_after_s: float | None = None,
                 body: dict | None = None) -> None:
        super().__init__(f"HTTP {status} {error}" + (f": {detail}" if detail else ""))
        self.status = status
        self.error = error
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.body = body or {}

    @property
    def version_retired(self) -> bool:
        """True for the answer to a request pinned to a version the server no longer serves."""
        return self.status == 409 and self.error == "version not served"


class PolicyTimeoutError(PolicyClientError):
    """The server did not answer within the timeout."""


class PolicyConnectionError(PolicyClientError):
    """The server could not be reached, after the configured retries."""


class ObservationSpecError(PolicyClientError, ValueError):
    """An observation does not match the model's input spec; ``field`` is the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"observation field {field!r}: {message}")
        self.field = field


class EpisodeStopped(PolicyClientError):
    """A ``ChunkRunner`` stopped its episode because the model version the episode is pinned
    to was retired (its runner's ``stopped``); the runner plays its fallback action."""

    def __init__(self, episode_id: str, version: str, served: list[str], step: int) -> None:
        super().__init__(
            f"episode {episode_id} was pinned to model version {version}, which the server no longer serves "
            f"(it serves {', '.join(served) or 'other versions'}); stopped at step {step}, the end of its last "
            "chunk, playing the fallback action: start a new episode (reset) or let the runner continue on the "
            "current version (on_version_retired='continue')"
        )
        self.episode_id = episode_id
        self.version = version
        self.served = served
        self.step = step
