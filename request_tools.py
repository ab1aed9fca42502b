"""Client for the policy server: what a robot or simulator loop calls.

Imports only numpy, requests and binary_protocol, so a robot installs it without torch.
The robot loop (``ChunkRunner``, ``LoopClock``, ``RunnerStats``) lives in ``robot_loop``
and stays importable from here.

Errors::

    PolicyClientError              base of everything this module raises
    ├── PolicyServerError          the server answered with an error status (.status, .error, .detail)
    ├── PolicyTimeoutError         no answer within timeout_s (or the call's deadline)
    ├── PolicyConnectionError      could not connect (after retries)
    └── ObservationSpecError       an observation does not match the server's input spec
                                   (.field names it); raised before anything is sent

Transport errors are chained (``raise ... from``). Example::

    with PolicyClient("http://127.0.0.1:50000") as client:
        action = client.infer({"state": state, "image": image})["action"]
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import requests
import urllib3

from binary_protocol import ProtocolError, binary_to_dict, dict_to_binary

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

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:50000/infer"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 3
BACKOFF_S = 0.05
# How long past its deadline the client still waits for an answer the server already started.
DEADLINE_GRACE_S = 0.25


class PolicyClientError(Exception):
    """Base of the errors this client raises."""


class PolicyServerError(PolicyClientError):
    """The server answered with an error status; ``detail`` is the server's message."""

    def __init__(self, status: int, error: str, detail: str = "") -> None:
        super().__init__(f"HTTP {status} {error}" + (f": {detail}" if detail else ""))
        self.status = status
        self.error = error
        self.detail = detail


class PolicyTimeoutError(PolicyClientError):
    """The server did not answer within the timeout."""


class PolicyConnectionError(PolicyClientError):
    """The server could not be reached, after the configured retries."""


class ObservationSpecError(PolicyClientError, ValueError):
    """An observation does not match the model's input spec; ``field`` is the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"observation field {field!r}: {message}")
        self.field = field


def check_observation(obs: Mapping[str, Any], spec: list[dict]) -> None:
    """Check ``obs`` against an input spec as ``/model_info`` gives it (name, dtype, shape).

    An input marked ``"optional": true`` may be missing (the server fills its default).
    Raises ObservationSpecError naming the first missing, unexpected or mismatched field.
    """
    expected = {entry["name"]: entry for entry in spec}
    for name, entry in expected.items():
        if name not in obs and not entry.get("optional", False):
            raise ObservationSpecError(name, f"missing; the model expects {sorted(expected)}")
    for name, value in obs.items():
        entry = expected.get(name)
        if entry is None:
            raise ObservationSpecError(str(name), f"not an input of the model; it expects {sorted(expected)}")
        if not isinstance(value, np.ndarray):
            raise ObservationSpecError(name, f"is {type(value).__name__}, expected a numpy array")
        if value.dtype.name != entry["dtype"]:
            raise ObservationSpecError(name, f"dtype {value.dtype.name}, expected {entry['dtype']}")
        if list(value.shape) != list(entry["shape"]):
            raise ObservationSpecError(name, f"shape {list(value.shape)}, expected {list(entry['shape'])}")


def stack_observations(observations: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """N observations with the same fields to one dict of ``[N, ...]`` arrays (a vectorized request).

    Raises ObservationSpecError naming the field and the row that differs from row 0.
    """
    if not observations:
        raise ValueError("no observations to stack")
    names = set(observations[0])
    for i, obs in enumerate(observations):
        if set(obs) != names:
            odd = sorted(names ^ set(obs))[0]
            raise ObservationSpecError(odd, f"row {i} {'lacks' if odd in names else 'adds'} it (compared with row 0)")
    out = {}
    for name in observations[0]:
        first = np.asarray(observations[0][name])
        for i, obs in enumerate(observations):
            value = obs[name]
            if not isinstance(value, np.ndarray) or value.shape != first.shape or value.dtype != first.dtype:
                got = f"{value.dtype.name}{list(value.shape)}" if isinstance(value, np.ndarray) else type(value).__name__
                raise ObservationSpecError(name, f"row {i} is {got}, row 0 is {first.dtype.name}{list(first.shape)}")
        out[name] = np.stack([obs[name] for obs in observations])
    return out


_local = threading.local()


def _new_session(use_env_proxies: bool) -> requests.Session:
    session = requests.Session()
    # With trust_env, requests scans every environment variable for proxies and reads
    # ~/.netrc on each call: measured ~0.9 ms per call here, a third of a round trip.
    session.trust_env = use_env_proxies
    return session


def _thread_session() -> requests.Session:
    """One keep-alive session per thread for send_inference_request (Session is not thread-safe)."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = _new_session(use_env_proxies=False)
    return session


