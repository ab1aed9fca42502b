"""The versions of one model a worker holds: the stable one, a canary's candidate, the retained one.

A :class:`ModelVersions` is replaced whole on every change (the store follower builds it,
:meth:`policy_server.serving.runtime.PolicyRuntime.install_versions` swaps it in), so a request
thread or the batcher reads one consistent set. Requests without a pin get the stable
version, or the candidate when their episode's :func:`policy_server.inputs.episodes.canary_share`
falls below the canary's fraction; a pinned request gets exactly the version it names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

from policy_server.inputs.episodes import canary_share
from policy_server.serving.served import Served


class Target(NamedTuple):
    """What computes one request: ``served``, and ``pin``, the version its answer must come
    from (None: whatever version is stable when its batch runs)."""

    served: Served
    pin: str | None


@dataclass(frozen=True)
class ModelVersions:
    """One model as this worker serves it. ``fraction``: of new episodes for ``candidate``;
    ``retained_since``: wall-clock time ``retained`` was superseded."""

    stable: Served
    candidate: Served | None = None
    fraction: float = 0.0
    retained: Served | None = None
    retained_since: float = 0.0

    @property
    def entries(self) -> tuple[tuple[str, Served], ...]:
        """(role, served) of every version held: ``stable``, ``candidate``, ``retained``."""
        roles = (("stable", self.stable), ("candidate", self.candidate), ("retained", self.retained))
        return tuple((role, served) for role, served in roles if served is not None)

    @property
    def versions(self) -> list[str]:
        """The versions held, stable first."""
        return [served.model.version for _, served in self.entries]

    def get(self, version: str) -> Served | None:
        """The entry serving ``version``, or None when this worker does not hold it."""
        for _, served in self.entries:
            if served.model.version == version:
                return served
        return None

    def assign(self, model: str, episode_id: str | None) -> Target:
        """What an unpinned request of ``episode_id`` gets: the candidate (pinned to it) for the
        canary's share of episodes, else (and without an episode id) the stable version."""
        candidate = self.candidate
        if candidate is not None and episode_id is not None:
            if canary_share(model, candidate.model.version, episode_id) < self.fraction:
                return Target(candidate, candidate.model.version)
        return Target(self.stable, None)

    def without_retained(self) -> ModelVersions:
        return dataclasses.replace(self, retained=None, retained_since=0.0)

    @property
    def held_bytes(self) -> int:
        """Bytes of weights held for this model, every version together."""
        return sum(served.weight_bytes for _, served in self.entries)

    def describe(self) -> list[dict[str, Any]]:
        """Each version held: version, role, weight bytes, since (wall-clock)."""
        return [
            {"version": served.model.version, "role": role, "weight_bytes": served.weight_bytes,
             "since": served.since}
            for role, served in self.entries
        ]
