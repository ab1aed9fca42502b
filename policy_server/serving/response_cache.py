"""An optional per-worker response cache: LRU with a TTL, keyed by model, version and input digest.

The version is part of the key, so a response computed by an older version is never served
once a newer one is current (and :meth:`ResponseCache.drop_model` frees those entries).
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def input_digest(inputs: Mapping[str, Any]) -> bytes:
    """A digest of every input's name, dtype, shape and bytes, texts included (each text, or
    each of a vectorized request's list of texts, as UTF-8 with its length; blake2b, 16 bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        value = inputs[name]
        if isinstance(value, np.ndarray):
            digest.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
            digest.update(np.ascontiguousarray(value).data)
            continue
        texts = [value] if isinstance(value, str) else list(value)
        digest.update(f"{name}\0text\0{len(texts)}\0".encode())
        for text in texts:
            encoded = text.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.digest()


class ResponseCache:
    """Outputs by ``(model, version, input digest)``; at most ``size`` entries, each for ``ttl_s``."""

    def __init__(self, size: int, ttl_s: float, clock=time.monotonic) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: collections.OrderedDict[tuple, tuple[float, dict[str, np.ndarray]]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def get(self, model: str, version: str, digest: bytes) -> dict[str, np.ndarray] | None:
        key = (model, version, digest)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] <= self._clock():
                if entry is not None:
                    del self._entries[key]
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, model: str, version: str, digest: bytes, outputs: dict[str, np.ndarray]) -> None:
        with self._lock:
            self._entries[(model, version, digest)] = (self._clock() + self.ttl_s, outputs)
            self._entries.move_to_end((model, version, digest))
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def drop_model(self, model: str, keep_version: str | None = None, keep_versions: Iterable[str] = ()) -> None:
        """Forget ``model``'s entries, except those of ``keep_version`` and ``keep_versions``."""
        keep = {keep_version, *keep_versions}
        with self._lock:
            for key in [k for k in self._entries if k[0] == model and k[1] not in keep]:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
