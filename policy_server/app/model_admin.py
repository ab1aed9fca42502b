"""Model updates as the worker that receives them handles them: stage, validate, publish, wait.

An update is staged as a complete model directory in the store's staging area (a copy
confined to the model root: see :mod:`policy_server.model.files`), its weights checked by
the staging itself (:meth:`ModelStore.stage`) before any of its code runs, then loaded and
warmed up on this worker's device (strict weights, finite outputs on several distinct
observations), and only then published: a failed check publishes nothing, and every worker
keeps serving what it served. The validated candidate is handed over explicitly
(:meth:`StoreFollower.validate` returns it; once published, :meth:`StoreFollower.adopt`
serves it here without loading it again). Publishing moves the pointer; every other
worker's store watcher does the rest (see :mod:`policy_server.serving.store_follower`). The answer
comes once every worker of this instance acted on the new pointer (read from the
instance's :class:`WorkerStatusBoard`; ``wait_s``, default ``--update-wait-s``), or says
which did not; ``wait_s=0`` answers right after publishing.

:class:`ModelAdmin` works with its collaborators only: the store, this worker's store
follower and the instance's status board. What the models look like from outside
(``/models``) is :mod:`policy_server.app.model_catalog`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from policy_server.config import ServerConfig
from policy_server.contract import WEIGHTS_FILE, check_model_name, require_model_dir
from policy_server.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidModel,
    NotReady,
    PayloadTooLarge,
    ServingError,
)
from policy_server.model import weights_check
from policy_server.serving.store_follower import StoreFollower
from policy_server.store.model_store import ModelStore, Pointer
from policy_server.store.pointer import check_fraction, running_canary_conflict
from policy_server.telemetry import metrics
from policy_server.telemetry.worker_status import WorkerStatusBoard

log = logging.getLogger(__name__)

MAX_WAIT_S = 300.0
WAIT_POLL_S = 0.02
UPDATE_KINDS = ("model_path", "weights", "version")
UPDATE_KEYS = frozenset(UPDATE_KINDS) | {"model", "canary"}
NO_STORE = "this server serves a fixed policy object; hot reload needs a model store"


def _without_paths(text: str, names: dict[str, str]) -> str:
    """``text`` with each path in ``names`` (and its real path) replaced by its short name:
    error details never show the server's directories or host name."""
    pairs = {}
    for path, short in names.items():
        for variant in {path, os.path.realpath(path)}:
            pairs[variant.rstrip(os.sep) + os.sep] = ""
            pairs[variant.rstrip(os.sep)] = short
    for path in sorted(pairs, key=len, reverse=True):
        text = text.replace(path, pairs[path])
    return text


