"""``WebSocketPolicyClient``: ``PolicyClient`` over openpi's WebSocket protocol (``ws://``, ``wss://``).

``PolicyClient("ws://host:port")`` returns one. Inference goes over one WebSocket per model
(``ws://host:port/infer``, ``ws://host:port/models/<name>/infer``), the way openpi's
``WebsocketClientPolicy`` talks to this server; everything else (model info, management,
probes, vectorized requests) goes over HTTP to the same host (``http://`` for ``ws://``,
``https://`` for ``wss://``), as with a plain ``PolicyClient``. So a ``ChunkRunner`` runs over
it unchanged.

Unlike openpi's client, it reconnects: a connection the server closed (after an error, a
worker restart, a drain) is opened again at the next call, and a call that lost its
connection before an answer, or got a 503 (overloaded, not ready), is retried on a new one
(inference is idempotent), within the call's deadline and ``retries``. Needs the
``websocket`` extra (``websockets``, ``msgpack``), imported when the first connection opens.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any

from policy_client.client import PolicyClient
from policy_client.errors import PolicyConnectionError, PolicyServerError, PolicyTimeoutError

__all__ = ["WebSocketPolicyClient", "http_url"]

RETRY_AFTER_S = 1.0  # a 503 frame carries no Retry-After: wait what the server's 503s ask over HTTP


def http_url(ws_url: str) -> str:
    """The HTTP base URL of a WebSocket one (``ws://h:p/x`` -> ``http://h:p``)."""
    scheme, _, rest = ws_url.partition("://")
    host = rest.split("/", 1)[0]
    return f"{'https' if scheme == 'wss' else 'http'}://{host}"


class WebSocketPolicyClient(PolicyClient):
    """A :class:`PolicyClient` whose ``infer`` speaks openpi's WebSocket protocol. Arguments
    as for ``PolicyClient``; ``base_url`` is ``ws://host:port`` or ``wss://host:port`` (for
    ``wss://``, ``verify`` is the CA bundle as for ``https://``). ``infer`` takes no
    ``outputs`` or ``encode`` (the wire has neither). Not thread-safe: one per thread."""

    def __init__(self, base_url: str = "ws://127.0.0.1:50000", **kwargs: Any) -> None:
        super().__init__(http_url(base_url), **kwargs)
        self.url = base_url.rstrip("/")  # as given: a clone speaks the same wire
        self._sockets: dict[str | None, Any] = {}  # model -> open connection
        self.metadata: dict[str | None, dict] = {}  # model -> the server's first frame on it

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        super().close()

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
        """One observation over the WebSocket; the model's outputs (e.g. ``{"action": (10, 7)}``).
        ``version`` and ``episode_id`` travel as the frame's ``model_version`` and RoboArena's
        ``session_id`` (see ``PolicyClient.infer``).

        Raises:
            ObservationSpecError (before sending), PolicyServerError (the server's error frame:
            status, error and detail), PolicyTimeoutError, PolicyConnectionError, ProtocolError.
        """
        if outputs or encode:
            raise ValueError("openpi's WebSocket protocol carries no outputs= or encode=; use an http:// client")
        model = model or self.model
        deadline = self._deadline(deadline_s)
        if self.check_spec:
            self.check_observation(obs, model)
        import openpi_wire

        request = dict(obs)
        if version is not None:
            request["model_version"] = str(version)
        if episode_id is not None:
            request["session_id"] = episode_id
        if deadline is not None:
            request["deadline_ms"] = max(1.0, 1e3 * (deadline - time.monotonic()))
        frame = openpi_wire.encode(request)
        for attempt in range(self.retries + 1):
            sock = self._socket(model, deadline)
            try:
                sock.send(frame)
                answer = sock.recv(timeout=self._wait_s(deadline))
            except TimeoutError:
                self._drop(model)
                raise PolicyTimeoutError(f"no answer from {self.url} in time") from None
            except Exception as exc:  # noqa: BLE001 (websockets' ConnectionClosed and OSErrors: reconnect)
                self._drop(model)
                if attempt == self.retries or (deadline is not None and time.monotonic() >= deadline):
                    raise PolicyConnectionError(f"lost the WebSocket to {self.url}: {exc}") from exc
                continue
            if isinstance(answer, str):
                self._drop(model)  # the server closes after an error frame
                error = _server_error(answer)
                wait_s = min(RETRY_AFTER_S, self._wait_s(deadline))
                if error.status == 503 and attempt < self.retries and (deadline is None or wait_s >= RETRY_AFTER_S):
                    time.sleep(wait_s)  # overloaded or not ready: as the HTTP client retries a 503
                    continue
                raise error
            return self._outputs(openpi_wire.decode(answer), model)
        raise AssertionError("unreachable")

    def _outputs(self, answer: Any, model: str | None) -> dict:
        if not isinstance(answer, dict):
            raise PolicyServerError(502, "bad answer", f"expected a map, got {type(answer).__name__}")
        timing = answer.pop("server_timing", {})
        self.last_model_version = answer.pop("model_version", None)
        self.last_batch_size = int(timing.get("batch_size", 0)) or None
        self.last_server_timing = ", ".join(f"{k};dur={v:.3f}" for k, v in timing.items() if k.endswith("_ms"))
        action = self.metadata.get(model, {}).get("action_output", "actions")
        if action != "actions":
            answer.pop("actions", None)  # openpi's alias of the action chunk
        return answer

    def _socket(self, model: str | None, deadline: float | None):
        sock = self._sockets.get(model)
        if sock is not None:
            return sock
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        import openpi_wire

        url = self.url.split("/", 3)
        url = "/".join(url[:3]) + (f"/models/{model}/infer" if model else "/infer")
        headers = {"X-API-Key": self.api_key} if self.api_key else None
        context = None
        if url.startswith("wss://"):
            context = ssl.create_default_context(cafile=self._session.verify if isinstance(self._session.verify, str)
                                                 else None)
            if self._session.verify is False:
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:
            sock = connect(url, additional_headers=headers, compression=None, max_size=None, ssl=context,
                           open_timeout=self._wait_s(deadline))
            self.metadata[model] = openpi_wire.decode(sock.recv(timeout=self._wait_s(deadline, longest=300.0)))
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise PolicyServerError(status, "upgrade refused", exc.response.body.decode("utf-8", "replace")[:500]) \
                from exc
        except TimeoutError as exc:
            raise PolicyTimeoutError(f"no WebSocket from {url} in time") from exc
        except OSError as exc:
            raise PolicyConnectionError(f"could not open a WebSocket to {url}: {exc}") from exc
        self._sockets[model] = sock
        return sock

    def _drop(self, model: str | None) -> None:
        sock = self._sockets.pop(model, None)
        if sock is not None:
            sock.close()

    def _wait_s(self, deadline: float | None, longest: float | None = None) -> float:
        wait = self.timeout_s if longest is None else longest
        return wait if deadline is None else max(0.001, min(wait, deadline - time.monotonic()))


def _server_error(text: str) -> PolicyServerError:
    """The server's error frame, ``"<status> <error>: <detail>"``, as the HTTP client raises it."""
    head, _, detail = text.partition(": ")
    status, _, error = head.partition(" ")
    return PolicyServerError(int(status) if status.isdigit() else 500, error or "error", detail)
