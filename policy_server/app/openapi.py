"""The OpenAPI 3.0 description of every route, served at ``GET /openapi.json``.

Binary bodies (wire format v1, see docs/wire-formats.md) are ``application/octet-stream``; their
content is described in words, since a pickle frame has no JSON schema. The test suite
checks that this document and the app's routes name the same operations, and fuzzes the
running server from it (no answer may be a 5xx).
"""

from __future__ import annotations

from typing import Any

from policy_server.app.openapi_episodes import CANARY_FIELD, VERSIONS, outcome_paths
from policy_server.app.openapi_oip import oip_paths
from policy_server.app.openapi_parts import (
    BINARY,
    DEADLINE,
    EPISODE,
    NAME,
    PIN,
    REQUEST_ID,
    WAIT_S,
    error_responses,
    get_operation,
    json_response,
)

INFER = {
    "summary": "One observation in, the policy's outputs out",
    "description": (
        "The body is a dict of numpy arrays encoded by binary_protocol.dict_to_binary() "
        "(pickle protocol 5 in the PK5F frame, arrays out of band); the answer is encoded the "
        "same way. The decoder follows a strict allow-list: anything else is 400."
    ),
    "security": [{}, {"ApiKey": []}],
    "parameters": [
        DEADLINE,
        PIN,
        EPISODE,
        {
            "name": "X-Batch-Rows", "in": "header", "required": False,
            "description": "A vectorized request: N observations from N environments or robots, every "
                           "input [N, *shape]. Its rows count N toward the batch cap, are split across "
                           "batches as needed, and every output is answered [N, *shape] in row order. "
                           "A leading dimension that is not N is 422 naming the field; a per-row problem "
                           "is 422 naming the row; more rows than the queue holds is 413",
            "schema": {"type": "integer", "minimum": 1},
        },
        {
            "name": "outputs", "in": "query", "required": False,
            "description": "Comma-separated optional outputs to add (e.g. attention); see optional_outputs "
                           "in /model_info",
            "schema": {"type": "string"},
        },
        REQUEST_ID,
    ],
    "requestBody": {"required": True, "content": BINARY},
    "responses": {
        "200": {
            "description": "The outputs, e.g. {'action': float32[10, 7]}",
            "headers": {
                "X-Model-Version": {"schema": {"type": "string"}, "description": "Version that computed it"},
                "Server-Timing": {"schema": {"type": "string"}, "description": "read, decode, queue, compute, "
                                                                                "encode in ms"},
                "X-Batch-Size": {"schema": {"type": "integer"}, "description": "Rows in its batch (the largest "
                                                                                "batch, for a vectorized request)"},
                "X-Batch-Rows": {"schema": {"type": "integer"}, "description": "Echoed for a vectorized request"},
                "X-Cache": {"schema": {"type": "string", "enum": ["hit", "miss"]}},
                "X-Request-Id": {"schema": {"type": "string"}},
            },
            "content": BINARY,
        },
        **error_responses("400", "401", "404", "409", "411", "413", "422", "503", "504"),
    },
}

UPDATE_BODY = {
    "type": "object",
    "description": "Exactly one of model_path, version (or canary alone); weights travel as "
                   "application/octet-stream",
    "properties": {
        "model": {"type": "string", "description": "Model name (default: the default model)"},
        "model_path": {"type": "string", "description": "A model directory inside --model-root"},
        "version": {"type": "integer", "minimum": 1,
                    "description": "Roll back to a kept version, or promote the running canary's candidate"},
        "canary": CANARY_FIELD,
    },
    "additionalProperties": False,
}
UPDATED = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "version": {"type": "integer"},
        "previous": {"type": "integer", "nullable": True},
        "all_workers": {"type": "boolean"},
        "switch_s": {"type": "number", "nullable": True},
        "workers": {"type": "object"},
        "lagging": {"type": "array", "items": {"type": "integer"}, "description": "Workers not switched in time"},
        "warnings": {"type": "array", "items": {"type": "string"}},
        "canary": {"type": "object", "nullable": True, "properties": {
            "version": {"type": "integer"}, "fraction": {"type": "number"}}},
        "retained": {"type": "object", "nullable": True, "properties": {
            "version": {"type": "integer"}, "since": {"type": "number"}}},
    },
}


def _manage(summary: str, *, body: dict[str, Any] | None, path_name: bool, errors: tuple[str, ...]) -> dict:
    operation: dict[str, Any] = {
        "summary": summary,
        "security": [{}, {"AdminKey": []}, {"ApiKey": []}],
        "parameters": [*([NAME] if path_name else []), WAIT_S, REQUEST_ID],
        "responses": {
            "200": json_response("Done (with per-worker state unless wait_s is 0)", UPDATED),
            **error_responses(*errors),
        },
    }
    if body is not None:
        operation["requestBody"] = {"required": False, "content": body}
    return operation


