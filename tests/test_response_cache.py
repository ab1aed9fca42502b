"""The response cache: hit, miss, TTL, LRU bound, and a new version never served an old entry."""

from __future__ import annotations

import numpy as np

from policy_server.serving.response_cache import ResponseCache, input_digest
from tests.support.fakes import fake_observation


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_hit_miss_and_ttl_expiry():
    clock = Clock()
    cache = ResponseCache(4, ttl_s=1.0, clock=clock)
    key = input_digest(fake_observation(0))
    assert cache.get("m", "1", key) is None
    cache.put("m", "1", key, {"action": np.ones(3)})
    assert cache.get("m", "1", key)["action"].tolist() == [1, 1, 1]
    clock.now = 0.99
    assert cache.get("m", "1", key) is not None
    clock.now = 1.0
    assert cache.get("m", "1", key) is None and len(cache) == 0
    assert (cache.hits, cache.misses) == (2, 2)


def test_a_new_version_never_serves_an_old_entry():
    cache = ResponseCache(4, ttl_s=60)
    key = input_digest(fake_observation(0))
    cache.put("m", "1", key, {"action": np.ones(1)})
    assert cache.get("m", "2", key) is None
    assert cache.get("other", "1", key) is None
    cache.put("m", "2", key, {"action": np.zeros(1)})
    cache.drop_model("m", keep_version="2")
    assert cache.get("m", "1", key) is None and cache.get("m", "2", key) is not None


def test_least_recently_used_entry_goes_first():
    cache = ResponseCache(2, ttl_s=60)
    keys = [input_digest(fake_observation(i)) for i in range(3)]
    cache.put("m", "1", keys[0], {})
    cache.put("m", "1", keys[1], {})
    cache.get("m", "1", keys[0])
    cache.put("m", "1", keys[2], {})
    assert cache.get("m", "1", keys[1]) is None
    assert cache.get("m", "1", keys[0]) is not None and cache.get("m", "1", keys[2]) is not None


def test_digest_depends_on_names_dtypes_shapes_and_bytes():
    obs = fake_observation(0)
    base = input_digest(obs)
    assert input_digest(dict(obs)) == base
    changed = dict(obs, image=obs["image"].copy())
    changed["image"][0, 0, 0] ^= 1
    variants = [
        changed,
        dict(obs, state=obs["state"].astype(np.float64)),
        dict(obs, state=obs["state"].reshape(2, 3)),
        {"state2": obs["state"], "image": obs["image"]},
    ]
    assert len({base, *map(input_digest, variants)}) == 5
