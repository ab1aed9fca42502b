"""Client for the policy server: what a robot or simulator loop calls.

Imports only numpy, requests and binary_protocol, so a robot installs it without torch.
The client lives in the ``policy_client`` package, one module per job; its public names
are imported from here: :class:`PolicyClient` (``policy_client.client``), the errors
(``policy_client.errors``), the observation checks (``policy_client.observations``), the
Unix socket transport (``policy_client.unix_socket``) and the robot loop (``ChunkRunner``,
``LoopClock``, ``RunnerStats``, from ``robot_loop``). :func:`send_inference_request`, one
observation in one call without a client, is defined here.

Errors, drawn as a tree in ``policy_client.errors``: everything raised is a
``PolicyClientError``: ``PolicyServerError`` (an error status: ``.status``, ``.error``,
``.detail``), ``PolicyTimeoutError``, ``PolicyConnectionError`` (after retries) and
``ObservationSpecError`` (``.field``; raised before anything is sent). Transport errors
are chained (``raise ... from``). Example::

    with PolicyClient("http://127.0.0.1:50000") as client:
        action = client.infer({"state": state, "image": image})["action"]
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import requests

from binary_protocol import dict_to_binary
from policy_client import transport
from policy_client.client import PolicyClient
from policy_client.errors import (
    ObservationSpecError,
    PolicyClientError,
    PolicyConnectionError,
    PolicyServerError,
    PolicyTimeoutError,
)
from policy_client.observations import check_observation, stack_observations  # noqa: F401 - re-exported
from policy_client.transport import BACKOFF_S, DEADLINE_GRACE_S, DEFAULT_RETRIES, DEFAULT_TIMEOUT_S  # noqa: F401
from policy_client.unix_socket import UnixSocketAdapter, unix_socket_path  # noqa: F401 - re-exported
from robot_loop import ChunkRunner, LoopClock, RunnerStats

# Importable from here as before, outside __all__: the transport's settings
# (BACKOFF_S, DEADLINE_GRACE_S, DEFAULT_RETRIES, DEFAULT_TIMEOUT_S), stack_observations,
# unix_socket_path and UnixSocketAdapter.

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

DEFAULT_URL = "http://127.0.0.1:50000/infer"

_local = threading.local()


def _thread_session() -> requests.Session:
    """One keep-alive session per thread for send_inference_request (Session is not thread-safe)."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = transport.new_session(use_env_proxies=False)
    return session


def send_inference_request(
    data: Mapping[str, Any],
    url: str = DEFAULT_URL,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    api_key: str | None = None,
    session: requests.Session | None = None,
    retries: int = DEFAULT_RETRIES,
    verify: bool | str = True,
) -> dict:
    """Send one observation to ``url`` (the /infer endpoint) and return the decoded outputs.

    Without ``session``, a keep-alive session kept per thread is reused across calls.
    ``verify``: for ``https://`` URLs, the CA bundle (PEM path) the server's certificate is
    checked against, True for the system's, False for no check (tests only).

    Raises:
        PolicyServerError: the server answered 4xx/5xx.
        PolicyTimeoutError: no answer within ``timeout_s``.
        PolicyConnectionError: no connection after ``retries`` retries, or TLS failed (a
            certificate not trusted: not retried).
        binary_protocol.ProtocolError: ``data`` holds something the wire format cannot carry.
    """
    body = dict_to_binary(dict(data))
    response = transport.request(
        session or _thread_session(), "POST", url,
        timeout_s=timeout_s, retries=retries, data=body, headers=transport.infer_headers(api_key), verify=verify,
    )
    return transport.decode(response)
