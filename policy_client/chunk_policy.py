"""``ChunkPolicy``: what a ``ChunkRunner`` talks to, a callable that returns an action chunk.

``request_tools.PolicyClient`` is one; so is any in-process function ``policy(obs)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["ChunkPolicy", "accepts_deadline", "accepts_episodes"]


@runtime_checkable
class ChunkPolicy(Protocol):
    """What a :class:`ChunkRunner` needs: ``policy(obs, *, deadline_s=None) -> {"action": [H, ...]}``.

    ``deadline_s`` bounds the call (the runner passes the time its answer stays useful); a
    callable without that keyword is called as ``policy(obs)``. Optional, found by name:
    ``model_info()`` (a ``/model_info`` dict: ``inputs`` with ``history`` windows,
    ``optional_inputs``), ``clone()`` (an equivalent policy for another request thread,
    used when more than one request is in flight; without it the same object is called
    from several threads), ``last_model_version`` (read after each call), the keywords
    ``episode_id`` and ``version`` (the runner then pins each episode to a version) and
    ``report_outcome(episode_id, version, success, *, episode_return=None)``.
    """

    def __call__(self, obs: Mapping[str, Any], *, deadline_s: float | None = None) -> Mapping[str, Any]: ...


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