SPEC_LIST = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["name", "dtype", "shape"],
        "properties": {
            "name": {"type": "string"}, "dtype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "optional": {"type": "boolean", "description": "Inputs only: a request may omit it (zeros are filled)"},
            "history": {
                "type": "object", "description": "Inputs only: a window of the last `steps` observations, "
                                                 "shape [steps, ...], row steps-1 the newest",
                "properties": {"steps": {"type": "integer", "minimum": 1},
                               "pad": {"type": "string", "enum": ["repeat_first", "zeros"]}},
            },
        },
    },
}
MODEL_INFO = {
    "type": "object",
    "required": ["name", "version", "inputs", "outputs"],
    "properties": {
        "name": {"type": "string"}, "version": {"type": "string"}, "digest": {"type": "string"},
        "device": {"type": "string"}, "num_parameters": {"type": "integer"},
        "inputs": SPEC_LIST, "outputs": SPEC_LIST,
        "optional_inputs": {"type": "array", "items": {"type": "string"},
                            "description": "Inputs a request may omit; real-time chunking models list "
                                           "action_prefix, prefix_length and inference_delay"},
        "optional_outputs": {"type": "array", "items": {"type": "string"}},
        "encoded_inputs": {"type": "array", "items": {"type": "string"},
                           "description": "uint8 image inputs that may arrive JPEG/PNG encoded (opt in)"},
        "image_codecs": {"type": "array", "items": {"type": "string", "enum": ["jpeg", "png"]}},
    },
}


MODEL_DETAIL = {**MODEL_INFO, "properties": {**MODEL_INFO["properties"], **VERSIONS}}

WEBSOCKET_UPGRADE = (
    "A WebSocket upgrade (Upgrade: websocket, Connection: Upgrade, Sec-WebSocket-Key, Sec-WebSocket-Version: 13). "
    "The server sends one msgpack frame of metadata once the model is ready, then answers each msgpack observation "
    "frame with one frame of outputs; an error is a text frame and a close. A plain GET is answered 426 (405 where "
    "POST serves). See README.md, \"openpi's WebSocket wire\"."
)


def _websocket(summary: str, operation_id: str, *, named: bool) -> dict[str, Any]:
    """An upgrade to openpi's protocol: OpenAPI 3.0 has no WebSocket, so the GET it is, with ``x-websocket``."""
    return {
        "summary": summary, "description": WEBSOCKET_UPGRADE, "x-websocket": "openpi", "operationId": operation_id,
        "security": [{}, {"ApiKey": []}], "parameters": [*([NAME] if named else []), REQUEST_ID],
        "responses": {"101": {"description": "Switching Protocols: openpi's WebSocket protocol follows"},
                      **error_responses("400", "401", "404", "426")},
    }


def openapi_document(version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3.0.3 document of the server's routes."""
    command_body = {"application/json": {"schema": UPDATE_BODY}, **BINARY}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Robot policy server",
            "version": version,
            "description": "Batched torch policy inference for robot and simulator loops. "
                           "See README.md and docs/wire-formats.md.",
        },
        "servers": [{"url": "/"}],
        "paths": {
            "/infer": {
                "post": {**INFER, "operationId": "infer"},
                "get": _websocket("openpi's WebSocket protocol, the default model", "openpi_infer", named=False),
            },
            "/models/{name}/infer": {
                "post": {
                    **INFER, "operationId": "infer_named", "summary": "Inference on a named model",
                    "parameters": [NAME, *INFER["parameters"]],
                },
                "get": _websocket("openpi's WebSocket protocol, a named model", "openpi_infer_named", named=True),
            },
            "/": {"get": _websocket("openpi's WebSocket protocol at ws://host:port", "openpi_root", named=False)},
            "/healthz": get_operation("Liveness under openpi's probe path (as /health)", open_route=True,
                                      errors=("503",)),
            "/health": get_operation("Liveness: the process answers and its batcher thread runs (503 once it ended)",
                             open_route=True, errors=("503",)),
            "/ready": get_operation("Readiness: the default model is loaded and warm", open_route=True,
                                    errors=("503",)),
            "/metrics": {"get": {
                "summary": "Prometheus metrics summed over every worker", "security": [{}],
                "parameters": [REQUEST_ID],
                "responses": {"200": {"description": "Text exposition format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}}},
            }},
            "/openapi.json": get_operation("This document", open_route=True, errors=()),
            "/stats": get_operation("Latency percentiles, throughput, CPU and memory over every worker"),
            "/model_info": get_operation("The default model's info, as /models/{name}", MODEL_DETAIL,
                                errors=("401", "503")),
            "/models": get_operation("Every model: version, state, device, kept versions, per-worker versions"),
            "/models/{name}": get_operation(
                "One model's info: the stable version's specs, its canary and retained version, the memory held",
                MODEL_DETAIL,
                errors=("400", "401", "404", "503"), parameters=(NAME,)),
            "/update_model": {"post": {
                **_manage("Publish a new version (model_path, weights or rollback), or a canary, to every worker",
                          body=command_body, path_name=False,
                          errors=("400", "401", "403", "404", "409", "413", "415", "422", "503", "500", "507")),
                "operationId": "update_model",
            }},
            "/models/{name}/load": {"post": {
                **_manage("Serve a model (from model_path, or its current version)", body=command_body,
                          path_name=True,
                          errors=("400", "401", "403", "404", "409", "413", "415", "422", "500", "507")),
                "operationId": "load_model",
            }},
            "/models/{name}/unload": {"post": {
                **_manage("Stop serving a model (its versions stay in the store)", body=None, path_name=True,
                          errors=("400", "401", "404", "409")),
                "operationId": "unload_model",
            }},
            **outcome_paths(),
            **oip_paths(),
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error", "detail"],
                    "properties": {
                        "error": {"type": "string"}, "detail": {"type": "string"},
                        "model": {"type": "string", "description": "409 version not served: the model"},
                        "version": {"type": "string", "description": "409 version not served: the version asked"},
                        "served_versions": {"type": "array", "items": {"type": "string"},
                                            "description": "409 version not served: what this worker serves"},
                    },
                },
            },
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                           "description": "Also accepted as 'Authorization: Api-Key <key>' (openpi's client)"},
                "AdminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-Key"},
            },
        },
    }
