"""openpi's WebSocket policy protocol, the app side of one connection.

The protocol (openpi's ``WebsocketClientPolicy``, also RoboArena's, vLLM-Omni's and SGLang's):

1. after the upgrade, the server sends one binary frame: its metadata, a msgpack map. The
   client waits for it with no timeout, so it is held until the model is ready;
2. then each client frame is one observation (a msgpack map, numpy arrays as maps, see
   :mod:`openpi_wire`) and is answered by one frame, in order: the model's
   outputs, the action chunk also under ``actions`` (what openpi's scripts read),
   ``server_timing: {infer_ms, prev_total_ms, batch_size}`` and ``model_version``;
3. an error is a text frame (the client raises it as the error) and then a close (1011).

Here each frame goes the way of any request: decoded strictly, validated against the
model's spec, batched with every other wire's requests, bounded by the deadline (the server
default, or less with a ``deadline_ms`` field), counted in metrics (the route ``ws:`` + the
upgrade's rule), ``/stats`` and the access log. Nested maps flatten into input names joined
by ``/`` (ALOHA's ``images: {cam_high: ...}`` is the input ``images/cam_high``). RoboArena's
``endpoint: "reset"`` is answered ``reset successful`` (a text frame, as RoboArena's server
does) and its ``session_id`` is taken and kept. Answers never carry a traceback.

Episodes (see :mod:`policy_server.inputs.episodes`): the connection holds the version of its first
answer, and every later frame is pinned to it (a frame whose version was retired is
answered 409 and the connection closes). A ``reset`` or a new ``session_id`` starts a new
episode: the next answer pins it anew, and ``session_id`` is the episode id a canary
assigns by. A frame may also pin a version itself with ``model_version`` (this project's
client does, so its episode survives a reconnect).

Every array in an answer besides the action chunk must have a leading dimension of at least
the chunk's horizon, since openpi's ``ActionChunkBroker`` slices them all by step: outputs
that do not are left out of the answers (the metadata names them under ``omitted_outputs``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

import openpi_wire
from binary_protocol import ProtocolError
from policy_server.config import ServerConfig
from policy_server.errors import BadRequest, DeadlineExceeded, InvalidInput, NotReady, ServingError
from policy_server.front_door.conn import Reply
from policy_server.inputs.episodes import parse_episode_id, parse_version
from policy_server.serving.inference import Call, infer_call

log = logging.getLogger(__name__)

SERVER_NAME = "robot-policy-server"
ERROR_CLOSE = 1011  # internal error: what openpi's server closes with after an error frame
PROMPT = "prompt"  # openpi's instruction field: dropped for a model without an input of that name
RESERVED = ("endpoint", "session_id", "deadline_ms", "model_version")  # request fields that are not observations


def action_output(spec) -> tuple[str, int]:
    """The name of a model's action chunk output and its horizon: ``actions`` or ``action``
    when the model has one, else its first output; the horizon is its leading dimension."""
    names = [s.name for s in spec]
    name = next((n for n in ("actions", "action") if n in names), names[0])
    shape = next(s.shape for s in spec if s.name == name)
    return name, (shape[0] if shape else 1)


class OpenpiSession:
    """One openpi connection over ``runtime`` (a :class:`policy_server.serving.runtime.PolicyRuntime`),
    serving ``model`` (None: the default model). ``route`` labels its messages in metrics and
    logs; ``remote`` is the client's address; ``observe`` counts one answered message
    (:func:`policy_server.app.observability.count_message`)."""

    def __init__(self, runtime, config: ServerConfig, model: str | None, route: str, remote: str, observe) -> None:
        self.runtime = runtime
        self.config = config
        self.model = model
        self.route = route
        self.remote = remote
        self.observe = observe
        self.version: str | None = None  # of the model that greeted this connection
        self.session_id: str | None = None  # RoboArena's, when it sends one: the episode id
        self.pinned: str | None = None  # the version of this episode's first answer: later frames are pinned to it
        self.prev_total_ms: float | None = None

    # -- the first frame -----------------------------------------------------------

    def ready(self) -> bool:
        """Whether the model can be named in the first frame now (it is loaded, or unknown,
        which the first frame's attempt then reports)."""
        try:
            self.runtime.served(self.model)
        except NotReady:
            return False
        except ServingError:
            return True
        return True

    def greeting(self) -> bytes | None:
        """The metadata frame, or None while the model loads."""
        try:
            loaded = self.runtime.served(self.model).model
        except NotReady:
            return None
        self.version = loaded.version
        action, horizon = action_output(loaded.output_spec)
        answered = [s for s in loaded.output_spec if s.name not in loaded.optional_outputs]
        omitted = [s.name for s in answered if s.name != action and (not s.shape or s.shape[0] < horizon)]
        metadata = {
            **loaded.openpi_metadata,
            "server": SERVER_NAME,
            "model": loaded.name,
            "version": loaded.version,
            "inputs": [s.to_json() for s in loaded.input_spec],
            "outputs": [s.to_json() for s in answered if s.name not in omitted],
            "action_key": "actions",
            "action_output": action,
            "action_horizon": horizon,
            "omitted_outputs": omitted,
        }
        return openpi_wire.encode(metadata)

    # -- one message -----------------------------------------------------------------

    def handle(self, payload: bytes, arrived: float) -> Reply:
        """The reply to one client frame (on a request thread); errors become text + close."""
        request_id = uuid.uuid4().hex
        answer = None
        try:
            late_ms = 1e3 * (time.monotonic() - arrived) - self.config.deadline_ms
            if late_ms > 0:  # past even the longest deadline a frame may ask for: not decoded
                raise DeadlineExceeded(f"deadline passed {late_ms:.1f} ms before the frame reached a thread")
            request = openpi_wire.decode(payload)
            if not isinstance(request, dict):
                raise BadRequest(f"a frame is a msgpack map, not {type(request).__name__}")
            endpoint, deadline, asked = self._take_reserved(request, arrived)
            if endpoint == "reset":
                self.pinned = None  # a new episode: its first answer pins it
                return Reply("reset successful", record=self._recorder(request_id, arrived, 200, None))
            inputs = flatten(request)
            if PROMPT in inputs and not self._takes_prompt():
                del inputs[PROMPT]  # openpi's examples send one to every policy; one without text ignores it
            call = Call(self.model, inputs, deadline, version=asked or self.pinned, episode=self.session_id)
            answer = infer_call(self.runtime, self.config, call)
            self.pinned = answer.version
            data = openpi_wire.encode(self._answer_map(answer, arrived))
        except ProtocolError as exc:
            return Reply(f"400 bad request: frame rejected: {str(exc)[:500]}", ERROR_CLOSE,
                         record=self._recorder(request_id, arrived, 400, answer))
        except ServingError as exc:
            record = self._recorder(request_id, arrived, exc.status, answer)
            return Reply(f"{exc.status} {exc.error}: {exc.detail}"[:2000], ERROR_CLOSE, record=record)
        except Exception:  # never a traceback to the client: logged here, a generic error there
            log.exception("openpi message on %s failed", self.route)
            return Reply("500 internal server error: see the server log", ERROR_CLOSE,
                         record=self._recorder(request_id, arrived, 500, answer))
        self.prev_total_ms = 1e3 * (time.monotonic() - arrived)
        return Reply(data, deadline=deadline, record=self._recorder(request_id, arrived, 200, answer))

    def late(self, reply: Reply) -> Reply:
        """What replaces an answer whose deadline passed before it could be written."""
        return Reply("504 deadline exceeded: the answer was ready after the deadline; the late answer was dropped",
                     ERROR_CLOSE)

    def _take_reserved(self, request: dict, arrived: float) -> tuple[str, float, str | None]:
        endpoint = request.pop("endpoint", "infer")
        if not isinstance(endpoint, str) or endpoint not in ("infer", "reset"):
            raise BadRequest(f"endpoint must be 'infer' or 'reset', got {str(endpoint)[:20]!r}")
        session_id = request.pop("session_id", None)
        if session_id is not None:
            if isinstance(session_id, int) and not isinstance(session_id, bool):
                session_id = str(session_id)  # a number is its digits
            session_id = parse_episode_id(session_id, "session_id")  # as X-Episode-Id: 400 naming it
            if session_id != self.session_id:
                self.pinned = None  # another episode
            self.session_id = session_id
        pin = request.pop("model_version", None)
        if pin is not None:
            if isinstance(pin, bool) or not isinstance(pin, (str, int)):
                raise BadRequest("model_version must be a model version number")
            pin = parse_version(str(pin), "model_version")
        default_s = self.config.deadline_ms / 1000.0
        asked = request.pop("deadline_ms", None)
        if asked is not None and (isinstance(asked, bool) or not isinstance(asked, (int, float)) or not asked > 0):
            raise BadRequest("deadline_ms must be a positive number")
        deadline = arrived + (min(asked / 1000.0, default_s) if asked is not None else default_s)
        now = time.monotonic()
        if endpoint == "infer" and deadline <= now:
            raise DeadlineExceeded(f"deadline passed {1e3 * (now - deadline):.1f} ms before the frame reached a thread")
        return endpoint, deadline, pin

    def _takes_prompt(self) -> bool:
        """Whether the model (the version this connection is pinned to, else the stable one)
        has an input named ``prompt``."""
        return any(spec.name == PROMPT for spec in self._loaded(self.pinned).input_spec)

    def _loaded(self, version: str | None):
        """The model of ``version`` while this worker holds it, else the stable one."""
        held = self.runtime.held(self.model or self.runtime.default_name)
        return ((held.get(version) if held and version else None) or self.runtime.served(self.model)).model

    def _answer_map(self, answer, arrived: float) -> dict[str, Any]:
        loaded = self._loaded(answer.version)
        action, horizon = action_output(loaded.output_spec)
        out: dict[str, Any] = {
            name: value for name, value in answer.outputs.items()
            if name == action or (value.ndim and value.shape[0] >= horizon)
        }
        out["actions"] = answer.outputs[action]
        timing = {"infer_ms": 1e3 * (answer.queue_s + answer.compute_s), "batch_size": answer.batch_size}
        if self.prev_total_ms is not None:
            timing["prev_total_ms"] = self.prev_total_ms
        out["server_timing"] = timing
        out["model_version"] = answer.version
        return out

    def _recorder(self, request_id: str, arrived: float, status: int, answer):
        def record(delivered: bool, replaced: int | None, committed: float) -> None:
            self.observe(
                route=self.route, request_id=request_id, status=replaced or status, delivered=delivered,
                latency_s=committed - arrived, answer=answer, model=self.model or self.runtime.default_name,
                remote=self.remote, session_id=self.session_id,
            )

        return record


def flatten(observation: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """An openpi observation as input names -> values: nested maps joined by ``/`` (their
    keys must be UTF-8 strings: InvalidInput otherwise); the values are checked against the
    model's spec later, as on every wire."""
    out: dict[str, Any] = {}
    for key, value in observation.items():
        if not isinstance(key, str):
            raise InvalidInput(f"observation keys are strings; got {type(key).__name__} {str(key)[:40]!r}")
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(f"an observation key under {prefix or 'the top level'!r} is not valid UTF-8") from None
        name = prefix + key
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        else:
            out[name] = value
    return out
