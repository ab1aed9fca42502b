"""The Open Inference Protocol v2 part of the OpenAPI document (policy_server/oip/routes.py):
its schemas and ``/v2`` paths, merged into :func:`policy_server.app.openapi.openapi_document`."""

from __future__ import annotations

from typing import Any

from policy_server.app.openapi_parts import (
    BINARY,
    DEADLINE,
    EPISODE,
    NAME,
    PIN,
    REQUEST_ID,
    error_responses,
    get_operation,
)

# KServe v2 REST, with Triton's binary tensor data extension
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
            "episode_id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$",
                           "description": "The request's episode (as X-Episode-Id): a running canary assigns it"},
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
VERSION = {"name": "version", "in": "path", "required": True,
           "description": "Model version (the store's number); inference is pinned to it (409 when not served)",
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
        "parameters": [NAME, *([VERSION] if versioned else []), HEADER_LENGTH, DEADLINE, PIN, EPISODE, REQUEST_ID],
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
            **error_responses("400", "401", "404", "409", "411", "413", "422", "503", "504"),
        },
    }}


def oip_paths() -> dict[str, Any]:
    """The ``/v2`` routes (policy_server/oip/routes.py)."""

    meta = ("401", "404", "503")
    return {
        "/v2": get_operation("Open Inference Protocol server metadata (name, version, extensions)"),
        "/v2/health/live": get_operation("OIP liveness", open_route=True, errors=()),
        "/v2/health/ready": get_operation("OIP readiness: the default model is loaded and warm", open_route=True,
                                 errors=("503",)),
        "/v2/models/{name}": get_operation("OIP model metadata: inputs and outputs with datatypes, -1 for the batch",
                                  OIP_METADATA, errors=meta, parameters=(NAME,)),
        "/v2/models/{name}/versions/{version}": get_operation(
            "OIP model metadata of one version (404 unless this worker serves it)", OIP_METADATA, errors=meta,
            parameters=(NAME, VERSION)),
        "/v2/models/{name}/ready": get_operation("OIP model readiness", errors=meta, parameters=(NAME,)),
        "/v2/models/{name}/versions/{version}/ready": get_operation("OIP model version readiness", errors=meta,
                                                           parameters=(NAME, VERSION)),
        "/v2/models/{name}/infer": _oip_infer("oip_infer", versioned=False),
        "/v2/models/{name}/versions/{version}/infer": _oip_infer("oip_infer_version", versioned=True),
    }


