"""The OpenAPI 3.0 description of every route, served at ``GET /openapi.json``.

Binary bodies (wire format v1, see docs/wire-formats.md) are ``application/octet-stream``; their
content is described in words, since a pickle frame has no JSON schema. The test suite
checks that this document and the app's routes name the same operations, and fuzzes the
running server from it (no answer may be a 5xx).
"""

from __future__ import annotations

from typing import Any

from policy_server.contract import MODEL_NAME_PATTERN

BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
ERROR_REF = {"$ref": "#/components/schemas/Error"}

# Every error a route may answer, with the words the server uses for it.
ERRORS = {
    "400": "Malformed or unsafe body, bad header or query parameter",
    "401": "Missing or wrong X-API-Key (or Authorization: Api-Key; X-Admin-Key on management routes)",
    "403": "A model_path outside --model-root, or a file in it that links outside",
    "404": "Unknown model or version",
    "409": "The change conflicts with the server's state (e.g. unloading the default model)",
    "411": "No Content-Length",
    "413": "Body over the configured limit, or more X-Batch-Rows than the queue holds",
    "426": "A plain GET (or another WebSocket version than 13) where a WebSocket upgrade is expected",
    "415": "Management body neither JSON nor application/octet-stream",
    "422": "Observation does not match the model's input spec (naming the field, and the row of a "
           "vectorized request), or the update failed validation",
    "503": "Not ready (model loading) or queue full (Retry-After)",
    "504": "The request's deadline passed before compute",
    "500": "The model store could not be written (read-only, permission); nothing was published",
    "507": "The model store is full; nothing was published",
}


def _errors(*codes: str) -> dict[str, Any]:
    return {
        code: {"description": ERRORS[code], "content": {"application/json": {"schema": ERROR_REF}}} for code in codes
    }


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


NAME = {
    "name": "name", "in": "path", "required": True, "description": "Model name",
    "schema": {"type": "string", "pattern": f"^{MODEL_NAME_PATTERN.pattern}$"},
}
WAIT_S = {
    "name": "wait_s", "in": "query", "required": False,
    "description": "Answer once every worker of this instance serves the new state, or after this many "
                   "seconds (default --update-wait-s, 10; 0 answers right after publishing)",
    "schema": {"type": "number", "minimum": 0, "maximum": 300},
}
REQUEST_ID = {
    "name": "X-Request-Id", "in": "header", "required": False,
    "description": "Echoed back; a fresh one is made when absent or not a sane token",
    "schema": {"type": "string", "maxLength": 128},
}

INFER = {
    "summary": "One observation in, the policy's outputs out",
    "description": (
        "The body is a dict of numpy arrays encoded by binary_protocol.dict_to_binary() "
        "(pickle protocol 5 in the PK5F frame, arrays out of band); the answer is encoded the "
        "same way. The decoder follows a strict allow-list: anything else is 400."
    ),
    "security": [{}, {"ApiKey": []}],
    "parameters": [
        {
            "name": "X-Deadline-Ms", "in": "header", "required": False,
            "description": "Drop the request (504) if compute has not started within this many ms; "
                           "lowers the server's default, never raises it",
            "schema": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
        },
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
        **_errors("400", "401", "404", "411", "413", "422", "503", "504"),
    },
}

UPDATE_BODY = {
    "type": "object",
    "description": "Exactly one of model_path, version; weights travel as application/octet-stream",
    "properties": {
        "model": {"type": "string", "description": "Model name (default: the default model)"},
        "model_path": {"type": "string", "description": "A model directory inside --model-root"},
        "version": {"type": "integer", "minimum": 1, "description": "Roll back to a kept version"},
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
    },
}


def _manage(summary: str, *, body: dict[str, Any] | None, path_name: bool, errors: tuple[str, ...]) -> dict:
    operation: dict[str, Any] = {
        "summary": summary,
        "security": [{}, {"AdminKey": []}, {"ApiKey": []}],
        "parameters": [*([NAME] if path_name else []), WAIT_S, REQUEST_ID],
        "responses": {"200": _json("Done (with per-worker state unless wait_s is 0)", UPDATED), **_errors(*errors)},
    }
    if body is not None:
        operation["requestBody"] = {"required": False, "content": body}
    return operation


def _get(summary: str, schema: dict[str, Any] | None = None, *, open_route: bool = False,
         errors: tuple[str, ...] = ("401",), parameters: tuple[dict, ...] = ()) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "security": [{}] if open_route else [{}, {"ApiKey": []}],
            "parameters": [*parameters, REQUEST_ID],
            "responses": {"200": _json(summary, schema), **_errors(*errors)},
        }
    }


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


# -- Open Inference Protocol v2 (KServe v2 REST, Triton's binary tensor data extension) --------
OIP_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                 "FP16", "FP32", "FP64"]
OIP_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": OIP_DATATYPES},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0},
                  "description": "The first dimension N is the batch: a vectorized request of N rows"},
        "data": {"type": "array", "items": {}, "description": "Row-major values, flat or nested"},
        "parameters": {"type": "object", "properties": {
            "binary_data_size": {"type": "integer", "minimum": 0,
                                 "description": "Bytes of this tensor in the binary part, in input order"},
        }},
    },
}
OIP_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string", "maxLength": 256},
        "parameters": {"type": "object", "properties": {
            "timeout": {"type": "integer", "minimum": 1,
                        "description": "Microseconds the request may wait before compute (504 past it)"},
            "binary_data_output": {"type": "boolean", "description": "Every output as binary data"},
        }},
        "inputs": {"type": "array", "minItems": 1, "items": OIP_TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"},
            "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
        }}},
    },
}
OIP_RESPONSE = {
    "type": "object",
    "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                   "id": {"type": "string"}, "outputs": {"type": "array", "items": OIP_TENSOR}},
}
OIP_METADATA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}, "description": "-1: the batch dimension"}}}},
        "outputs": {"type": "array", "items": {"type": "object"}},
    },
}
VERSION = {"name": "version", "in": "path", "required": True, "description": "Model version (the store's number)",
           "schema": {"type": "string"}}