class ModelAdmin:
    """Updates, rollbacks, loads and unloads, as seen from the worker that received them.

    ``store`` and ``follower`` (this worker's, which validates candidates and adopts
    published ones) are None for a server of a fixed policy object: every command is then
    Conflict (409). ``board`` is the instance's status board (what each worker serves).
    """

    def __init__(self, config: ServerConfig, store: ModelStore | None, follower: StoreFollower | None,
                 board: WorkerStatusBoard) -> None:
        self.config = config
        self._store = store
        self._follower = follower
        self.board = board
        self.model_root = os.path.realpath(config.model_root)

    @property
    def store(self) -> ModelStore:
        if self._store is None:
            raise Conflict(NO_STORE)
        return self._store

    @property
    def follower(self) -> StoreFollower:
        if self._follower is None:
            raise Conflict(NO_STORE)
        return self._follower

    # -- commands -------------------------------------------------------------------

    def update(self, body: Mapping[str, Any], wait_s: float | None) -> dict[str, Any]:
        """Publish a new version (``model_path`` or ``weights``) or roll back (``version``; with
        a canary running, only its candidate: a promotion). With ``canary`` F: publish the new
        version, or make kept ``version`` the candidate, for that fraction of new episodes; F
        alone changes the running canary's fraction, and 0 ends it."""
        unknown = sorted(set(body) - UPDATE_KEYS)
        if unknown:
            raise BadRequest(
                f"unknown field {unknown[0]!r}; expected one of {list(UPDATE_KINDS)} and optionally 'model', 'canary'"
            )
        kinds = [k for k in UPDATE_KINDS if k in body]
        canary = check_fraction(body["canary"]) if "canary" in body else None
        if len(kinds) > 1 or (not kinds and canary is None):
            raise BadRequest(f"give exactly one of {list(UPDATE_KINDS)} (or only 'canary' to change a running one)")
        name = check_model_name(body.get("model", self.config.model_name))
        store = self.store
        warnings: list[str] = []
        if not kinds:
            pointer = store.set_canary(name, canary)
        elif kinds[0] == "version":
            version = body["version"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise BadRequest("version must be a positive integer")
            pointer = store.set_current(name, version) if canary is None else store.set_canary(name, canary, version)
        else:
            if canary == 0:
                raise BadRequest("canary 0 ends a canary and publishes nothing: send {\"canary\": 0} alone")
            current = store.pointer(name)
            if canary is None and current is not None and current.canary is not None:
                raise running_canary_conflict(current)  # before any work; the store checks again under its lock
            try:
                if kinds[0] == "model_path":
                    source = self.resolve_model_path(body["model_path"])
                    staged = store.stage(name, source, root=self.model_root)
                else:
                    staged = self._stage_weights(store, name, body["weights"])
                pointer, warnings = self._validate_then_publish(name, staged, canary)
            except (InvalidModel, Forbidden, PayloadTooLarge):
                metrics.UPDATES_REFUSED.inc()
                raise
        return self.answer(pointer, wait_s, warnings)

    def load(self, name: str, body: Mapping[str, Any], wait_s: float | None) -> dict[str, Any]:
        """Serve ``name`` on every worker: from a new ``model_path``, or its kept current version."""
        check_model_name(name)
        if body:
            if "model" in body and body["model"] != name:
                raise BadRequest("the body names another model than the URL")
            return self.update({**body, "model": name}, wait_s)
        return self.answer(self.store.set_loaded(name, True), wait_s)

    def unload(self, name: str, wait_s: float | None) -> dict[str, Any]:
        """Stop serving ``name`` on every worker; its versions stay in the store."""
        if check_model_name(name) == self.config.model_name:
            raise Conflict("the default model cannot be unloaded")
        return self.answer(self.store.set_loaded(name, False), wait_s)

    # -- staging and validation -----------------------------------------------------

    def resolve_model_path(self, raw: Any) -> str:
        """A model directory inside the model root (relative paths are relative to it); Forbidden otherwise."""
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise BadRequest("model_path must be a non-empty string")
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"model_path {raw[:200]!r} is not valid UTF-8 (a lone surrogate)") from None
        try:
            path = os.path.realpath(os.path.join(self.model_root, raw))  # an absolute raw replaces the root
        except OSError as exc:  # a link swapped while being resolved, a name too long
            raise InvalidModel(f"{raw[:200]!r} is not a model directory: {exc.strerror}") from None
        if os.path.commonpath([self.model_root, path]) != self.model_root or path == self.model_root:
            raise Forbidden("model_path must be a directory inside the model root (--model-root)")
        return require_model_dir(path, shown=repr(raw))

    def _stage_weights(self, store: ModelStore, name: str, weights: Any) -> str:
        """The current version's directory with ``weights`` (checked: keys, dtype, shape, finite)
        written as its ``model.safetensors``."""
        current = store.require(name)
        source = store.version_dir(name, current.version)
        weights_path = os.path.join(source, WEIGHTS_FILE)
        if not os.path.isfile(weights_path):
            raise Conflict(f"{name} version {current.version} has no {WEIGHTS_FILE} to replace")
        expected, _ = weights_check.read_header(weights_path, f"version {current.version}'s {WEIGHTS_FILE}")
        arrays = weights_check.check_push(weights, expected)
        from safetensors.numpy import save

        # serialised here and written by the store: safetensors' own save_file reports a full
        # disk as a SafetensorError, which would be a generic 500 instead of the 507 it is
        data = save(arrays, metadata={"pushed_over": str(current.version)})
        return store.stage(name, source, skip=(WEIGHTS_FILE,), files={WEIGHTS_FILE: data})

    def _validate_then_publish(self, name: str, staged: str, canary: float | None = None) -> tuple[Pointer, list[str]]:
        """Validate ``staged`` (weights already checked by the staging) on this worker, then
        publish it (as a canary candidate with ``canary``); InvalidModel and nothing published
        otherwise, NotReady while this worker is still loading. Returns the pointer and the
        warm-up's warnings."""
        start = time.perf_counter()
        try:
            candidate = self.follower.validate(name, staged)
        except NotReady:
            self.store.discard(staged)
            raise
        except Exception as exc:  # noqa: BLE001 (the model's own code may raise anything: refused, not a 500)
            self.store.discard(staged)
            log.warning("update of %s refused: %s: %s", name, type(exc).__name__, exc)
            reason = exc.detail if isinstance(exc, ServingError) else f"{type(exc).__name__}: {exc}"
            reason = _without_paths(reason, {staged: "<candidate>", self.model_root: "<model root>",
                                             self.store.root: "<store>"})[:500]
            raise InvalidModel(f"validation failed, nothing published: {reason}") from None
        validated = time.perf_counter()
        pointer = self.store.publish(name, staged, canary=canary)
        version = pointer.canary.version if canary is not None else pointer.version
        adopted = self.follower.adopt(candidate, pointer, version)
        log.info(
            "update of %s: version %d published%s (validation %.3f s, publish %.3f s)%s",
            name, version, f" as a canary at {canary:g}" if canary is not None else "", validated - start,
            time.perf_counter() - validated, ", served here" if adopted else "",
        )
        return pointer, candidate.warnings

    # -- answers --------------------------------------------------------------------

    def answer(self, pointer: Pointer, wait_s: float | None, warnings: list[str] = ()) -> dict[str, Any]:
        """The answer to a management call. It waits (``wait_s``, default ``--update-wait-s``;
        0: not at all) until every worker of this instance serves ``pointer``'s state."""
        canary, retained = pointer.canary, pointer.retained
        result = {
            "model": pointer.model, "version": pointer.version, "previous": pointer.previous,
            "generation": pointer.generation, "loaded": pointer.loaded,
            "canary": {"version": canary.version, "fraction": canary.fraction} if canary else None,
            "retained": {"version": retained.version, "since": retained.since} if retained else None,
        }
        if warnings:
            result["warnings"] = list(warnings)
        wait_s = self.config.update_wait_s if wait_s is None else wait_s
        if wait_s > 0:
            result.update(self.wait_for(pointer, min(wait_s, MAX_WAIT_S)))
        return result

    def wait_for(self, pointer: Pointer, timeout_s: float) -> dict[str, Any]:
        """Poll the instance's workers until each acted on ``pointer`` (or ``timeout_s`` passed)."""
        deadline = time.monotonic() + timeout_s
        while True:
            workers = self.board.read()
            acted = [
                doc for doc in workers.values()
                if doc.get("generations", {}).get(pointer.model, 0) >= pointer.generation
            ]
            complete = len(acted) == len(workers) >= self.board.expected
            if complete or time.monotonic() >= deadline:
                break
            time.sleep(WAIT_POLL_S)
        report, switch_s, superseded = [], 0.0, False
        for pid, doc in sorted(workers.items()):
            served = doc.get("models", {}).get(pointer.model)
            problem = doc.get("problems", {}).get(pointer.model)
            if pointer.loaded:
                ok = served is not None and served["version"] == str(pointer.version) and (
                    pointer.canary is None or served.get("candidate") == str(pointer.canary.version))
            else:
                ok = served is None
            if ok and served is not None:
                switch_s = max(switch_s, served["since"] - pointer.changed_at)
            newer = doc.get("generations", {}).get(pointer.model, 0) > pointer.generation
            if not ok and newer and problem is None:
                ok = superseded = True  # it followed a later update (another client's): not lagging
            report.append({
                "pid": pid, "ok": ok, "version": served["version"] if served else None, "problem": problem,
            })
        all_ok = all(w["ok"] for w in report) and len(report) >= self.board.expected
        result = {
            "all_workers": all_ok, "workers": report, "switch_s": round(max(0.0, switch_s), 4),
            "lagging": [w["pid"] for w in report if not w["ok"]],
            "missing_workers": max(0, self.board.expected - len(report)),
        }
        latest = self.store.pointer(pointer.model) if superseded else None
        if latest is not None and latest.generation > pointer.generation:
            result["superseded_by"] = {"version": latest.version, "generation": latest.generation}
        return result
