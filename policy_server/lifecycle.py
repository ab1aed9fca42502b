"""Model updates as the worker that receives them handles them: stage, validate, publish, wait.

An update is staged as a complete model directory in the store's staging area, loaded and
warmed up on this worker's device (strict weights, finite outputs), and only then
published: a failed validation publishes nothing, and every worker keeps serving what it
served. Publishing moves the pointer; each worker's store watcher does the rest (see
:mod:`policy_server.runtime`). With ``wait_s`` the answer comes once every worker of this
instance acted on the new pointer, or says which did not.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from policy_server import metrics
from policy_server.config import ServerConfig
from policy_server.errors import BadRequest, Conflict, Forbidden, InvalidModel, NotReady
from policy_server.runtime import PolicyRuntime
from policy_server.store import ModelStore, Pointer, check_name

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"  # what a weights push replaces (see the models/ contract)
MAX_WAIT_S = 300.0
WAIT_POLL_S = 0.02
UPDATE_KINDS = ("model_path", "weights", "version")
UPDATE_KEYS = frozenset(UPDATE_KINDS) | {"model"}

# numpy dtype name -> safetensors dtype tag
_SAFETENSORS_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16",
    "int32": "I32", "uint32": "U32", "float32": "F32", "int64": "I64", "uint64": "U64", "float64": "F64",
}


def safetensors_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype tag, shape)}`` from a safetensors file's JSON header, without loading it."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def check_weights(weights: Any, expected: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """The pushed state dict as native-order arrays; InvalidModel naming the first mismatch."""
    if not isinstance(weights, dict) or not all(isinstance(v, np.ndarray) for v in weights.values()):
        raise InvalidModel("weights must be a dict of name -> array")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise InvalidModel(f"weights lack {len(missing)} key(s) of the current model, first {missing[0]!r}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise InvalidModel(f"weights have {len(extra)} key(s) the current model lacks, first {extra[0]!r}")
    native = {}
    for key, array in weights.items():
        dtype, shape = expected[key]
        array = array.astype(array.dtype.newbyteorder("="), copy=False)
        got = _SAFETENSORS_DTYPES.get(array.dtype.name, array.dtype.name)
        if got != dtype:
            raise InvalidModel(f"weight {key!r} is {got}, the current model has {dtype}")
        if array.shape != shape:
            raise InvalidModel(f"weight {key!r} has shape {list(array.shape)}, the current model has {list(shape)}")
        native[key] = array
    return native


class ModelManager:
    """Updates, rollbacks, loads and unloads, as seen from the worker that received them."""

    def __init__(self, config: ServerConfig, runtime: PolicyRuntime) -> None:
        self.config = config
        self.runtime = runtime
        self.model_root = os.path.realpath(config.model_root)

    @property
    def store(self) -> ModelStore:
        if self.runtime.store is None:
            raise Conflict("this server serves a fixed policy object; hot reload needs a model store")
        return self.runtime.store

    # -- commands -------------------------------------------------------------------

    def update(self, body: Mapping[str, Any], wait_s: float | None) -> dict[str, Any]:
        """Publish a new version (``model_path`` or ``weights``) or roll back (``version``)."""
        unknown = sorted(set(body) - UPDATE_KEYS)
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}; expected one of {list(UPDATE_KINDS)} and optionally 'model'")
        kinds = [k for k in UPDATE_KINDS if k in body]
        if len(kinds) != 1:
            raise BadRequest(f"give exactly one of {list(UPDATE_KINDS)}")
        name = check_name(body.get("model", self.runtime.default_name))
        store = self.store
        if kinds[0] == "version":
            version = body["version"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise BadRequest("version must be a positive integer")
            pointer = store.set_current(name, version)
        elif kinds[0] == "model_path":
            pointer = self._publish(name, store.stage(name, self.resolve_model_path(body["model_path"])))
        else:
            pointer = self._publish(name, self._stage_weights(store, name, body["weights"]))
        return self.answer(pointer, wait_s)

    def load(self, name: str, body: Mapping[str, Any], wait_s: float | None) -> dict[str, Any]:
        """Serve ``name`` on every worker: from a new ``model_path``, or its kept current version."""
        check_name(name)
        if body:
            if "model" in body and body["model"] != name:
                raise BadRequest("the body names another model than the URL")
            return self.update({**body, "model": name}, wait_s)
        return self.answer(self.store.set_loaded(name, True), wait_s)

    def unload(self, name: str, wait_s: float | None) -> dict[str, Any]:
        """Stop serving ``name`` on every worker; its versions stay in the store."""
        if check_name(name) == self.runtime.default_name:
            raise Conflict("the default model cannot be unloaded")
        return self.answer(self.store.set_loaded(name, False), wait_s)

    # -- staging and validation -----------------------------------------------------

    def resolve_model_path(self, raw: Any) -> str:
        """A model directory inside the model root (relative paths are relative to it); Forbidden otherwise."""
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise BadRequest("model_path must be a non-empty string")
        path = os.path.realpath(os.path.join(self.model_root, raw))  # an absolute raw replaces the root
        if os.path.commonpath([self.model_root, path]) != self.model_root or path == self.model_root:
            raise Forbidden(f"model_path must be a directory inside the model root {self.config.model_root!r}")
        if not os.path.isfile(os.path.join(path, "policy.py")):
            raise InvalidModel(f"{raw!r} is not a model directory (no policy.py)")
        return path

    def _stage_weights(self, store: ModelStore, name: str, weights: Any) -> str:
        current = store.require(name)
        source = store.version_dir(name, current.version)
        weights_path = os.path.join(source, WEIGHTS_FILE)
        if not os.path.isfile(weights_path):
            raise Conflict(f"{name} version {current.version} has no {WEIGHTS_FILE} to replace")
        arrays = check_weights(weights, safetensors_header(weights_path))
        from safetensors.numpy import save_file

        staged = store.stage(name, source, skip=(WEIGHTS_FILE,))
        try:
            save_file(arrays, os.path.join(staged, WEIGHTS_FILE), metadata={"pushed_over": str(current.version)})
        except BaseException:
            store.discard(staged)
            raise
        return staged

    def _publish(self, name: str, staged: str) -> Pointer:
        """Validate ``staged`` on this worker, then publish it; InvalidModel and nothing published otherwise."""
        if not self.runtime.ready:
            self.store.discard(staged)
            raise NotReady("this worker is still loading; retry")
        start = time.perf_counter()
        try:
            self.runtime.validate_candidate(name, staged)
        except Exception as exc:
            self.store.discard(staged)
            metrics.UPDATES_REFUSED.inc()
            log.warning("update of %s refused: %s: %s", name, type(exc).__name__, exc)
            raise InvalidModel(f"validation failed, nothing published: {type(exc).__name__}: {str(exc)[:500]}") from None
        validated = time.perf_counter()
        pointer = self.store.publish(name, staged)
        log.info(
            "update of %s: version %d published (validation %.3f s, publish %.3f s)",
            name, pointer.version, validated - start, time.perf_counter() - validated,
        )
        return pointer

    # -- answers --------------------------------------------------------------------

    def answer(self, pointer: Pointer, wait_s: float | None) -> dict[str, Any]:
        result = {
            "model": pointer.model, "version": pointer.version, "previous": pointer.previous,
            "generation": pointer.generation, "loaded": pointer.loaded,
        }
        if wait_s:
            result.update(self.wait_for(pointer, min(wait_s, MAX_WAIT_S)))
        return result

    def wait_for(self, pointer: Pointer, timeout_s: float) -> dict[str, Any]:
        """Poll the instance's workers until each acted on ``pointer`` (or ``timeout_s`` passed)."""
        deadline = time.monotonic() + timeout_s
        while True:
            workers = self.runtime.board.read()
            acted = [
                doc for doc in workers.values()
                if doc.get("generations", {}).get(pointer.model, 0) >= pointer.generation
            ]
            complete = len(acted) == len(workers) >= self.runtime.instance_workers
            if complete or time.monotonic() >= deadline:
                break
            time.sleep(WAIT_POLL_S)
        report, switch_s = [], 0.0
        for pid, doc in sorted(workers.items()):
            served = doc.get("models", {}).get(pointer.model)
            ok = (served is not None and served["version"] == str(pointer.version)) if pointer.loaded else served is None
            if ok and served is not None:
                switch_s = max(switch_s, served["since"] - pointer.changed_at)
            report.append({
                "pid": pid, "ok": ok, "version": served["version"] if served else None,
                "problem": doc.get("problems", {}).get(pointer.model),
            })
        all_ok = all(w["ok"] for w in report) and len(report) >= self.runtime.instance_workers
        return {"all_workers": all_ok, "workers": report, "switch_s": round(max(0.0, switch_s), 4)}

    def workers(self) -> dict[str, dict[str, str]]:
        """What each live worker of this instance serves: ``{pid: {model: version}}``."""
        return {
            str(pid): {name: m["version"] for name, m in doc.get("models", {}).items()}
            for pid, doc in sorted(self.runtime.board.read().items())
        }

    def models(self) -> list[dict[str, Any]]:
        """Every model this instance knows, with this worker's view of it."""
        served = self.runtime.served_models()
        problems = self.runtime.problems()
        store = self.runtime.store
        names = store.names() if store else sorted(served)
        listing = []
        for name in names:
            pointer = store.pointer(name) if store else None
            mine = served.get(name)
            current = str(pointer.version) if pointer else (mine.model.version if mine else None)
            if pointer is not None and not pointer.loaded:
                state = "unloaded"
            elif mine is not None and mine.model.version == current:
                state = "serving"
            elif name in problems:
                state = "failed"
            else:
                state = "loading"
            listing.append({
                "name": name,
                "default": name == self.runtime.default_name,
                "version": current,
                "serving_version": mine.model.version if mine else None,
                "state": state,
                "device": mine.model.device if mine else self.runtime.device,
                "kept_versions": store.versions(name) if store else [],
                "problem": problems.get(name),
            })
        return listing
