"""One worker following the model store: watch the pointers, load what they name, swap.

The *store watcher* thread polls every model's pointer (``--store-poll-ms``). When one
changed, it loads and warms the versions it names that this worker does not hold yet (the
stable one, a canary's candidate, the retained one while its window is open) on its own
thread (requests keep being served meanwhile), then hands the whole set to the worker
(``host.install_versions``), which swaps the reference the batcher looks up per batch. A
version already held in another role is reused, never loaded again (a promoted candidate, a
rollback to the retained version, the superseded stable kept as the retained one). A
version that fails to load leaves what was served serving and is reported as the model's
*problem*; ``generations`` records the pointer generation this worker acted on, whatever
the outcome. The follower publishes both on the instance's status board once it acted
(after the worker published what it serves), for ``/update_model``'s wait.

Retention: the retained version stays held until ``--retain-previous-s`` after the last
request pinned to it, here or on any worker sharing the store. Each worker marks its own
use in the store (:meth:`ModelStore.mark_pinned_use`, at most every ``mark_every_s``), and
drops the version only once its own last use, the time it was superseded and the fleet's
mark are all older than the window; a worker that starts meanwhile loads it.

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
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from policy_server.errors import NotReady
from policy_server.serving.allocator import trim_heap
from policy_server.serving.model_versions import ModelVersions
from policy_server.serving.served import Served
from policy_server.store.model_store import ModelStore, Pointer
from policy_server.store.pointer import Retained
from policy_server.telemetry import metrics
from policy_server.telemetry.worker_status import WorkerStatusBoard

log = logging.getLogger(__name__)


class Host(Protocol):
    """What the follower needs from the worker it serves (:class:`policy_server.serving.runtime.PolicyRuntime`)."""

    default_name: str

    @property
    def ready(self) -> bool: ...

    def served_models(self) -> Mapping[str, Served]: ...

    def held(self, name: str) -> ModelVersions | None: ...

    def install(self, name: str, served: Served | None) -> None: ...

    def install_versions(self, name: str, versions: ModelVersions | None) -> None: ...

    def retained_use(self, name: str, version: str) -> float: ...

    def warm_version(self, model_dir: str, name: str, version: str) -> Served: ...

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
    """Keeps one worker serving what ``store``'s pointers name (see the module docstring).
    ``board``: the instance's status board; ``retain_s``: the retention window of a superseded
    version (0: none)."""

    def __init__(self, store: ModelStore, host: Host, board: WorkerStatusBoard, poll_s: float,
                 retain_s: float = 0.0) -> None:
        self.store = store
        self.host = host
        self.board = board
        self.poll_s = poll_s
        self.retain_s = retain_s
        self.mark_every_s = min(5.0, retain_s / 4)  # how stale the fleet's mark of a pinned use may be
        self.generations: dict[str, int] = {}  # store pointer generation last acted on, per model
        self.problems: dict[str, str] = {}  # model -> why a version it names did not load here
        self._lock = threading.Lock()  # one load, validation or adoption at a time per worker
        self._loading: set[tuple[str, str]] = set()  # (model, version) a pointer being acted on names, not held
        self._marked: dict[tuple[str, str], float] = {}  # the pinned use this worker last marked in the store
        self._mark_warned = False
        self._trim_due = False  # a version was dropped since the last poll

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
        """Act on every pointer that changed since the last call (load and swap, or unload),
        then end the retention of superseded versions no request pinned for the window."""
        names = self.store.names()
        for name in set(self.host.served_models()) - set(names):
            self.host.install(name, None)
        for name in names:
            pointer = self.store.pointer(name)
            if pointer is not None and pointer.generation != self.generations.get(name):
                self._follow(name)
        for name in names:
            self._retention(name)
        if self._trim_due:  # here, where no frame holds the dropped version any more
            self._trim_due = False
            trim_heap()

    def _follow(self, name: str) -> None:
        with self._lock:
            # The pointer is read under the lock: one read before it may predate an update
            # adopted meanwhile, and acting on it would swap back to an older version.
            pointer = self.store.pointer(name)
            if pointer is None or pointer.generation == self.generations.get(name):
                return  # removed (the next poll unloads it), or adopted meanwhile
            missing = self._missing(pointer)
            self._loading |= missing  # from before the generation counts as acted on to the install
            self.generations[name] = pointer.generation  # acted on, whatever the outcome
            try:
                if not pointer.loaded:
                    if name != self.host.default_name:
                        self.host.install(name, None)
                else:
                    self._reconcile(pointer)
            finally:
                self._loading -= missing
                self._publish()

    def _publish(self) -> None:
        """This worker's problems and acted-on generations, on the instance's status board."""
        self.board.update(problems=dict(self.problems), generations=dict(self.generations))

    def _missing(self, pointer: Pointer) -> set[tuple[str, str]]:
        """(model, version) of what ``pointer`` names that this worker does not hold yet."""
        if not pointer.loaded:
            return set()
        held = self.host.held(pointer.model)
        have = set(held.versions) if held is not None else set()
        return {(pointer.model, str(v)) for v in pointer.served_versions() if str(v) not in have}

    def _reconcile(self, pointer: Pointer, preloaded: Mapping[str, Served] | None = None) -> bool:
        """Hold what ``pointer`` names (reusing what is held or ``preloaded``, loading the rest)
        and install it; False when the stable version did not load (what was served stays)."""
        name = pointer.model
        held = self.host.held(name)
        have = {s.model.version: s for _, s in held.entries} if held else {}
        have.update(preloaded or {})
        problems: list[str] = []
        stable = self._get(pointer, pointer.version, have, problems)
        if stable is None:
            self._note(name, problems)
            return False
        canary = pointer.canary
        candidate = self._get(pointer, canary.version, have, problems) if canary else None
        retained, since = None, 0.0
        if pointer.retained is not None and self._window_open(name, pointer.retained):
            retained = self._get(pointer, pointer.retained.version, have, problems)
            since = pointer.retained.since if retained is not None else 0.0
        versions = ModelVersions(stable, candidate, canary.fraction if candidate else 0.0, retained, since)
        if held is not None and held.stable.model.version != stable.model.version:
            metrics.RELOADS.labels(name).inc()
        self._note(name, problems)
        self.host.install_versions(name, versions)
        if held is not None and {id(s) for _, s in held.entries} - {id(s) for _, s in versions.entries}:
            self._trim_due = True  # a version was dropped: its memory goes back at the next poll
        return True

    def _get(self, pointer: Pointer, version: int, have: Mapping[str, Served], problems: list[str]) -> Served | None:
        """Version ``version`` of ``pointer``'s model: held already, or loaded now (None, with
        the reason in ``problems``, when it does not load)."""
        name, key = pointer.model, str(version)
        if key in have:
            return have[key]
        try:
            return self.host.warm_version(self.store.version_dir(name, version), name, key)
        except Exception as exc:
            if self._superseded(pointer, version):
                log.info("%s version %d was pruned by a later update before it loaded; following the "
                         "pointer at the next poll", name, version)
                return None
            metrics.RELOAD_FAILURES.labels(name).inc()
            problems.append(f"version {version}: {type(exc).__name__}: {exc}")
            log.exception("loading %s version %d failed; still serving what was served", name, version)
            return None

    def _note(self, name: str, problems: list[str]) -> None:
        if problems:
            self.problems[name] = "; ".join(problems)
        else:
            self.problems.pop(name, None)

    def _superseded(self, pointer: Pointer, version: int) -> bool:
        """Whether ``version`` vanished because a later publish pruned it (no failure: the
        watcher's next poll sees the newer pointer and follows that)."""
        if os.path.isdir(self.store.version_dir(pointer.model, version)):
            return False
        latest = self.store.pointer(pointer.model)
        return latest is not None and latest.generation > pointer.generation

    # -- retention of the superseded version -------------------------------------------

    def _window_open(self, name: str, retained: Retained) -> bool:
        """Whether ``retained`` is inside its window: superseded, or last used by a pinned
        request (here, or on any worker per the store's mark), less than ``retain_s`` ago."""
        if self.retain_s <= 0:
            return False
        now = time.time()
        last = max(retained.since, self.host.retained_use(name, str(retained.version)))
        if now < last + self.retain_s:
            return True
        mark = self.store.pinned_use(name, retained.version)
        return mark is not None and now < mark + self.retain_s + self.mark_every_s

    def _retention(self, name: str) -> None:
        """Mark this worker's pinned use of ``name``'s retained version in the store, and drop
        the version once its window closed."""
        held = self.host.held(name)
        if held is None or held.retained is None:
            return
        version = held.retained.model.version
        used = self.host.retained_use(name, version)
        if used > self._marked.get((name, version), 0.0) + self.mark_every_s:
            self._mark(name, version, used)
        if time.time() < max(held.retained_since, used) + self.retain_s:
            return  # the cheap check: no store read while this worker's own window is open
        with self._lock:
            held = self.host.held(name)
            if held is None or held.retained is None or held.retained.model.version != version:
                return
            if self._window_open(name, Retained(int(version), held.retained_since)):
                return
            self.host.install_versions(name, held.without_retained())
            self._trim_due = True
        log.info("%s version %s unloaded: no request pinned to it for %g s", name, version, self.retain_s)

    def _mark(self, name: str, version: str, used: float) -> None:
        try:
            self.store.mark_pinned_use(name, int(version), used)
        except OSError as exc:  # a read-only store: retention is per worker then
            if not self._mark_warned:
                log.warning("cannot mark pinned use in the model store (%s); each worker keeps retained versions "
                            "for its own pinned requests only", exc)
                self._mark_warned = True
        self._marked[(name, version)] = used

    def expects(self, name: str, version: str) -> bool:
        """Whether this worker is about to serve ``version`` of ``name`` that it lacks: loading
        it now, or the store names it (stable, candidate, retained inside its window) in a
        pointer this worker has not followed yet. A request pinned to it should retry (503),
        not be refused (409)."""
        if (name, version) in self._loading:
            return True
        try:
            pointer = self.store.pointer(name)
        except (OSError, ValueError, TypeError):
            return False
        if pointer is None or not pointer.loaded or pointer.generation == self.generations.get(name):
            return False
        named = [pointer.version] + ([pointer.canary.version] if pointer.canary else [])
        retained = pointer.retained
        return str(version) in map(str, named) or (
            retained is not None and str(retained.version) == version and self._window_open(name, retained))

    # -- an update's candidate -------------------------------------------------------

    def validate(self, name: str, model_dir: str) -> Candidate:
        """Load and warm up a candidate version on this worker's device, off the batcher thread
        (the warm-up runs it on several distinct random observations).

        Raises NotReady while this worker is still loading what it serves, ModelError (or
        whatever the model's code raises) when it does not load, its weights do not match
        strictly, or an output is not finite. The candidate's ``warnings`` name outputs
        identical for every observation.
        """
        if not self.host.ready:
            raise NotReady("this worker is still loading; retry")
        with self._lock:
            self.host.bind_device()
            return Candidate(name, self.host.warm_version(model_dir, name, "candidate"))

    def adopt(self, candidate: Candidate, pointer: Pointer, version: int | None = None) -> bool:
        """Serve ``candidate`` as ``pointer``'s ``version`` here, now, without loading it again:
        the stable version (default), or the canary candidate it was published as.

        ``pointer`` is what publishing the candidate's directory answered. Returns False (and
        leaves the watcher to follow the store) when this worker already acted on that pointer
        or a later one, or when the pointer does not name the candidate's files.
        """
        name = pointer.model
        version = pointer.version if version is None else version
        canary = pointer.canary
        digest = pointer.digest if version == pointer.version else (
            canary.digest if canary is not None and canary.version == version else None)
        if name != candidate.name or digest != candidate.digest or not pointer.loaded:
            return False
        with self._lock:
            if self.generations.get(name, 0) >= pointer.generation:
                return False
            missing = self._missing(pointer)
            self._loading |= missing
            self.generations[name] = pointer.generation
            try:
                return self._reconcile(pointer, {str(version): candidate.served.as_version(str(version))})
            finally:
                self._loading -= missing
                self._publish()
