"""``ChunkPolicy``: what a ``ChunkRunner`` talks to, a callable that returns an action chunk,
and the protocols of the optional abilities the runner uses when a policy has them.

``PolicyClient`` is one (with every ability); so is any in-process function ``policy(obs)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ChunkPolicy",
    "Clonable",
    "Closable",
    "DeclaresModel",
    "ReportsOutcomes",
    "ReportsVersion",
    "accepts_deadline",
    "accepts_episodes",
]


@runtime_checkable
class ChunkPolicy(Protocol):
    """What a :class:`ChunkRunner` needs: ``policy(obs, *, deadline_s=None) -> {"action": [H, ...]}``.

    ``deadline_s`` bounds the call (the runner passes the time its answer stays useful); a
    callable without that keyword is called as ``policy(obs)``. With the keywords
    ``episode_id`` and ``version`` (:func:`accepts_episodes`) the runner pins each episode
    to a version. The optional abilities are the protocols below: :class:`DeclaresModel`,
    :class:`Clonable`, :class:`Closable`, :class:`ReportsVersion`, :class:`ReportsOutcomes`.
    """

    def __call__(self, obs: Mapping[str, Any], *, deadline_s: float | None = None) -> Mapping[str, Any]: ...


@runtime_checkable
class DeclaresModel(Protocol):
    """``model_info()``: a ``/model_info`` dict (``inputs`` with ``history`` windows and text
    inputs, ``optional_inputs``); the runner keeps history windows and real-time chunking
    inputs by it."""

    def model_info(self) -> Mapping[str, Any]: ...


@runtime_checkable
class Clonable(Protocol):
    """``clone()``: an equivalent policy for another request thread, used when more than one
    request is in flight (without it the same object is called from several threads)."""

    def clone(self) -> Any: ...


@runtime_checkable
class Closable(Protocol):
    """``close()``: the runner closes the clones it made when it stops."""

    def close(self) -> None: ...


@runtime_checkable
class ReportsVersion(Protocol):
    """``last_model_version``: the model version of the last answer (read after each call)."""

    last_model_version: str | None


@runtime_checkable
class ReportsOutcomes(Protocol):
    """``report_outcome(episode_id, version, success, *, episode_return=None)``: how an
    episode ended, counted per model version by the server."""

    def report_outcome(self, episode_id: str, version: str, success: bool, *,
                       episode_return: float | None = None) -> Any: ...


def accepts_deadline(policy: Any) -> bool:
    """Whether ``policy`` can be called with ``deadline_s=`` (a parameter of that name, or ``**kwargs``)."""
    try:
        params = inspect.signature(policy).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "deadline_s" or p.kind is p.VAR_KEYWORD for p in params)


def accepts_episodes(policy: Any) -> bool:
    """Whether ``policy`` can be called with ``episode_id=`` and ``version=`` (both named, or ``**kwargs``)."""
    try:
        params = inspect.signature(policy).parameters.values()
    except (TypeError, ValueError):
        return False
    names = {p.name for p in params}
    return {"episode_id", "version"} <= names or any(p.kind is p.VAR_KEYWORD for p in params)
