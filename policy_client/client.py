"""``PolicyClient``: a keep-alive connection to one policy server (numpy and requests only).

Every call goes through one request path (``PolicyClient._call`` -> ``transport.request``):
deadlines, retries and error mapping are the same for inference, model management and probes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import requests

from binary_protocol import dict_to_binary
from policy_client import transport
from policy_client.errors import ObservationSpecError, PolicyConnectionError, PolicyServerError, PolicyTimeoutError
from policy_client.management import ModelManagement
from policy_client.observations import check_observation, stack_observations
from policy_client.transport import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S
from policy_client.unix_socket import UnixSocketAdapter, unix_socket_path

__all__ = ["PolicyClient"]


class PolicyClient(ModelManagement):
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
    ``base_url`` ``"ws://host:port"`` (or ``wss://``) makes a
    :class:`policy_client.websocket_client.WebSocketPolicyClient`: inference over openpi's
    WebSocket protocol, everything else over HTTP (needs the ``websocket`` extra).
    """

    def __new__(cls, base_url: str = "http://127.0.0.1:50000", *args: Any, **kwargs: Any) -> PolicyClient:
        if cls is PolicyClient and base_url.startswith(("ws://", "wss://")):
            from policy_client.websocket_client import WebSocketPolicyClient

            return super().__new__(WebSocketPolicyClient)
        return super().__new__(cls)

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
        self.url = base_url.rstrip("/")  # as given (a clone connects the same way)
        self.socket_path = unix_socket_path(base_url)
        self.base_url = "http://localhost" if self.socket_path else self.url
        self.encode = dict(encode or {})
        if self.encode:
            from policy_client.image_codecs import parse_codec  # numpy only; the codec libraries load when used

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
        self._session = transport.new_session(use_env_proxies)
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

    def _call(
        self,
        method: str,
        route: str,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        """The one request path: every call of this client goes through here (the client's
        ``timeout_s`` and ``retries`` unless given; ``kwargs`` as for ``transport.request``)."""
        return transport.request(
            self._session, method, self.base_url + route,
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
            retries=self.retries if retries is None else retries, **kwargs,
        )

    def _deadline(self, deadline_s: float | None) -> float | None:
        """The call's deadline as a ``time.monotonic()`` instant (``deadline_s``, else the client's)."""
        deadline_s = deadline_s if deadline_s is not None else self.deadline_s
        return time.monotonic() + deadline_s if deadline_s is not None else None

    def infer(
        self,
        obs: Mapping[str, Any],
        model: str | None = None,
        *,
        outputs: Sequence[str] | None = None,
        deadline_s: float | None = None,
        encode: Mapping[str, str] | None = None,
        version: str | int | None = None,
        episode_id: str | None = None,
    ) -> dict:
        """Send one observation, return the policy's outputs (e.g. ``{"action": (10, 7)}``).

        ``model`` (else the client's ``model``, else the server's default) picks the model.
        ``outputs`` asks for optional outputs the model lists in ``optional_outputs`` (e.g.
        ``["attention"]``). ``deadline_s`` (else the client's ``deadline_s``) bounds the whole
        call: past it the server drops the request (PolicyServerError 504) and the client
        stops waiting (PolicyTimeoutError). ``encode`` (else the client's ``encode``; ``{}``
        for none) sends those image inputs JPEG/PNG encoded. ``version`` pins the request to that
        model version (``X-Model-Version``: exactly it computes the answer, or 409); ``episode_id``
        names its episode (``X-Episode-Id``: a running canary assigns episodes by it). Sets
        ``last_model_version`` and friends.

        Raises:
            ObservationSpecError (before sending), PolicyServerError (409 ``version not
            served``: the pinned version was retired; ``body["served_versions"]``),
            PolicyTimeoutError, PolicyConnectionError, ProtocolError.
        """
        model = model or self.model
        deadline = self._deadline(deadline_s)
        if self.check_spec:
            self.check_observation(obs, model)
        return self._infer(model, self._body(obs, encode, rows=False), outputs, deadline,
                           episode=_episode_headers(version, episode_id))

    def infer_batch(
        self,
        observations: Sequence[Mapping[str, Any]],
        model: str | None = None,
        *,
        outputs: Sequence[str] | None = None,
        deadline_s: float | None = None,
        encode: Mapping[str, str] | None = None,
        version: str | int | None = None,
        episode_id: str | None = None,
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
        deadline = self._deadline(deadline_s)
        if self.check_spec:
            for i, obs in enumerate(observations):
                try:
                    self.check_observation(obs, model)
                except ObservationSpecError as exc:
                    raise ObservationSpecError(exc.field, f"row {i}: {exc}") from None
        stacked = stack_observations(observations)
        return self._infer(model, self._body(stacked, encode, rows=True), outputs, deadline, rows=len(observations),
                           episode=_episode_headers(version, episode_id))

    def _infer(
        self,
        model: str | None,
        body: bytes,
        outputs: Sequence[str] | None,
        deadline: float | None,
        rows: int | None = None,
        episode: Mapping[str, str] | None = None,
    ) -> dict:
        """POST an encoded observation (``rows``: a vectorized request of that many; ``episode``:
        its pin and episode headers), record the answer's headers in ``last_*`` and return its
        decoded outputs."""
        headers = {**transport.infer_headers(self.api_key), **(episode or {})}
        if rows is not None:
            headers["X-Batch-Rows"] = str(rows)
        route = f"/models/{model}/infer" if model else "/infer"
        try:
            response = self._call(
                "POST", route, deadline=deadline, data=body, headers=headers,
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
        return transport.decode(response)

    def _body(self, obs: Mapping[str, Any], encode: Mapping[str, str] | None, rows: bool) -> bytes:
        """The wire body; image inputs named in ``encode`` (else the client's) go encoded."""
        encode = self.encode if encode is None else encode
        if encode:
            from policy_client.image_codecs import encode_observation  # the optional codec, only when asked for

            obs = encode_observation(obs, encode, rows=rows)
        return dict_to_binary(dict(obs))

    def __call__(self, obs: Mapping[str, Any], *, deadline_s: float | None = None, version: str | None = None,
                 episode_id: str | None = None) -> dict:
        """``infer(obs, ...)``: a PolicyClient is a ``robot_loop.ChunkPolicy`` (one that pins episodes)."""
        return self.infer(obs, deadline_s=deadline_s, version=version, episode_id=episode_id)

    def clone(self) -> PolicyClient:
        """A client with the same settings and its own connection, for another thread (the
        input spec cache is shared)."""
        twin = PolicyClient(
            self.url, api_key=self.api_key, admin_key=self.admin_key, model=self.model,
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

    def _headers(self, admin: bool = False) -> dict[str, str]:
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        if admin and self.admin_key:
            headers["X-Admin-Key"] = self.admin_key
        return headers

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


def _episode_headers(version: str | int | None, episode_id: str | None) -> dict[str, str]:
    """``X-Model-Version`` and ``X-Episode-Id`` for the given pin and episode (none when None)."""
    headers = {}
    if version is not None:
        headers["X-Model-Version"] = str(version)
    if episode_id is not None:
        headers["X-Episode-Id"] = episode_id
    return headers
