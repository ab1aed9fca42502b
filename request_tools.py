"""The client, as older code and the README's first examples import it:
``from request_tools import PolicyClient, send_inference_request``.

A compatibility face: everything lives in the :mod:`policy_client` package (numpy and
requests only; import it from there in new code). :class:`PolicyClient` keeps a
connection to one server; :func:`send_inference_request` sends one observation without a
client. Everything raised is a ``PolicyClientError``: ``PolicyServerError`` (an error
status: ``.status``, ``.error``, ``.detail``), ``PolicyTimeoutError``,
``PolicyConnectionError`` (after retries) and ``ObservationSpecError`` (``.field``; raised
before anything is sent). Example::

    with PolicyClient("http://127.0.0.1:50000") as client:
        action = client.infer({"state": state, "image": image})["action"]
"""

from __future__ import annotations

from policy_client import (
    ChunkRunner,
    LoopClock,
    ObservationSpecError,
    PolicyClient,
    PolicyClientError,
    PolicyConnectionError,
    PolicyServerError,
    PolicyTimeoutError,
    RunnerStats,
    check_observation,
    send_inference_request,
    stack_observations,  # noqa: F401 - importable from here as before, outside __all__
)
from policy_client.transport import (  # noqa: F401 - importable from here as before, outside __all__
    BACKOFF_S,
    DEADLINE_GRACE_S,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
)
from policy_client.unix_socket import UnixSocketAdapter, unix_socket_path  # noqa: F401 - as before

__all__ = [
    "ChunkRunner",
    "LoopClock",
    "PolicyClient",
    "PolicyClientError",
    "PolicyConnectionError",
    "PolicyServerError",
    "PolicyTimeoutError",
    "RunnerStats",
    "ObservationSpecError",
    "check_observation",
    "send_inference_request",
]
