"""Episodes without server state: what a request says about its episode, and its canary assignment.

A request may pin the model version that computes it (``X-Model-Version: N``; on OIP the
``/versions/{N}/`` route, on openpi's wire the version held by the connection) and name its
episode (``X-Episode-Id``; on OIP the ``episode_id`` parameter, on openpi's wire RoboArena's
``session_id``). The server keeps no episode state: a client pins its episode to the version
that answered its first request, and an unpinned request of an episode is assigned to a
running canary's candidate by a stable hash of the episode id (:func:`canary_share`), the
same on every worker and pod.
"""

from __future__ import annotations

import hashlib
import re

from policy_server.errors import BadRequest

VERSION_HEADER = "X-Model-Version"
EPISODE_HEADER = "X-Episode-Id"
EPISODE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
VERSION_NUMBER = re.compile(r"[0-9]{1,18}")
_SCALE = float(2**64)


def parse_version(raw: str | None, where: str = VERSION_HEADER) -> str | None:
    """A pinned version as the server names versions (``"007"`` is ``"7"``), or None when
    absent; BadRequest naming ``where`` when it is not a version number."""
    if raw is None:
        return None
    value = raw.strip()
    if not VERSION_NUMBER.fullmatch(value):
        raise BadRequest(f"{where} must be a model version number (as an answer's X-Model-Version names it), "
                         f"got {raw[:40]!r}")
    return str(int(value))


def parse_episode_id(raw: object, where: str = EPISODE_HEADER) -> str | None:
    """An episode id (1-128 characters of ``[A-Za-z0-9._:-]``), or None when absent;
    BadRequest naming ``where`` otherwise."""
    if raw is None:
        return None
    if not isinstance(raw, str) or not EPISODE_ID.fullmatch(raw):
        shown = raw[:40] if isinstance(raw, str) else type(raw).__name__
        raise BadRequest(f"{where} must be 1-128 characters of [A-Za-z0-9._:-], got {shown!r}")
    return raw


def canary_share(model: str, candidate: str, episode_id: str) -> float:
    """Where ``episode_id`` falls in [0, 1) for a canary of ``model``'s version ``candidate``:
    the episode goes to the candidate when this is below the canary's fraction.

    blake2b of the model, the candidate and the id: stable across workers, pods and
    restarts; independent between models and between successive canaries; and monotone in
    the fraction (raising it only adds episodes).
    """
    digest = hashlib.blake2b(f"{model}\0{candidate}\0{episode_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE
