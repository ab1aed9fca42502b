"""A per-episode canary over the reacher (``examples/sim_loop.py --canary F``).

Two versions of the default policy meet the fleet: the stable one the server serves, and a
candidate made deliberately worse (its weights plus Gaussian noise of ``noise`` times each
tensor's standard deviation: 1.2 takes the reacher from about 100% to about 60% success),
published as a canary for the fraction F of new episodes (``update_model(weights=...,
canary=F)``). Each episode runs through a ``ChunkRunner`` at the task's control rate: the
runner makes a new episode id at its reset, the server assigns the episode by a hash of the
id, the runner pins it to the version of its first answer and reports its outcome at its end
(``report_outcome``). Success per version is then read from the server's own counters
(``policy_episode_outcomes_total`` on ``/metrics``), as a dashboard would, next to what the
runner saw. The canary is ended afterwards (its candidate retained for a window), unless
``keep``: then promote it or end it yourself.

    python examples/sim_loop.py --canary 0.5 --episodes 40 --skip-in-process
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import requests

from examples.reacher import ReacherEnv
from request_tools import PolicyClient
from robot_loop import ChunkRunner, LoopClock

log = logging.getLogger("canary_demo")

OUTCOME_SAMPLE = re.compile(r"^policy_episode_outcomes_total\{([^}]*)\} (\S+)$", re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')


def noisy_weights(model_dir: str, noise: float, seed: int = 7) -> dict[str, np.ndarray]:
    """The model's ``model.safetensors`` with Gaussian noise of ``noise`` x each float tensor's
    standard deviation added (a deliberately worse policy of the same architecture)."""
    from safetensors.numpy import load_file

    rng = np.random.default_rng(seed)
    out = {}
    for name, value in load_file(str(Path(model_dir) / "model.safetensors")).items():
        if value.dtype.kind == "f":
            scale = float(value.std()) if value.size > 1 else abs(float(value.ravel()[0])) + 1e-3
            value = np.asarray(value + rng.normal(0, noise * scale, value.shape), value.dtype)
        out[name] = value
    return out


def outcome_counts(metrics_text: str, model: str) -> dict[tuple[str, str], float]:
    """``policy_episode_outcomes_total`` of ``model`` by (version, outcome), from ``/metrics``."""
    counts: dict[tuple[str, str], float] = {}
    for labels, value in OUTCOME_SAMPLE.findall(metrics_text):
        fields = dict(LABEL.findall(labels))
        if fields.get("model") == model:
            key = (fields["version"], fields["outcome"])
            counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def read_metrics(client: PolicyClient) -> str:
    """The server's ``/metrics`` text (open, like the probes)."""
    response = requests.get(client.base_url + "/metrics", timeout=client.timeout_s)
    response.raise_for_status()
    return response.text


def per_version(before: Mapping, after: Mapping) -> dict[str, dict[str, Any]]:
    """Episodes, successes and success rate per version, from two readings of the counters."""
    out: dict[str, dict[str, Any]] = {}
    for (version, outcome), value in after.items():
        delta = int(round(value - before.get((version, outcome), 0.0)))
        if delta:
            row = out.setdefault(version, {"episodes": 0, "successes": 0})
            row["episodes"] += delta
            row["successes"] += delta if outcome == "success" else 0
    for row in out.values():
        row["success_rate"] = row["successes"] / row["episodes"]
    return out


def run_canary(client: PolicyClient, model_dir: str, seeds: list[int], *, fraction: float, noise: float,
               keep: bool = False) -> dict[str, Any]:
    """Publish a worse candidate of the default policy as a canary for ``fraction`` of new
    episodes, run one reacher episode per seed through a ChunkRunner (each reporting its
    outcome), and return success per version from the server's counters and from the runner."""
    info = client.model_info()
    name, stable = info["name"], info["stable_version"]
    answer = client.update_model(weights=noisy_weights(model_dir, noise), canary=fraction, model=name, wait_s=60)
    candidate = str(answer["canary"]["version"])
    log.info("canary: version %s (noise %.2f) for %.0f%% of new episodes; stable version %s", candidate, noise,
             100 * fraction, stable)
    before = outcome_counts(read_metrics(client), name)
    seen: dict[str, list[bool]] = {}
    with ChunkRunner(client, rate_hz=ReacherEnv.control_hz, model_info=info) as runner:
        for seed in seeds:
            env = ReacherEnv(seed)
            obs = env.reset()
            runner.reset()  # a new episode id: the server assigns it to a version
            clock = LoopClock(env.control_hz)
            while not env.done and runner.stopped is None:
                obs = env.step(np.asarray(runner.act(obs))).obs
                clock.tick()
            runner.report_outcome(env.success, episode_return=-env.distance)
            seen.setdefault(str(runner.episode_version), []).append(env.success)
            log.info("episode %s on version %s: %s", runner.episode_id[:8], runner.episode_version,
                     "success" if env.success else "failure")
        switches = runner.stats.version_switches
    after = outcome_counts(read_metrics(client), name)
    server = per_version(before, after)
    if not keep:
        client.end_canary(model=name, wait_s=60)
    for version, row in sorted(server.items()):
        role = "candidate" if version == candidate else "stable" if version == stable else "other"
        log.info("version %s (%s): %d/%d episodes succeeded (%.0f%%) per the server's counters", version, role,
                 row["successes"], row["episodes"], 100 * row["success_rate"])
    return {
        "model": name, "stable": stable, "candidate": candidate, "fraction": fraction, "noise": noise,
        "per_version": server,
        "runner_per_version": {v: {"episodes": len(s), "successes": sum(s)} for v, s in sorted(seen.items())},
        "version_switches": switches, "canary_kept": keep,
    }
