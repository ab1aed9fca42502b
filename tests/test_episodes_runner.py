"""The ChunkRunner's episodes against an in-process stand-in for a server's pins: one version per
episode across an update, stop at the chunk boundary or continue when the version is retired,
a server that ignores pins, outcome reports. The same runner over a real server is in
test_episodes_live.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from policy_client.errors import EpisodeStopped, PolicyServerError
from robot_loop import ChunkRunner

RATE_HZ = 100.0
HORIZON = 10


class Fleet:
    """What the server serves: a current version and the versions a pin may name."""

    def __init__(self) -> None:
        self.current = "1"
        self.served = {"1"}
        self.requests: list[tuple[str | None, str | None]] = []  # (episode_id, version) of each request
        self.outcomes: list[tuple] = []
        self.lock = threading.Lock()


class PinnedPolicy:
    """A chunk policy that honours pins as the server does: a chunk filled with its version's
    number, or 409 ``version not served`` for a retired one. ``ignore_pins``: an older server."""

    def __init__(self, fleet: Fleet, ignore_pins: bool = False) -> None:
        self.fleet = fleet
        self.ignore_pins = ignore_pins
        self.last_model_version: str | None = None

    def __call__(self, obs, *, deadline_s=None, episode_id=None, version=None):
        with self.fleet.lock:
            self.fleet.requests.append((episode_id, version))
            answer = self.fleet.current if version is None or self.ignore_pins else version
            if answer not in self.fleet.served:
                raise PolicyServerError(409, "version not served", f"no version {answer}",
                                        body={"version": answer, "served_versions": sorted(self.fleet.served)})
        self.last_model_version = answer
        return {"action": np.full((HORIZON, 2), float(answer), np.float32)}

    def clone(self) -> PinnedPolicy:
        return PinnedPolicy(self.fleet, self.ignore_pins)

    def report_outcome(self, episode_id, version, success, *, episode_return=None):
        self.fleet.outcomes.append((episode_id, version, success, episode_return))
        return {"outcome": "success" if success else "failure"}


def play(runner: ChunkRunner, steps: int) -> list[float]:
    """``steps`` control steps at RATE_HZ; the first action dimension of each."""
    actions = []
    for _ in range(steps):
        actions.append(float(runner.act({"state": np.zeros(2, np.float32)})[0]))
        time.sleep(1 / RATE_HZ)
    return actions


def make_runner(policy, **kwargs) -> ChunkRunner:
    return ChunkRunner(policy, rate_hz=RATE_HZ, fallback=np.full(2, -1.0, np.float32), first_chunk_timeout_s=5,
                       **kwargs)


def test_an_episode_keeps_its_first_answers_version_across_an_update_and_the_next_episode_takes_the_new():
    fleet = Fleet()
    with make_runner(PinnedPolicy(fleet)) as runner:
        runner.reset()
        first = runner.episode_id
        actions = play(runner, 30)
        with fleet.lock:
            fleet.current, fleet.served = "2", {"1", "2"}  # an update; 1 retained
        actions += play(runner, 40)
        assert set(actions) <= {1.0, -1.0} and actions.count(1.0) > 50
        assert runner.episode_version == "1" and runner.stats.versions == {"1": runner.stats.chunks}
        sent = [r for r in fleet.requests if r[0] == first]
        assert sent[0] == (first, None) and all(r == (first, "1") for r in sent[1:]) and len(sent) > 3
        runner.reset()
        assert runner.episode_id != first and runner.episode_version is None
        assert set(play(runner, 20)) <= {2.0, -1.0} and runner.episode_version == "2"
        assert runner.stopped is None and runner.stats.version_switches == 0


def test_a_retired_version_stops_the_episode_at_its_chunk_boundary_playing_the_fallback():
    fleet = Fleet()
    with make_runner(PinnedPolicy(fleet)) as runner:
        runner.reset()
        before = play(runner, 25)
        with fleet.lock:
            fleet.current, fleet.served = "3", {"2", "3"}  # two updates: version 1 is no longer retained
        after = play(runner, 40)
        assert set(before) <= {1.0, -1.0} and before[-1] == 1.0
        stop_at = after.index(-1.0)
        assert stop_at >= 1 and set(after[:stop_at]) == {1.0}  # the chunk it had, played to its end
        assert set(after[stop_at:]) == {-1.0}  # then the fallback: never another version
        assert isinstance(runner.stopped, EpisodeStopped)
        assert (runner.stopped.version, runner.stopped.served) == ("1", ["2", "3"])
        assert "pinned to model version 1" in str(runner.stopped) and runner.stats.episodes_stopped == 1
        asked = len(fleet.requests)
        play(runner, 10)
        assert len(fleet.requests) == asked  # nothing more is sent for a stopped episode
        runner.reset()
        assert runner.stopped is None and set(play(runner, 20)) <= {3.0, -1.0}


def test_continue_moves_the_episode_to_the_current_version_and_counts_the_switch():
    fleet = Fleet()
    with make_runner(PinnedPolicy(fleet), on_version_retired="continue") as runner:
        runner.reset()
        play(runner, 25)
        with fleet.lock:
            fleet.current, fleet.served = "3", {"3"}
        actions = play(runner, 60)
        assert actions[-1] == 3.0 and runner.episode_version == "3"
        assert runner.stopped is None and runner.stats.version_switches == 1
        assert set(actions) <= {1.0, 3.0, -1.0}


def test_an_answer_from_another_version_than_the_pin_is_never_played():
    fleet = Fleet()
    with make_runner(PinnedPolicy(fleet, ignore_pins=True)) as runner:
        runner.reset()
        play(runner, 20)
        with fleet.lock:
            fleet.current, fleet.served = "2", {"1", "2"}
        actions = play(runner, 40)
        assert 2.0 not in actions and isinstance(runner.stopped, EpisodeStopped)


def test_the_runner_reports_its_episodes_outcome_with_the_pinned_version():
    fleet = Fleet()
    with make_runner(PinnedPolicy(fleet)) as runner:
        runner.reset(episode_id="robot-3:ep-17")
        assert runner.report_outcome(True) is None  # no answer yet: nothing to report
        play(runner, 15)
        assert runner.report_outcome(False, episode_return=-1.5) == {"outcome": "failure"}
    assert fleet.outcomes == [("robot-3:ep-17", "1", False, -1.5)]


def test_a_policy_without_episode_keywords_is_not_pinned_and_a_bad_choice_is_refused():
    calls = []

    def plain(obs):
        calls.append(obs)
        return {"action": np.zeros((HORIZON, 2), np.float32)}

    with make_runner(plain) as runner:
        runner.reset()
        play(runner, 5)
        assert calls and runner.report_outcome(True) is None
    with pytest.raises(ValueError, match="on_version_retired"):
        make_runner(plain, on_version_retired="ignore")