HEADER_LENGTH = {
    "name": "Inference-Header-Content-Length", "in": "header", "required": False,
    "description": "Binary tensor data extension: the JSON header is this many bytes at the start of the body; "
                   "the tensors' raw little-endian row-major bytes follow, in input order",
    "schema": {"type": "integer", "minimum": 1},
}


def _oip_infer(operation_id: str, versioned: bool) -> dict[str, Any]:
    return {"post": {
        "operationId": operation_id,
        "summary": "Open Inference Protocol v2 inference (JSON tensors or binary tensor data)"
                   + (" on one model version" if versioned else ""),
        "description": "Same batcher, keys, deadlines and metrics as /infer; the shape's first dimension N is a "
                       "vectorized request (N rows toward the batch cap). Errors are {\"error\": \"...\"} (with "
                       "our \"detail\" beside it).",
        "security": [{}, {"ApiKey": []}],
        "parameters": [NAME, *([VERSION] if versioned else []), HEADER_LENGTH, INFER["parameters"][0], REQUEST_ID],
        "requestBody": {"required": True, "content": {"application/json": {"schema": OIP_REQUEST}, **BINARY}},
        "responses": {
            "200": {
                "description": "JSON outputs; with binary outputs, a JSON header of "
                               "Inference-Header-Content-Length bytes then the raw tensors",
                "headers": {
                    "X-Model-Version": {"schema": {"type": "string"}},
                    "Inference-Header-Content-Length": {"schema": {"type": "integer"}},
                },
                "content": {"application/json": {"schema": OIP_RESPONSE}, **BINARY},
            },
            **_errors("400", "401", "404", "411", "413", "422", "503", "504"),
        },
    }}


def oip_paths() -> dict[str, Any]:
    """The ``/v2`` routes (policy_server/oip_routes.py)."""
    meta = ("401", "404", "503")
    return {
        "/v2": _get("Open Inference Protocol server metadata (name, version, extensions)"),
        "/v2/health/live": _get("OIP liveness", open_route=True, errors=()),
        "/v2/health/ready": _get("OIP readiness: the default model is loaded and warm", open_route=True,
                                 errors=("503",)),
        "/v2/models/{name}": _get("OIP model metadata: inputs and outputs with datatypes, -1 for the batch",
                                  OIP_METADATA, errors=meta, parameters=(NAME,)),
        "/v2/models/{name}/versions/{version}": _get(
            "OIP model metadata of one version (404 unless it is the one served)", OIP_METADATA, errors=meta,
            parameters=(NAME, VERSION)),
        "/v2/models/{name}/ready": _get("OIP model readiness", errors=meta, parameters=(NAME,)),
        "/v2/models/{name}/versions/{version}/ready": _get("OIP model version readiness", errors=meta,
                                                           parameters=(NAME, VERSION)),
        "/v2/models/{name}/infer": _oip_infer("oip_infer", versioned=False),
        "/v2/models/{name}/versions/{version}/infer": _oip_infer("oip_infer_version", versioned=True),
    }


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
                      **_errors("400", "401", "404", "426")},
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
            "/healthz": _get("Liveness under openpi's probe path (as /health)", open_route=True, errors=("503",)),
            "/health": _get("Liveness: the process answers and its batcher thread runs (503 once it ended)",
                             open_route=True, errors=("503",)),
            "/ready": _get("Readiness: the default model is loaded and warm", open_route=True, errors=("503",)),
            "/metrics": {"get": {
                "summary": "Prometheus metrics summed over every worker", "security": [{}],
                "parameters": [REQUEST_ID],
                "responses": {"200": {"description": "Text exposition format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}}},
            }},
            "/openapi.json": _get("This document", open_route=True, errors=()),
            "/stats": _get("Latency percentiles, throughput, CPU and memory over every worker"),
            "/model_info": _get("The default model's name, version, device and input/output specs", MODEL_INFO,
                                errors=("401", "503")),
            "/models": _get("Every model: version, state, device, kept versions, per-worker versions"),
            "/models/{name}": _get("One model's info", MODEL_INFO, errors=("400", "401", "404", "503"),
                                   parameters=(NAME,)),
            "/update_model": {"post": {
                **_manage("Publish a new version (model_path, weights or rollback) to every worker",
                          body=command_body, path_name=False,
                          errors=("400", "401", "403", "404", "413", "415", "422", "503", "500", "507")),
                "operationId": "update_model",
            }},
            "/models/{name}/load": {"post": {
                **_manage("Serve a model (from model_path, or its current version)", body=command_body,
                          path_name=True, errors=("400", "401", "403", "404", "413", "415", "422", "500", "507")),
                "operationId": "load_model",
            }},
            "/models/{name}/unload": {"post": {
                **_manage("Stop serving a model (its versions stay in the store)", body=None, path_name=True,
                          errors=("400", "401", "404", "409")),
                "operationId": "unload_model",
            }},
            **oip_paths(),
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error", "detail"],
                    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
                },
            },
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                           "description": "Also accepted as 'Authorization: Api-Key <key>' (openpi's client)"},
                "AdminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-Key"},
            },
        },
    }