def _request(
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
            retry_after = _retry_after_s(response)
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
    try:
        payload = response.json()
        return PolicyServerError(response.status_code, str(payload["error"]), str(payload.get("detail", "")))
    except (ValueError, KeyError, TypeError):
        return PolicyServerError(response.status_code, response.reason or "error", response.text[:200])


def _decode(response: requests.Response) -> dict:
    try:
        return binary_to_dict(response.content)
    except ProtocolError as exc:
        raise PolicyClientError(f"undecodable answer from {response.url}: {exc}") from exc


def _infer_headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/octet-stream"}
    if api_key:
        headers["X-API-Key"] = api_key
    return headers


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
    response = _request(
        session or _thread_session(), "POST", url,
        timeout_s=timeout_s, retries=retries, data=body, headers=_infer_headers(api_key), verify=verify,
    )
    return _decode(response)


def unix_socket_path(url: str) -> str | None:
    """The socket path of a ``unix:///path/to.sock`` URL, None for any other URL."""
    if not url.startswith("unix://"):
        return None
    path = url[len("unix://"):].rstrip("/")
    if not path.startswith("/"):
        raise ValueError(f"{url!r}: a Unix socket URL needs an absolute path, unix:///path/to.sock")
    return path


class _UnixConnection(urllib3.connection.HTTPConnection):
    """An HTTP connection over a Unix domain socket (the host name is only for the Host header)."""

    def __init__(self, *args: Any, socket_path: str, **kwargs: Any) -> None:
        self.socket_path = socket_path
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(urllib3.util.Timeout.resolve_default_timeout(self.timeout))
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise urllib3.exceptions.NewConnectionError(self, f"connecting to {self.socket_path}: {exc}") from exc
        return sock


class _UnixPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _UnixConnection

    def __init__(self, socket_path: str, maxsize: int) -> None:
        super().__init__("localhost", maxsize=maxsize, block=False)
        self.conn_kw["socket_path"] = socket_path


class UnixSocketAdapter(requests.adapters.HTTPAdapter):
    """A requests transport adapter for one Unix domain socket, with keep-alive connections.

    Mounted by :class:`PolicyClient` for ``unix://`` URLs; usable on any Session with
    ``session.mount("http://localhost/", UnixSocketAdapter("/path/to.sock"))``.
    """

    def __init__(self, socket_path: str, pool_maxsize: int = 10) -> None:
        super().__init__(pool_maxsize=pool_maxsize)
        self._pool = _UnixPool(socket_path, pool_maxsize)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self._pool

    def get_connection(self, url, proxies=None):
        return self._pool

    def request_url(self, request, proxies):
        return request.path_url

    def close(self) -> None:
        self._pool.close()
        super().close()


class PolicyClient:
    """A keep-alive connection to one policy server. Not thread-safe: one per thread.

    Args:
        base_url: e.g. ``"http://127.0.0.1:50000"``.
        api_key: sent as ``X-API-Key`` when the server requires one.
        admin_key: sent as ``X-Admin-Key`` on model management calls when the server has one.
        model: the model ``infer`` asks for by default (None: the server's default model).
        timeout_s: per-call timeout for connecting and for the answer.
        deadline_s: default per-call deadline for ``infer`` (None: none). The server drops
            a request whose deadline passes before compute (504) instead of computing it late.
        retries: retries of connection failures and of 503s with Retry-After, within the call's
            deadline (inference is idempotent); 4xx never.
        check_spec: read each model's input spec from the server once (``/model_info``) and
            check every observation against it before sending (ObservationSpecError).
        use_env_proxies: honour HTTP(S)_PROXY / NO_PROXY and ~/.netrc (off: they cost
            about a millisecond per call, and a policy server is rarely behind a proxy).
        encode: send these uint8 camera inputs encoded, e.g. ``{"image": "jpeg:90"}`` or
            ``{"image": "png"}`` (lossless); the model must list them in ``encoded_inputs``.
            Needs the ``images`` extra (simplejpeg, Pillow), imported only when used.
        verify: for an ``https://`` base_url (a server started with ``--certfile``), the CA
            bundle (PEM path) its certificate is checked against; True: the system's CAs;
            False: no check (tests only). A certificate that fails raises PolicyConnectionError.
        cert: a client certificate for a server that asks for one (``--cert-reqs required``):
            a PEM path holding certificate and key, or a (certfile, keyfile) pair.

    ``base_url`` ``"unix:///path/to.sock"`` talks HTTP over that Unix domain socket (a server
    started with ``--uds``); requests then show the URL ``http://localhost/...``.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:50000",
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        model: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        deadline_s: float | None = None,
        retries: int = DEFAULT_RETRIES,
        check_spec: bool = True,
        use_env_proxies: bool = False,
        encode: Mapping[str, str] | None = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
    ) -> None:
        self.socket_path = unix_socket_path(base_url)
        self.base_url = "http://localhost" if self.socket_path else base_url.rstrip("/")
        self.encode = dict(encode or {})
        if self.encode:
            from image_codecs import parse_codec  # numpy only; the codec libraries load when used

            for spec in self.encode.values():
                parse_codec(spec)  # ValueError now rather than at the first infer
        self.api_key = api_key
        self.admin_key = admin_key
        self.model = model
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.retries = retries
        self.check_spec = check_spec
        self._input_specs: dict[str | None, list[dict]] = {}
        self.last_model_version: str | None = None
        self.last_server_timing: str | None = None
        self.last_batch_size: int | None = None
        self.last_response_bytes = 0
        self._session = _new_session(use_env_proxies)
        self._session.verify = verify
        self._session.cert = cert
        if self.socket_path:
            self._session.mount("http://localhost/", UnixSocketAdapter(self.socket_path))

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def _call(self, method: str, route: str, **kwargs: Any) -> requests.Response:
        return _request(
            self._session, method, self.base_url + route,
            timeout_s=self.timeout_s, retries=self.retries, **kwargs,
        )

    def infer(
        self,
        obs: Mapping[str, Any],
        model: str | None = None,
        *,
        outputs: Sequence[str] | None = None,
        deadline_s: float | None = None,
        encode: Mapping[str, str] | None = None,
    ) -> dict:
        """Send one observation, return the policy's outputs (e.g. ``{"action": (10, 7)}``).

        ``model`` (else the client's ``model``, else the server's default) picks the model.
        ``outputs`` asks for optional outputs the model lists in ``optional_outputs`` (e.g.
        ``["attention"]``). ``deadline_s`` (else the client's ``deadline_s``) bounds the whole
        call: past it the server drops the request (PolicyServerError 504) and the client
        stops waiting (PolicyTimeoutError). ``encode`` (else the client's ``encode``; ``{}``
        for none) sends those image inputs JPEG/PNG encoded. Sets ``last_model_version`` and friends.

        Raises:
            ObservationSpecError (before sending), PolicyServerError, PolicyTimeoutError,
            PolicyConnectionError, ProtocolError.
        """
        model = model or self.model
        deadline_s = deadline_s if deadline_s is not None else self.deadline_s
        deadline = time.monotonic() + deadline_s if deadline_s is not None else None
        if self.check_spec:
            self.check_observation(obs, model)
        route = f"/models/{model}/infer" if model else "/infer"
        try:
            response = _request(
                self._session, "POST", self.base_url + route, timeout_s=self.timeout_s, retries=self.retries,
                deadline=deadline, data=self._body(obs, encode, rows=False), headers=_infer_headers(self.api_key),
                params={"outputs": ",".join(outputs)} if outputs else None,
            )
        except PolicyServerError as exc:
            if exc.status == 422:  # the served model may have changed its inputs: ask again next time
                self._input_specs.pop(model, None)
            raise
        self.last_model_version = response.headers.get("X-Model-Version")
        self.last_server_timing = response.headers.get("Server-Timing")
        self.last_batch_size = int(response.headers.get("X-Batch-Size", 0)) or None
        self.last_response_bytes = len(response.content)
        return _decode(response)

    def infer_batch(
        self,
        observations: Sequence[Mapping[str, Any]],
        model: str | None = None,
        *,
        outputs: Sequence[str] | None = None,
        deadline_s: float | None = None,
        encode: Mapping[str, str] | None = None,
    ) -> dict:
        """Send N observations (N environments or robots) as one vectorized request.

        The observations are stacked to ``[N, ...]`` per input and sent with
        ``X-Batch-Rows: N``; the answer is every output ``[N, ...]``, row i for observation i
        (e.g. ``{"action": (N, 10, 7)}``). The server batches the rows like N requests, so
        the result equals N calls of :meth:`infer`. Options as for :meth:`infer`.

        Raises:
            ObservationSpecError (before sending; names the field, and the row when rows
            differ), PolicyServerError (422 names the field or row), PolicyTimeoutError,
            PolicyConnectionError, ProtocolError.
        """
        model = model or self.model
        deadline_s = deadline_s if deadline_s is not None else self.deadline_s
        deadline = time.monotonic() + deadline_s if deadline_s is not None else None
        if self.check_spec:
            for i, obs in enumerate(observations):
                try:
                    self.check_observation(obs, model)
                except ObservationSpecError as exc:
                    raise ObservationSpecError(exc.field, f"row {i}: {exc}") from None
        stacked = stack_observations(observations)
        route = f"/models/{model}/infer" if model else "/infer"
        response = _request(
            self._session, "POST", self.base_url + route, timeout_s=self.timeout_s, retries=self.retries,
            deadline=deadline, data=self._body(stacked, encode, rows=True),
            headers={**_infer_headers(self.api_key), "X-Batch-Rows": str(len(observations))},
            params={"outputs": ",".join(outputs)} if outputs else None,
        )
        self.last_model_version = response.headers.get("X-Model-Version")
        self.last_server_timing = response.headers.get("Server-Timing")
        self.last_batch_size = int(response.headers.get("X-Batch-Size", 0)) or None
        self.last_response_bytes = len(response.content)
        return _decode(response)

    def _body(self, obs: Mapping[str, Any], encode: Mapping[str, str] | None, rows: bool) -> bytes:
        """The wire body; image inputs named in ``encode`` (else the client's) go encoded."""
        encode = self.encode if encode is None else encode
        if encode:
            from image_codecs import encode_observation  # the optional codec, only when asked for

            obs = encode_observation(obs, encode, rows=rows)
        return dict_to_binary(dict(obs))

    def __call__(self, obs: Mapping[str, Any], *, deadline_s: float | None = None) -> dict:
        """``infer(obs, deadline_s=deadline_s)``: a PolicyClient is a ``robot_loop.ChunkPolicy``."""
        return self.infer(obs, deadline_s=deadline_s)

    def clone(self) -> PolicyClient:
        """A client with the same settings and its own connection, for another thread (the
        input spec cache is shared)."""
        twin = PolicyClient(
            self.base_url, api_key=self.api_key, admin_key=self.admin_key, model=self.model,
            timeout_s=self.timeout_s, deadline_s=self.deadline_s, retries=self.retries,
            check_spec=self.check_spec, use_env_proxies=self._session.trust_env, encode=self.encode,
            verify=self._session.verify, cert=self._session.cert,
        )
        twin._input_specs = self._input_specs
        return twin

    def input_spec(self, model: str | None = None, refresh: bool = False) -> list[dict]:
        """The model's inputs as the server declares them (read once, then cached)."""
        model = model or self.model
        if refresh or model not in self._input_specs:
            self._input_specs[model] = self.model_info(model)["inputs"]
        return self._input_specs[model]

    def check_observation(self, obs: Mapping[str, Any], model: str | None = None) -> None:
        """Check ``obs`` against the model's input spec (ObservationSpecError names the field).

        A mismatch against the cached spec re-reads it once, since a hot update may have
        changed the model's inputs.
        """
        try:
            check_observation(obs, self.input_spec(model))
        except ObservationSpecError:
            check_observation(obs, self.input_spec(model, refresh=True))

    def model_info(self, model: str | None = None) -> dict:
        """Name, version, digest, device, parameter count and input/output specs of a served model."""
        model = model or self.model
        return self._call("GET", f"/models/{model}" if model else "/model_info", headers=self._headers()).json()

    def models(self) -> list[dict]:
        """Every model the server knows: name, current version, state, device, kept versions."""
        return self._call("GET", "/models", headers=self._headers()).json()["models"]

    def update_model(
        self,
        *,
        model_path: str | None = None,
        weights: Mapping[str, Any] | None = None,
        version: int | None = None,
        model: str | None = None,
        wait_s: float | None = 10.0,
    ) -> dict:
        """Publish a new version to every worker and instance sharing the server's store.

        Give exactly one of ``model_path`` (a model directory inside the server's model
        root), ``weights`` (a state dict of arrays for the current architecture, e.g.
        ``{k: v.cpu().numpy() for k, v in module.state_dict().items()}``) or ``version``
        (roll back to a kept version). Returns once every worker of the instance that took
        the call serves it, or after ``wait_s`` seconds (default 10; 0: right after
        publishing, the old fire-and-forget; None: the server's ``--update-wait-s``):
        ``{"version": N, "previous": M, "all_workers": bool, "lagging": [pid, ...],
        "warnings": [...], ...}``. Other instances sharing the store follow within their
        poll interval. A refused update raises PolicyServerError
        (4xx names the reason; 507 when the store is full) and changes nothing. Never retried.
        """
        body: dict[str, Any] = {}
        for key, value in (("model_path", model_path), ("weights", weights), ("version", version), ("model", model)):
            if value is not None:
                body[key] = dict(value) if key == "weights" else value
        if weights is not None:
            return self._manage("/update_model", wait_s, data=dict_to_binary(body),
                                content_type="application/octet-stream")
        return self._manage("/update_model", wait_s, json_body=body)

    def load_model(self, name: str, model_path: str | None = None, wait_s: float | None = 10.0) -> dict:
        """Serve ``name`` on every worker (from ``model_path`` if given, else its current version);
        waits like :meth:`update_model`."""
        return self._manage(f"/models/{name}/load", wait_s, json_body={"model_path": model_path} if model_path else {})

    def unload_model(self, name: str, wait_s: float | None = 10.0) -> dict:
        """Stop serving ``name`` on every worker (its versions stay in the store); waits like
        :meth:`update_model`."""
        return self._manage(f"/models/{name}/unload", wait_s, json_body={})

    def _headers(self, admin: bool = False) -> dict[str, str]:
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        if admin and self.admin_key:
            headers["X-Admin-Key"] = self.admin_key
        return headers

    def _manage(self, route: str, wait_s: float | None, *, json_body: Any = None, data: bytes | None = None,
                content_type: str = "application/json") -> dict:
        longest_wait_s = 300.0  # the server's bound on any wait (None: its default, at most this)
        headers = {**self._headers(admin=True), "Content-Type": content_type}
        if json_body is not None:
            data = json.dumps(json_body).encode()
        return _request(
            self._session, "POST", self.base_url + route,
            timeout_s=self.timeout_s + (longest_wait_s if wait_s is None else wait_s), retries=0, data=data,
            headers=headers, params=None if wait_s is None else {"wait_s": wait_s},  # 0 is sent: "do not wait"
        ).json()

    def health(self) -> bool:
        """True while the server process answers."""
        return self._probe("/health")

    def ready(self) -> bool:
        """True once the model is loaded and warmed up."""
        return self._probe("/ready")

    def wait_until_ready(self, timeout_s: float = 60.0, poll_s: float = 0.2) -> None:
        """Poll /ready until the server answers 200; raise PolicyTimeoutError after ``timeout_s``.

        Each gunicorn worker loads its own copy of the model, so under several workers a
        few more polls may still land on one that is loading; a 503 from /infer is then
        worth a short retry in the caller's loop.
        """
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() >= deadline:
                raise PolicyTimeoutError(f"{self.base_url} not ready within {timeout_s} s")
            time.sleep(poll_s)

    def _probe(self, route: str) -> bool:
        try:
            self._call("GET", route)
            return True
        except (PolicyServerError, PolicyConnectionError):
            return False


# The robot loop lives in robot_loop.py; these names stay importable from here. Loaded on
# first use (PEP 562), since robot_loop imports this module's errors.
_LOOP_NAMES = ("ChunkRunner", "LoopClock", "RunnerStats")


def __getattr__(name: str) -> Any:
    if name in _LOOP_NAMES:
        import robot_loop

        return getattr(robot_loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
