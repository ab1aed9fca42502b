"""The pieces of the OpenAPI document that several of its parts share: content types, the
errors and their words, common parameters, and the builders of simple operations."""

from __future__ import annotations

from typing import Any

from policy_server.contract import MODEL_NAME_PATTERN
from policy_server.inputs.episodes import EPISODE_HEADER, VERSION_HEADER

BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
ERROR_REF = {"$ref": "#/components/schemas/Error"}

# Every error a route may answer, with the words the server uses for it.
ERRORS = {
    "400": "Malformed or unsafe body, bad header or query parameter",
    "401": "Missing or wrong X-API-Key (or Authorization: Api-Key; X-Admin-Key on management routes)",
    "403": "A model_path outside --model-root, or a file in it that links outside",
    "404": "Unknown model or version",
    "409": "The change conflicts with the server's state (e.g. unloading the default model, a plain update while "
           "a canary runs), or a request pinned to a version not served: nothing computed, the answer names "
           "`version` and `served_versions`",
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


def error_responses(*codes: str) -> dict[str, Any]:
    return {
        code: {"description": ERRORS[code], "content": {"application/json": {"schema": ERROR_REF}}} for code in codes
    }


def json_response(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
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

DEADLINE = {
    "name": "X-Deadline-Ms", "in": "header", "required": False,
    "description": "Drop the request (504) if compute has not started within this many ms; "
                   "lowers the server's default, never raises it",
    "schema": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
}
PIN = {
    "name": VERSION_HEADER, "in": "header", "required": False,
    "description": "Pin the request to this model version (an answer's X-Model-Version): exactly that version "
                   "computes it, on any worker; a version not served is 409 naming the versions served",
    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
}
EPISODE = {
    "name": EPISODE_HEADER, "in": "header", "required": False,
    "description": "The request's episode: without a pin, a running canary assigns the episode to its candidate "
                   "by a stable hash of this id",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
}


def get_operation(summary: str, schema: dict[str, Any] | None = None, *, open_route: bool = False,
                  errors: tuple[str, ...] = ("401",), parameters: tuple[dict, ...] = ()) -> dict[str, Any]:
    """A GET path item answering JSON (``open_route``: no key needed)."""
    return {
        "get": {
            "summary": summary,
            "security": [{}] if open_route else [{}, {"ApiKey": []}],
            "parameters": [*parameters, REQUEST_ID],
            "responses": {"200": json_response(summary, schema), **error_responses(*errors)},
        }
    }
