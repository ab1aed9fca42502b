"""Episode outcomes, reported by the clients that ran the episodes: ``POST /models/<name>/outcomes``.

A robot (or ``ChunkRunner.report_outcome``) sends ``{"episode_id", "version", "success",
"return"?}`` once its episode ended; the server counts it in
``policy_episode_outcomes_total{model, version, outcome}`` (and the return in
``policy_episode_return``), so success per version, a canary's candidate against the
stable version, is one Prometheus query. The server keeps no episode state: a report is
counted as it comes (the client sends it once, never retried). Only versions the store
keeps (or this worker serves) are counted, so the labels stay bounded.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, jsonify, request

from policy_server.app.access import REPORTS, RouteGroup
from policy_server.app.observability import note
from policy_server.app.web import read_command
from policy_server.config import ServerConfig
from policy_server.contract import check_model_name
from policy_server.errors import BadRequest, UnknownModel, UnknownVersion, UnsupportedMediaType
from policy_server.inputs.episodes import VERSION_NUMBER, parse_episode_id
from policy_server.telemetry import metrics

log = logging.getLogger(__name__)

MAX_OUTCOME_BYTES = 4096
OUTCOME_KEYS = ("episode_id", "version", "success", "return")


@dataclass(frozen=True)
class Outcome:
    """One episode's end: its id, the version that ran it, success, and the return if given."""

    episode_id: str
    version: str
    success: bool
    episode_return: float | None = None


def parse_outcome(body: dict[str, Any]) -> Outcome:
    """An outcome report's fields; BadRequest naming the field that is missing or malformed."""
    unknown = sorted(set(body) - set(OUTCOME_KEYS))
    if unknown:
        raise BadRequest(f"unknown field {str(unknown[0])[:40]!r}; an outcome has {list(OUTCOME_KEYS)}")
    for key in OUTCOME_KEYS[:3]:
        if key not in body:
            raise BadRequest(f"{key} is required")
    episode_id = parse_episode_id(body["episode_id"], "episode_id")
    if episode_id is None:
        raise BadRequest("episode_id is required")
    raw = body["version"]
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        version = str(raw)
    elif isinstance(raw, str) and 0 < len(raw) <= 64:
        version = str(int(raw)) if VERSION_NUMBER.fullmatch(raw) else raw
    else:
        raise BadRequest("version must be the version that ran the episode (as X-Model-Version names it)")
    if not isinstance(body["success"], bool):
        raise BadRequest("success must be true or false")
    episode_return = body.get("return")
    if episode_return is not None:
        try:  # an integer past a float's range overflows: not finite either
            finite = not isinstance(episode_return, bool) and math.isfinite(float(episode_return))
        except (TypeError, ValueError, OverflowError):
            finite = False
        if not finite or not isinstance(episode_return, (int, float)):
            raise BadRequest("return must be a finite number")
        episode_return = float(episode_return)
    return Outcome(episode_id, version, body["success"], episode_return)


def counted_versions(runtime, name: str) -> set[str]:
    """The versions of ``name`` outcomes are counted for: every version the store keeps and
    names, else what this worker serves. UnknownModel for a model neither knows."""
    store = runtime.store
    if store is not None:
        pointer = store.pointer(name)
        if pointer is None:
            raise UnknownModel(f"no model named {name!r} in the store")
        return {str(v) for v in (*store.versions(name), *pointer.served_versions())}
    held = runtime.held(name)
    if held is None:
        raise UnknownModel(f"model {name!r} is not loaded")
    return set(held.versions)


def outcomes_blueprint(config: ServerConfig, runtime) -> Blueprint:
    """The outcome route over ``runtime`` (a :class:`policy_server.serving.runtime.PolicyRuntime`)."""
    reports = RouteGroup(REPORTS, config.api_key, config.admin_key)

    @reports.post("/models/<name>/outcomes")
    def report_outcome(name: str):
        check_model_name(name)
        if request.mimetype != "application/json":
            raise UnsupportedMediaType(f"send the outcome as application/json, not {request.mimetype or 'nothing'!r}")
        outcome = parse_outcome(read_command(MAX_OUTCOME_BYTES))
        known = counted_versions(runtime, name)
        if outcome.version not in known:
            shown = sorted(known, key=lambda v: (len(v), v))
            raise UnknownVersion(f"model {name!r} has no version {outcome.version} to count an outcome for "
                                 f"(known: {', '.join(shown)})")
        label = "success" if outcome.success else "failure"
        metrics.EPISODE_OUTCOMES.labels(name, outcome.version, label).inc()
        if outcome.episode_return is not None:
            metrics.EPISODE_RETURN.labels(name, outcome.version).observe(outcome.episode_return)
        note(model=name, episode=outcome.episode_id)
        log.info(json.dumps({"outcome": label, "model": name, "version": outcome.version,
                             "episode_id": outcome.episode_id, "return": outcome.episode_return}))
        return jsonify({"model": name, "version": outcome.version, "episode_id": outcome.episode_id,
                        "outcome": label, "return": outcome.episode_return})

    return reports
