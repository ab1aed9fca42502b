"""One HTTP call to the policy server, the one request path of the client.

:func:`send_inference_request` is one observation in one call, without a client.
:func:`request` sends every call on a ``requests.Session``: deadlines (``X-Deadline-Ms``), retries
of connection failures and of 503s that carry ``Retry-After`` (exponential backoff with
jitter), and the mapping of every failure to a :mod:`policy_client.errors` type.
:func:`decode` reads a binary answer through ``binary_protocol``'s allow-list.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

import requests

from binary_protocol import ProtocolError, binary_to_dict, dict_to_binary
from policy_client.errors import PolicyClientError, PolicyConnectionError, PolicyServerError, PolicyTimeoutError

__all__ = [
    "BACKOFF_S",
    "DEADLINE_GRACE_S",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "decode",
    "infer_headers",
    "new_session",
    "request",
    "send_inference_request",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 3
BACKOFF_S = 0.05
# How long past its deadline the client still waits for an answer the server already started.
DEADLINE_GRACE_S = 0.25


def new_session(use_env_proxies: bool) -> requests.Session:
    """A keep-alive session; ``use_env_proxies`` honours HTTP(S)_PROXY, NO_PROXY and ~/.netrc."""
    session = requests.Session()
    # With trust_env, requests scans every environment variable for proxies and reads
    # ~/.netrc on each call: measured ~0.9 ms per call here, a third of a round trip.
    session.trust_env = use_env_proxies
    return session


def request(
    session: requests.Session,
    method: str,
    url: str,
    *,
    timeout_s: float,
    retries: int,
    deadline: float | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> requests.Response:
    """One HTTP call; connection failures and 503s carrying ``Retry-After`` (an overloaded or
    restarting server) are retried with exponential backoff, nothing else.

    With ``deadline`` (a ``time.monotonic()`` instant) every attempt tells the server how
    much time is left (``X-Deadline-Ms``: it drops the request rather than compute it late),
    waits no longer than that, and no attempt starts after it.
    """
    for attempt in range(retries + 1):
        attempt_timeout = timeout_s
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PolicyTimeoutError(f"{method} {url}: deadline passed before the answer")
            headers = {**(headers or {}), "X-Deadline-Ms": f"{left * 1e3:.1f}"}
            attempt_timeout = min(timeout_s, left + DEADLINE_GRACE_S)
        try:
            response = session.request(method, url, timeout=attempt_timeout, headers=headers, **kwargs)
        except requests.exceptions.SSLError as exc:  # a certificate that fails now fails on retry too
            raise PolicyConnectionError(f"{method} {url}: TLS failed: {exc}") from exc
        except requests.exceptions.ConnectTimeout as exc:
            error: PolicyClientError = PolicyConnectionError(f"connecting to {url} timed out")
            cause: Exception = exc
        except requests.exceptions.Timeout as exc:
            raise PolicyTimeoutError(f"{method} {url}: no answer within {attempt_timeout:.3g} s") from exc
        except requests.exceptions.ConnectionError as exc:
            error, cause = PolicyConnectionError(f"{method} {url}: {exc}"), exc
        except requests.exceptions.RequestException as exc:
            raise PolicyClientError(f"{method} {url}: {exc}") from exc
        else:
            if response.status_code < 400:
                return response
            error, cause = _server_error(response), None
            retry_after = error.retry_after_s
            if retry_after is None:  # a refusal that says nothing of coming back: not retried
                raise error
        if attempt < retries:
            delay = BACKOFF_S * 2**attempt
            if isinstance(error, PolicyServerError):  # 503 + Retry-After: sooner than it says, with jitter
                delay = min(retry_after, delay) * random.uniform(0.5, 1.0)
            if deadline is not None and time.monotonic() + delay >= deadline:
                break
            log.debug("%s, retrying in %.2f s", error, delay)
            time.sleep(delay)
    raise error from cause


def _retry_after_s(response: requests.Response) -> float | None:
    """Seconds from a 503's ``Retry-After`` (delay-seconds form), or None: not retryable."""
    if response.status_code != 503:
        return None
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


def _server_error(response: requests.Response) -> PolicyServerError:
    retry_after = _retry_after_s(response)
    try:
        payload = response.json()
        error, detail = str(payload["error"]), str(payload.get("detail", ""))
    except (ValueError, KeyError, TypeError):
        payload, error, detail = None, response.reason or "error", response.text[:200]
    return PolicyServerError(response.status_code, error, detail, retry_after_s=retry_after,
                             body=payload if isinstance(payload, dict) else None)


def decode(response: requests.Response) -> dict:
    """The answer's body through ``binary_protocol``; PolicyClientError if it is not one."""
    try:
        return binary_to_dict(response.content)
    except ProtocolError as exc:
        raise PolicyClientError(f"undecodable answer from {response.url}: {exc}") from exc


def infer_headers(api_key: str | None) -> dict[str, str]:
    """The headers of an inference request: the binary content type and the API key, if any."""
    headers = {"Content-Type": "application/octet-stream"}
    if api_key:
        headers["X-API-Key"] = api_key
    return headers


DEFAULT_URL = "http://127.0.0.1:50000/infer"

_local = threading.local()


def _thread_session() -> requests.Session:
    """One keep-alive session per thread for send_inference_request (Session is not thread-safe)."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = new_session(use_env_proxies=False)
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
    response = request(
        session or _thread_session(), "POST", url,
        timeout_s=timeout_s, retries=retries, data=body, headers=infer_headers(api_key), verify=verify,
    )
    return decode(response)
