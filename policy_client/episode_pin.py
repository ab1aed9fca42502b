"""The episode a ``ChunkRunner`` runs: its id, and the model version it is pinned to.

At every reset the runner makes a new episode id; every request carries it (a running
canary on the server assigns episodes by it) and, from the episode's first answer on, the
version that answered it: exactly that version computes every chunk of the episode, on any
worker, across any update. When that version is retired mid-episode (the server answers
409 ``version not served``), the runner does what its caller chose:

- ``"stop"`` (default): send nothing more; play the chunks it has to their end, then the
  fallback action, and report an :class:`~policy_client.errors.EpisodeStopped` as its
  ``stopped``;
- ``"continue"``: go on unpinned (the server's current version, or the canary's choice for
  the episode), pin to the version of the next answer, and count the switch.

An answer from another version than the pin (a server that ignores pins) is handled the
same way. Pins are version numbers: a server without a model store names its one fixed
version freely, and its episodes are not pinned.
"""

from __future__ import annotations

import uuid
from typing import Any

from policy_client.errors import EpisodeStopped

__all__ = ["ON_VERSION_RETIRED", "EpisodePin"]

ON_VERSION_RETIRED = ("stop", "continue")


class EpisodePin:
    """One episode's id and pinned version, as a runner keeps them. ``enabled``: the runner's
    policy takes ``episode_id`` and ``version`` (else requests carry neither)."""

    def __init__(self, on_version_retired: str = "stop", *, enabled: bool = True) -> None:
        if on_version_retired not in ON_VERSION_RETIRED:
            raise ValueError(f"on_version_retired must be one of {ON_VERSION_RETIRED}, not {on_version_retired!r}")
        self.on_version_retired = on_version_retired
        self.enabled = enabled
        self.episode_id = ""
        self.version: str | None = None  # of the episode's first answer (after a switch: the new one)
        self.retired: list[str] | None = None  # once its version was retired (stop): the versions served then
        self.switches = 0  # version switches, with on_version_retired="continue"
        self._left: set[str] = set()  # versions this episode was pinned to and left

    def new_episode(self, episode_id: str | None = None) -> str:
        """Start an episode: a fresh id (or ``episode_id``), no pin yet."""
        self.episode_id = episode_id or uuid.uuid4().hex
        self.version = None
        self.retired = None
        self._left = set()
        return self.episode_id

    @property
    def asking(self) -> bool:
        """Whether the runner may send requests (not once its episode is stopping)."""
        return self.retired is None

    def request_kwargs(self) -> dict[str, Any]:
        """What the next request carries: the episode id and, once known, the pinned version."""
        if not self.enabled:
            return {}
        pinned = self.version if self.version is not None and self.version.isdigit() else None
        return {"episode_id": self.episode_id, "version": pinned}

    def answered(self, version: str | None) -> bool:
        """Take an answer's version; whether its chunk may be played. The first answer pins the
        episode; one from another version is a switch (``continue``) or stops it (``stop``)."""
        if version is None or version in self._left:
            return True  # computed before its version was left: a chunk like any other
        if self.version is None:
            self.version = version
            return True
        if version == self.version or not self.enabled:
            return True
        if self.on_version_retired == "continue":
            self._left.add(self.version)
            self.version = version
            self.switches += 1
            return True
        self.retired = [version]
        return False

    def failed(self, error: BaseException) -> bool:
        """Take a failed request's error; True when it said the pinned version was retired
        (handled here: the runner stops, or goes on unpinned), False for any other failure."""
        if not getattr(error, "version_retired", False):
            return False
        body = getattr(error, "body", None) or {}
        asked = str(body["version"]) if "version" in body else self.version
        if self.version is None or asked != self.version or self.retired is not None:
            return True  # a request pinned to a version already left, or stopping already
        if self.on_version_retired == "continue":
            self._left.add(self.version)
            self.version = None  # the next answer pins the episode again
            self.switches += 1
        else:
            self.retired = [str(v) for v in body.get("served_versions", [])]
        return True

    def stopped_at(self, step: int) -> EpisodeStopped:
        """The error that says why the episode stopped, at ``step`` (its plan's end)."""
        return EpisodeStopped(self.episode_id, str(self.version), self.retired or [], step)
