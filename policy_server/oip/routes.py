"""The Open Inference Protocol v2 REST routes, beside the server's own and into the same batcher.

Registered by ``server.create_app`` as the ``oip`` blueprint, whose routes are in the same
audience groups as the server's own (:mod:`policy_server.app.access`): the health probes open,
inference and metadata behind the API key. A request's batch dimension N
is a vectorized request (N rows toward the batch cap, answered in row order); keys,
deadlines (``X-Deadline-Ms`` and the OIP ``timeout`` parameter, microseconds), metrics, the
access log, model versions, pins (``/versions/{N}/infer``, or ``X-Model-Version``) and
episodes (the ``episode_id`` parameter, or ``X-Episode-Id``) work as on ``/infer``: a pin to
a version not served is 409 and nothing is computed. Errors are OIP's ``{"error": "..."}``
(with our ``detail`` beside it). The codec is :mod:`policy_server.oip.codec`.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from policy_server.app.access import INFERENCE, INFO, PROBES, RouteGroup
from policy_server.app.observability import note
from policy_server.app.web import (
    answer_headers,
    error_response,
    note_deadline,
    read_body,
    request_arrival,
    request_deadline,
)
from policy_server.config import ServerConfig
from policy_server.errors import BadRequest, ServingError, UnknownModel
from policy_server.inputs.episodes import EPISODE_HEADER, VERSION_HEADER, parse_episode_id, parse_version
from policy_server.oip import codec as oip
from policy_server.serving.inference import Call, infer_call

SERVER_NAME = "robot-policy-server"
SERVER_VERSION = "0.1.0"


def oip_blueprint(config: ServerConfig, runtime) -> Blueprint:
    """The ``/v2`` routes over ``runtime`` (a :class:`policy_server.serving.runtime.PolicyRuntime`)."""
    bp = Blueprint("oip", __name__, url_prefix="/v2")  # the error format; its groups hold the routes
    keys = (config.api_key, config.admin_key)
    probes = RouteGroup(PROBES, *keys)
    info = RouteGroup(INFO, *keys)
    inference = RouteGroup(INFERENCE, *keys)

    # OIP's {"error": "..."} carries the whole message; our "detail" stays beside it. The
    # server's own error_response builds them, so a 503 says when to come back here too.
    @bp.errorhandler(ServingError)
    def _serving_error(exc: ServingError):
        message = f"{exc.error}: {exc.detail}" if exc.detail else exc.error
        return error_response(exc.status, message, exc.detail, exc.headers, exc.fields)

    @bp.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        detail = exc.description or ""
        return error_response(exc.code or 500, f"{(exc.name or 'error').lower()}: {detail}", detail)

    def served_version(name: str, version: str | None):
        served = runtime.served(name)
        if version is None:
            return served
        held = runtime.held(name)
        found = held.get(version) if held is not None else None
        if found is None:
            serving = held.versions if held is not None else [served.model.version]
            raise UnknownModel(f"model {name!r} version {version!r} is not served here (serving {serving})")
        return found

    def pinned(name: str, version: str | None) -> str | None:
        """The version a request pins: the path's (a version this worker serves under that
        name, else a version number), else ``X-Model-Version``; BadRequest for a malformed one."""
        header = parse_version(request.headers.get(VERSION_HEADER))
        if version is None:
            return header
        held = runtime.held(name)
        path = version if held is not None and held.get(version) is not None else parse_version(
            version, "the version in the path")
        if header is not None and header != path:
            raise BadRequest(f"{VERSION_HEADER} {header} and the path's version {path} differ")
        return path

    @info.get("")
    def server_metadata():
        return jsonify({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]})

    @probes.get("/health/live")
    def live():
        return jsonify({"live": True})

    @probes.get("/health/ready")
    def ready():
        _ = runtime.model  # NotReady -> 503 while loading or after a failed load
        return jsonify({"ready": True})

    @info.get("/models/<name>")
    @info.get("/models/<name>/versions/<version>")
    def model_metadata(name: str, version: str | None = None):
        model = served_version(name, version).model
        held = runtime.held(name)
        return jsonify(oip.model_metadata(name, model.version, model.input_spec, model.output_spec,
                                          held.versions if held is not None else ()))

    @info.get("/models/<name>/ready")
    @info.get("/models/<name>/versions/<version>/ready")
    def model_ready(name: str, version: str | None = None):
        model = served_version(name, version).model
        return jsonify({"name": name, "version": model.version, "ready": True})

    def infer_with(name: str, version: str | None) -> Response:
        t0 = time.perf_counter()
        deadline = request_deadline(config.deadline_ms)  # counted from the request's arrival
        body = read_body(config.max_body_bytes)
        t1 = time.perf_counter()
        header_length = oip.parse_header_length(
            request.headers.get(oip.HEADER_LENGTH), len(body), config.oip_max_json_bytes
        )
        pin = pinned(name, version)
        header_episode = parse_episode_id(request.headers.get(EPISODE_HEADER))
        served = runtime.resolve(name, pin).served  # the pinned version's spec (409 before decoding)
        decoded = oip.decode_request(
            body, header_length, config.oip_max_json_bytes, served.model.input_spec, config.queue_size
        )
        if decoded.timeout_us is not None:
            deadline = min(deadline, request_arrival() + decoded.timeout_us / 1e6)
            note_deadline(deadline)
        episode = decoded.episode_id or header_episode
        if header_episode is not None and episode != header_episode:
            raise BadRequest(f"{EPISODE_HEADER} and the parameter 'episode_id' differ")
        note(model=name, episode=episode)
        call = Call(name, decoded.inputs, deadline, decoded.rows, list(decoded.outputs), version=pin, episode=episode)
        t2 = time.perf_counter()
        answer = infer_call(runtime, config, call)
        note(answer=answer)
        t3 = time.perf_counter()
        outputs = answer.outputs
        if decoded.outputs:
            outputs = {n: outputs[n] for n in decoded.outputs if n in outputs}
        binary = {
            n: decoded.binary_output_default if decoded.outputs.get(n) is None else decoded.outputs[n] for n in outputs
        }
        payload, header_length = oip.encode_response(name, answer.version, outputs, binary, decoded.request_id)
        t4 = time.perf_counter()
        headers = answer_headers(answer, read_s=t1 - t0, decode_s=t2 - t1, encode_s=t4 - t3)
        if header_length is None:
            return Response(payload, status=200, mimetype="application/json", headers=headers)
        headers[oip.HEADER_LENGTH] = str(header_length)
        return Response(payload, status=200, mimetype="application/octet-stream", headers=headers)

    @inference.post("/models/<name>/infer")
    def infer(name: str):
        return infer_with(name, None)

    @inference.post("/models/<name>/versions/<version>/infer")
    def infer_version(name: str, version: str):
        return infer_with(name, version)

    for group in (probes, info, inference):
        bp.register_blueprint(group)
    return bp
