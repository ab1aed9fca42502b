"""What the models look like from outside: ``/models``, ``/models/<name>`` and ``/model_info``.

Read only: this worker's served and held versions (:class:`PolicyRuntime`), what the store's
pointers name, the problems this worker's store follower met, and what every worker of the
instance serves (the status board). Changes are :mod:`policy_server.app.model_admin`'s.
"""

from __future__ import annotations

from typing import Any

from policy_server.config import ServerConfig
from policy_server.serving.runtime import PolicyRuntime
from policy_server.store.model_store import Pointer


class ModelCatalog:
    """The model listings of one worker (``runtime``) and its instance."""

    def __init__(self, config: ServerConfig, runtime: PolicyRuntime) -> None:
        self.config = config
        self.runtime = runtime
        self.store = runtime.store
        self.follower = runtime.follower
        self.board = runtime.board

    def workers(self) -> dict[str, dict[str, str]]:
        """What each live worker of this instance serves: ``{pid: {model: version}}``."""
        return {
            str(pid): {name: m["version"] for name, m in doc.get("models", {}).items()}
            for pid, doc in sorted(self.board.read().items())
        }

    def held_by_worker(self) -> dict[str, dict[str, list[str]]]:
        """Every version each live worker of this instance holds: ``{pid: {model: [stable,
        candidate, retained]}}`` (those it holds, stable first)."""
        return {
            str(pid): {name: [v for v in (m["version"], m.get("candidate"), m.get("retained")) if v]
                       for name, m in doc.get("models", {}).items()}
            for pid, doc in sorted(self.board.read().items())
        }

    def models(self) -> list[dict[str, Any]]:
        """Every model this instance knows, with this worker's view of it."""
        served = self.runtime.served_models()
        problems = dict(self.follower.problems) if self.follower else {}
        store = self.store
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
                **self.versions_of(name, pointer),
            })
        return listing

    def versions_of(self, name: str, pointer: Pointer | None) -> dict[str, Any]:
        """A model's canary (the store's, else this worker's) and its retained version while this
        worker still holds it (null once the window after its last pinned request has closed: a
        pin to it would be 409), and what every version this worker holds costs
        (``held_versions``: version, role, weight bytes)."""
        held = self.runtime.held(name)
        if pointer is not None:
            canary, retained = pointer.canary, pointer.retained
            canary = {"version": str(canary.version), "fraction": canary.fraction, "since": canary.since} \
                if canary else None
            kept = held.retained.model.version if held and held.retained else None
            retained = {"version": str(retained.version), "since": retained.since} \
                if retained and str(retained.version) == kept else None
        else:
            candidate = held.candidate if held else None
            canary = {"version": candidate.model.version, "fraction": held.fraction} if candidate else None
            retained = {"version": held.retained.model.version, "since": held.retained_since} \
                if held and held.retained else None
        return {
            "stable_version": str(pointer.version) if pointer else (held.stable.model.version if held else None),
            "canary": canary, "retained": retained, "retain_previous_s": self.config.retain_previous_s,
            "held_versions": held.describe() if held else [], "held_bytes": held.held_bytes if held else 0,
        }

    def model_detail(self, name: str) -> dict[str, Any]:
        """``GET /models/<name>``: the stable version's info, its canary and retained version,
        and the memory the versions held here cost. NotReady or UnknownModel as :meth:`PolicyRuntime.served`."""
        info = self.runtime.served(name).model.info()
        store = self.store
        return {**info, **self.versions_of(name, store.pointer(name) if store else None)}
