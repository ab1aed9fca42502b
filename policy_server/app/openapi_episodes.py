"""The episode parts of the OpenAPI document: outcome reports, and the versions a model holds
(its canary, the retained version, their memory), merged into
:func:`policy_server.app.openapi.openapi_document`."""

from __future__ import annotations

from typing import Any

from policy_server.app.openapi_parts import NAME, REQUEST_ID, error_responses, json_response

VERSION_STR = {"type": "string", "description": "A store version, as X-Model-Version names it"}
CANARY = {
    "type": "object", "nullable": True,
    "description": "The running canary: its candidate gets this fraction of new episodes (by a hash of the id)",
    "properties": {"version": VERSION_STR, "fraction": {"type": "number", "minimum": 0, "maximum": 1},
                   "since": {"type": "number", "description": "Unix time the candidate was set"}},
}
RETAINED = {
    "type": "object", "nullable": True,
    "description": "The superseded version this worker still serves to pinned requests, until "
                   "retain_previous_s after the last one; null once it is dropped",
    "properties": {"version": VERSION_STR, "since": {"type": "number", "description": "Unix time it was superseded"}},
}
VERSIONS = {
    "stable_version": {**VERSION_STR, "description": "What requests without a pin (or a canary's share) get"},
    "canary": CANARY,
    "retained": RETAINED,
    "retain_previous_s": {"type": "number"},
    "held_versions": {
        "type": "array", "description": "Each version this worker holds, and the memory its weights take",
        "items": {"type": "object", "properties": {
            "version": VERSION_STR, "role": {"type": "string", "enum": ["stable", "candidate", "retained"]},
            "weight_bytes": {"type": "integer"}, "since": {"type": "number"},
        }},
    },
    "held_bytes": {"type": "integer", "description": "Bytes of weights held for this model, every version together"},
}
OUTCOME = {
    "type": "object",
    "required": ["episode_id", "version", "success"],
    "properties": {
        "episode_id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
        "version": {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string", "maxLength": 64}],
                    "description": "The version that ran the episode (the runner's pin)"},
        "success": {"type": "boolean"},
        "return": {"type": "number", "description": "The episode's return, if the task has one"},
    },
    "additionalProperties": False,
}
CANARY_FIELD = {
    "type": "number", "minimum": 0, "exclusiveMaximum": True, "maximum": 1,
    "description": "With model_path or weights: publish the new version as a canary candidate for this fraction of "
                   "new episodes; with version: make that kept version the candidate; alone: change the running "
                   "canary's fraction (0 ends it, its candidate retained). Promote with {\"version\": candidate}",
}


def outcome_paths() -> dict[str, Any]:
    """``POST /models/{name}/outcomes`` (policy_server/app/outcomes.py)."""
    return {
        "/models/{name}/outcomes": {"post": {
            "operationId": "report_outcome",
            "summary": "Report how an episode ended: counted in policy_episode_outcomes_total{model, version, outcome}",
            "security": [{}, {"ApiKey": []}],
            "parameters": [NAME, REQUEST_ID],
            "requestBody": {"required": True, "content": {"application/json": {"schema": OUTCOME}}},
            "responses": {
                "200": json_response("Counted", {"type": "object", "properties": {
                    "model": {"type": "string"}, "version": VERSION_STR, "episode_id": {"type": "string"},
                    "outcome": {"type": "string", "enum": ["success", "failure"]},
                    "return": {"type": "number", "nullable": True}}}),
                **error_responses("400", "401", "404", "413", "415"),
            },
        }},
    }
