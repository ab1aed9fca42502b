"""One worker following the model store: watch the pointers, load what they name, swap.

The *store watcher* thread polls every model's pointer (``--store-poll-ms``). When one
changed, it loads and warms the version it names on its own thread (requests keep being
served by the old one), then hands it to the worker (``host.install``), which swaps the
reference the batcher looks up per batch. A version that fails to load leaves the previous
one serving and is reported as the model's *problem*; ``generations`` records the pointer
generation this worker acted on, whatever the outcome (read by ``/update_model``'s wait).

An update's candidate is validated here too, off the batcher thread, and handed back to
the admin side explicitly: :meth:`StoreFollower.validate` returns a :class:`Candidate`, and
once it is published :meth:`StoreFollower.adopt` serves it as the published version on
this worker without loading it again. One lock serialises loads, validations and
adoptions, so a worker never adopts a candidate over a newer pointer it already followed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from policy_server import metrics
from policy_server.serving_model import Served
from policy_server.store import ModelStore, Pointer

log = logging.getLogger(__name__)


class Host(Protocol):
    """What the follower needs from the worker it serves (:class:`policy_server.runtime.PolicyRuntime`)."""

    default_name: str

    def served_models(self) -> Mapping[str, Served]: ...

    def install(self, name: str, served: Served | None) -> None: ...

    def publish_status(self) -> None: ...

    def load(self, model_dir: str, name: str, version: str) -> Served: ...

    def bind_device(self) -> None: ...


@dataclass(frozen=True)
class Candidate:
    """A staged version loaded and warmed up on this worker (validated), not yet published."""

    name: str
    served: Served

    @property
    def digest(self) -> str:
        return self.served.model.digest

    @property
    def warnings(self) -> list[str]:
        """From the warm-up: outputs identical for every observation."""
        return list(self.served.warnings)


class StoreFollower:
    """Keeps one worker serving what ``store``'s pointers name (see the module docstring)."""

    def __init__(self, store: ModelStore, host: Host, poll_s: float) -> None:
        self.store = store
        self.host = host
        self.poll_s = poll_s
        self.generations: dict[str, int] = {}  # store pointer generation last acted on, per model
        self.problems: dict[str, str] = {}  # model -> why its current version did not load here
        self._lock = threading.Lock()  # one load, validation or adoption at a time per worker

    def start(self, stopping: threading.Event) -> None:
        """Start the store watcher thread; it ends once ``stopping`` is set."""
        threading.Thread(target=self._watch, args=(stopping,), name="policy-store-watcher", daemon=True).start()

    def _watch(self, stopping: threading.Event) -> None:
        self.host.bind_device()
        while not stopping.wait(self.poll_s):
            try:
                self.sync()
            except Exception:  # keep watching: the next poll may find the store readable again
                log.exception("checking the model store failed")

    def sync(self) -> None:
        """Act on every pointer that changed since the last call: load and swap, or unload."""
        names = self.store.names()
        for name in set(self.host.served_models()) - set(names):
            self.host.install(name, None)
        for name in names:
            pointer = self.store.pointer(name)
            if pointer is not None and pointer.generation != self.generations.get(name):
                self._follow(name)

    def _follow(self, name: str) -> None:
        with self._lock:
            # The pointer is read under the lock: one read before it may predate an update
            # adopted meanwhile, and acting on it would swap back to an older version.
            pointer = self.store.pointer(name)
            if pointer is None or pointer.generation == self.generations.get(name):
                return  # removed (the next poll unloads it), or adopted meanwhile
            self.generations[name] = pointer.generation  # acted on, whatever the outcome
            current = self.host.served_models().get(name)
            if not pointer.loaded:
                if name != self.host.default_name:
                    self.host.install(name, None)
                    return
            elif current is None or current.model.version != str(pointer.version):
                try:
                    served = self.host.load(self.store.version_dir(name, pointer.version), name, str(pointer.version))
                except Exception as exc:
                    if self._superseded(pointer):
                        log.info("%s version %d was pruned by a later update before it loaded; following the "
                                 "pointer at the next poll", name, pointer.version)
                        return
                    metrics.RELOAD_FAILURES.labels(name).inc()
                    self.problems[name] = f"version {pointer.version}: {type(exc).__name__}: {exc}"
                    log.exception("loading %s version %d failed; still serving the previous one", name, pointer.version)
                else:
                    self._swap(name, current, served)
                    return
            self.host.publish_status()

    def _swap(self, name: str, current: Served | None, served: Served) -> None:
        self.problems.pop(name, None)
        if current is not None:
            metrics.RELOADS.labels(name).inc()
        self.host.install(name, served)

    def _superseded(self, pointer: Pointer) -> bool:
        """Whether ``pointer``'s version vanished because a later publish pruned it (no failure:
        the watcher's next poll sees the newer pointer and follows that)."""
        if os.path.isdir(self.store.version_dir(pointer.model, pointer.version)):
            return False
        latest = self.store.pointer(pointer.model)
        return latest is not None and latest.generation > pointer.generation

    # -- an update's candidate -------------------------------------------------------

    def validate(self, name: str, model_dir: str) -> Candidate:
        """Load and warm up a candidate version on this worker's device, off the batcher thread
        (the warm-up runs it on several distinct random observations).

        Raises ModelError (or whatever the model's code raises) when it does not load, its
        weights do not match strictly, or an output is not finite. The candidate's
        ``warnings`` name outputs identical for every observation.
        """
        with self._lock:
            self.host.bind_device()
            return Candidate(name, self.host.load(model_dir, name, "candidate"))

    def adopt(self, candidate: Candidate, pointer: Pointer) -> bool:
        """Serve ``candidate`` as ``pointer``'s version here, now, without loading it again.

        ``pointer`` is what publishing the candidate's directory answered. Returns False (and
        leaves the watcher to follow the store) when this worker already acted on that pointer
        or a later one, or when the pointer does not name the candidate's files.
        """
        name = pointer.model
        if name != candidate.name or pointer.digest != candidate.digest or not pointer.loaded:
            return False
        with self._lock:
            if self.generations.get(name, 0) >= pointer.generation:
                return False
            self.generations[name] = pointer.generation
            current = self.host.served_models().get(name)
            self._swap(name, current, candidate.served.as_version(str(pointer.version)))
            return True
