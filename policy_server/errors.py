"""The server's error types. Each maps to one HTTP status and a short public message."""

from __future__ import annotations


class ServingError(Exception):
    """Base of the errors a route answers with JSON ``{"error": ..., "detail": ...}``."""

    status = 500
    error = "internal server error"

    def __init__(self, detail: str = "", *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or self.error)
        self.detail = detail
        self.headers = headers or {}

    def copy(self) -> ServingError:
        """The same error, not yet raised (no traceback): for raising where one is stored."""
        return type(self)(self.detail, headers=dict(self.headers))


class BadRequest(ServingError):
    status, error = 400, "bad request"


class Unauthorized(ServingError):
    status, error = 401, "unauthorized"


class Forbidden(ServingError):
    status, error = 403, "forbidden"


class Conflict(ServingError):
    status, error = 409, "conflict"


class LengthRequired(ServingError):
    status, error = 411, "length required"


class PayloadTooLarge(ServingError):
    status, error = 413, "payload too large"


class UpgradeRequired(ServingError):
    """A WebSocket path asked without a WebSocket upgrade (or for another WebSocket version)."""

    status, error = 426, "upgrade required"


class InvalidInput(ServingError):
    status, error = 422, "invalid input"


class UnsupportedMediaType(ServingError):
    status, error = 415, "unsupported media type"


class InvalidModel(ServingError):
    """A model update that failed validation: nothing was published."""

    status, error = 422, "invalid model"


class InferenceFailed(ServingError):
    status, error = 500, "inference failed"


class NonFiniteOutput(ServingError):
    """The model computed NaN or inf for this request: refused, never served as an action."""

    status, error = 500, "non-finite output"


class NotReady(ServingError):
    status, error = 503, "not ready"


class BatcherLost(ServingError):
    """The worker's batcher thread ended while it should serve (``/health``)."""

    status, error = 503, "unhealthy"


class QueueFull(ServingError):
    """The worker's request queue has no room now (answered with Retry-After)."""

    status, error = 503, "overloaded"


class DeadlineExceeded(ServingError):
    """The request's deadline passed before its answer: not computed, or not in time."""

    status, error = 504, "deadline exceeded"


class UnknownModel(ServingError):
    status, error = 404, "unknown model"


class UnknownVersion(ServingError):
    status, error = 404, "unknown version"


class InvalidModelName(ServingError):
    status, error = 400, "bad request"


class ConfigError(ValueError):
    """A server configuration that cannot start (bad value, unsafe bind, missing model)."""


class ModelError(Exception):
    """A model directory that does not follow the contract, or a policy that misbehaves."""


class NotAModelDirectory(InvalidModel, ModelError):
    """A path that is not a model directory (no ``policy.py``): see ``contract.require_model_dir``."""


class InsufficientStorage(ServingError):
    """The model store ran out of space (ENOSPC, EDQUOT) while writing an update: nothing published."""

    status, error = 507, "insufficient storage"


class StoreWriteFailed(ServingError):
    """Any other I/O failure writing the model store (read-only, permission, ...): nothing published."""

    status, error = 500, "store write failed"


def store_write_error(exc: OSError, doing: str) -> ServingError:
    """The answer for an OSError met while ``doing`` something to the store: 507 when out of
    space, 500 otherwise, naming the reason (``strerror`` and errno name, never a path)."""
    import errno

    code = errno.errorcode.get(exc.errno or 0, "unknown")
    detail = f"{doing} failed: {exc.strerror or type(exc).__name__} ({code}); nothing was published"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage(detail)
    return StoreWriteFailed(detail)
