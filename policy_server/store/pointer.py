"""A model's pointer (its ``CURRENT`` file) and the changes an update makes to it.

The pointer names the *stable* version (what requests without a pin or a canary
assignment get), the rollback target (``previous``), an optional *canary* (a candidate
version and the fraction of new episodes assigned to it) and the *retained* version: the
one most recently superseded (the previous stable after an update, promotion or rollback;
an ended or replaced canary), which workers keep serving to episodes pinned to it for
``--retain-previous-s`` after the last such request. At most one version is retained: a
new supersession replaces it.

The functions here compute a changed pointer from the old one; :class:`policy_server.store.model_store.ModelStore`
calls them under the model's lock and writes the result. No I/O here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from policy_server.errors import BadRequest, Conflict


@dataclass(frozen=True)
class Canary:
    """A candidate version served to ``fraction`` of new episodes (by a hash of the episode id)."""

    version: int
    fraction: float
    since: float  # wall-clock time the candidate (not the fraction) was set
    digest: str = ""  # of the candidate's files


@dataclass(frozen=True)
class Retained:
    """The superseded version workers keep serving to the episodes pinned to it."""

    version: int
    since: float  # wall-clock time it was superseded


@dataclass(frozen=True)
class Pointer:
    """The content of a model's CURRENT file. ``kept``: the visible versions (None in a store
    written before it existed: then every version directory is visible)."""

    model: str
    version: int
    previous: int | None
    generation: int
    loaded: bool
    digest: str
    changed_at: float
    seed_digest: str | None = None
    kept: tuple[int, ...] | None = None
    canary: Canary | None = None
    retained: Retained | None = None

    def __post_init__(self) -> None:
        if self.kept is not None:
            object.__setattr__(self, "kept", tuple(self.kept))
        if isinstance(self.canary, dict):
            object.__setattr__(self, "canary", Canary(**self.canary))
        if isinstance(self.retained, dict):
            object.__setattr__(self, "retained", Retained(**self.retained))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Pointer:
        """A pointer from its JSON; keys a later server version added are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["kept"] = list(self.kept) if self.kept is not None else None
        return data

    def served_versions(self) -> tuple[int, ...]:
        """What workers serve: the stable version, the candidate, the retained one (each once)."""
        found = [self.version]
        found += [v.version for v in (self.canary, self.retained) if v is not None and v.version not in found]
        return tuple(found)


def check_fraction(raw: Any) -> float:
    """A canary fraction: a number in [0, 1) (0 ends a canary); BadRequest naming ``canary`` otherwise."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0 <= raw < 1:
        raise BadRequest("canary must be a number in [0, 1): the fraction of new episodes for the candidate "
                         "(0 ends the canary; promote a candidate with {\"version\": N})")
    return float(raw)


def running_canary_conflict(old: Pointer) -> Conflict:
    canary = old.canary
    return Conflict(
        f"model {old.model!r} runs a canary of version {canary.version} (fraction {canary.fraction:g}) against "
        f"stable version {old.version}: promote it ({{\"version\": {canary.version}}}), end it ({{\"canary\": 0}}), "
        "or publish with \"canary\" to replace the candidate"
    )


def superseding(old: Pointer, now: float, *, new_stable: int) -> Retained | None:
    """The retained version once ``new_stable`` replaces ``old``'s stable version."""
    if new_stable == old.version:
        return old.retained
    return Retained(old.version, now)


def with_new_stable(old: Pointer, version: int, digest: str, now: float, kept: tuple[int, ...]) -> Pointer:
    """``old`` with ``version`` stable (an update, a rollback or a promotion); the old stable
    is the previous and the retained version; a canary of ``version`` ends (promoted)."""
    if old.canary is not None and old.canary.version != version:
        raise running_canary_conflict(old)
    return dataclasses.replace(
        old, version=version, previous=old.version, generation=old.generation + 1, loaded=True, digest=digest,
        changed_at=now, kept=kept, canary=None, retained=superseding(old, now, new_stable=version),
    )


def with_candidate(old: Pointer, version: int, fraction: float, digest: str, now: float,
                   kept: tuple[int, ...]) -> Pointer:
    """``old`` with ``version`` the canary candidate at ``fraction`` (> 0). A different
    candidate it replaces becomes the retained version; the same one only changes fraction."""
    if not old.loaded:
        raise Conflict(f"model {old.model!r} is unloaded: load it before a canary")
    if version == old.version:
        raise Conflict(f"version {version} is {old.model!r}'s stable version: a canary needs another version")
    retained = old.retained
    since = now
    if old.canary is not None and old.canary.version == version:
        since = old.canary.since
    elif old.canary is not None:
        retained = Retained(old.canary.version, now)
    elif retained is not None and retained.version == version:
        retained = None  # the retained version is the candidate now
    return dataclasses.replace(
        old, generation=old.generation + 1, changed_at=now, kept=kept,
        canary=Canary(version, fraction, since, digest), retained=retained,
    )


def with_canary_fraction(old: Pointer, fraction: float, now: float) -> Pointer | None:
    """``old`` with its canary at ``fraction``; 0 ends it (the candidate becomes the retained
    version). None when there is nothing to change (0 with no canary running); Conflict for
    another fraction with no canary running."""
    if old.canary is None:
        if fraction == 0:
            return None
        raise Conflict(f"model {old.model!r} runs no canary: give \"version\" (a kept version) or a new model "
                       "with \"canary\" to start one")
    if fraction == 0:
        return dataclasses.replace(old, generation=old.generation + 1, changed_at=now, canary=None,
                                   retained=Retained(old.canary.version, now))
    return dataclasses.replace(old, generation=old.generation + 1, changed_at=now,
                               canary=dataclasses.replace(old.canary, fraction=fraction))
