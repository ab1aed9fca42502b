"""robot_loop: the ChunkRunner's scheduling from measured latency (several requests in flight,
out-of-order answers, past actions dropped), every merge strategy in the loop, real-time chunking inputs,
history windows, telemetry, retries; and the loop against a real server (slow, killed and
restarted, the spec handshake). Loops run at 50 Hz with latencies scaled to the horizon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests

import request_tools
import robot_loop
from request_tools import (
    ChunkRunner,
    LoopClock,
    ObservationSpecError,
    PolicyClient,
    PolicyServerError,
    PolicyTimeoutError,
    check_observation,
)
from robot_loop import MERGE_STRATEGIES, RTC_INPUTS, ChunkPolicy, RunnerStats
from tests.support.serving import free_port, run_server
from tests.support.tiny_model import write_tiny_model
from tests.support.wait import eventually

HORIZON = 10
RATE_HZ = 50  # a 10-action chunk covers 0.2 s


def ramp_policy(delay_s: float = 0.0, fail: set[int] | None = None, slow: dict[int, float] | None = None,
                error=ConnectionError):
    """A callable policy whose chunk for the observation at step t has rows [t + i, t]: an
    action's first value is the step it was planned for, its second the step of the
    observation it came from. ``fail``/``slow``: call numbers that raise or take longer."""
    calls = []
    lock = threading.Lock()

    def policy(obs):
        with lock:
            n = len(calls)
            calls.append(int(obs["t"]))
        time.sleep((slow or {}).get(n, delay_s))
        if n in (fail or set()):
            raise error(f"call {n} fails")
        t = float(obs["t"])
        return {"action": np.stack([np.arange(HORIZON, dtype=np.float32) + t, np.full(HORIZON, t, np.float32)], 1)}

    policy.calls = calls
    return policy


def step_obs(t: int) -> dict:
    return {"t": np.float32(t)}


def image_obs(t: int = 0) -> dict:
    return {"state": np.zeros(6, np.float32), "image": np.zeros((8, 8, 3), np.uint8)}


def run_loop(runner: ChunkRunner, steps: int, rate_hz: float, obs=step_obs, full: bool = False):
    """``steps`` paced steps; returns each step's action (first value, or the whole action
    with ``full``), the clock, and the slowest act() after the first (which waits for the
    first chunk by design)."""
    clock = LoopClock(rate_hz)
    actions, slowest_act = [], 0.0
    for t in range(steps):
        start = time.perf_counter()
        action = runner.act(obs(t))
        actions.append(np.array(action) if full else float(action[0]))
        if t:
            slowest_act = max(slowest_act, time.perf_counter() - start)
        clock.tick()
    return actions, clock, slowest_act


# -- a room of its own ---------------------------------------------------------------------


def test_the_loop_tools_live_in_robot_loop_and_stay_importable_from_request_tools():
    assert request_tools.ChunkRunner is robot_loop.ChunkRunner
    assert request_tools.LoopClock is robot_loop.LoopClock and request_tools.RunnerStats is RunnerStats
    with pytest.raises(AttributeError):
        request_tools.NoSuchThing  # noqa: B018
    code = ("import robot_loop, sys; from request_tools import ChunkRunner; "
            "print(sorted(m for m in ('torch', 'flask', 'werkzeug') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"  # the light client install: numpy and requests only


def test_a_policy_client_is_a_chunk_policy_and_clones_for_other_threads():
    client = PolicyClient("http://127.0.0.1:9", model="m", api_key="k" * 10, retries=0, deadline_s=0.5)
    assert isinstance(client, ChunkPolicy) and isinstance(ramp_policy(), ChunkPolicy)
    twin = client.clone()
    assert twin is not client and twin._session is not client._session
    assert (twin.base_url, twin.model, twin.api_key, twin.retries, twin.deadline_s) == (
        client.base_url, "m", "k" * 10, 0, 0.5)
    client._input_specs["m"] = [{"name": "x", "dtype": "float32", "shape": [1]}]
    assert twin.input_spec() == client._input_specs["m"]  # the spec cache is shared
    client.close()
    twin.close()


def test_an_optional_input_may_be_missing_from_an_observation():
    spec = [{"name": "state", "dtype": "float32", "shape": [2]},
            {"name": "prefix_length", "dtype": "int32", "shape": [1], "optional": True}]
    check_observation({"state": np.zeros(2, np.float32)}, spec)
    check_observation({"state": np.zeros(2, np.float32), "prefix_length": np.zeros(1, np.int32)}, spec)
    with pytest.raises(ObservationSpecError, match="'prefix_length': dtype int64"):
        check_observation({"state": np.zeros(2, np.float32), "prefix_length": np.zeros(1, np.int64)}, spec)
    with pytest.raises(ObservationSpecError, match="'state': missing"):
        check_observation({}, spec)


# -- scheduling ----------------------------------------------------------------------------


def test_each_action_is_the_one_planned_for_its_step():
    with ChunkRunner(ramp_policy(delay_s=0.03), rate_hz=RATE_HZ) as runner:
        actions, _, _ = run_loop(runner, 60, RATE_HZ)
    assert actions == [float(t) for t in range(60)]  # newer chunks start where time has got to
    stats = runner.stats
    assert stats.starved_steps == 0 and stats.failures == 0
    assert stats.chunks >= 6
    # an answer taken at step t for the observation of step s skips its rows for s .. t-1
    assert stats.skipped_actions == sum(stats.delays_steps) and min(list(stats.delays_steps)[1:]) >= 1


def test_a_latency_past_half_the_horizon_keeps_several_requests_in_flight():
    rate_hz = 20  # 50 ms periods: room for a loaded box's scheduling noise
    latency_s = 0.7 * HORIZON / rate_hz  # 7 of the chunk's 10 steps
    with ChunkRunner(ramp_policy(delay_s=latency_s), rate_hz=rate_hz) as runner:
        actions, _, slowest = run_loop(runner, 60, rate_hz)
    assert runner.stats.starved_steps == 0, runner.stats.to_dict()
    assert actions == [float(t) for t in range(60)]
    assert runner.stats.max_in_flight >= 3 and runner.stats.delay_steps >= 7
    assert slowest < latency_s / 2  # act() never waited for an answer
    # with one request in flight (the runner before v2) the same latency starves the loop
    with ChunkRunner(ramp_policy(delay_s=latency_s), rate_hz=rate_hz, max_in_flight=1) as single:
        run_loop(single, 60, rate_hz)
    assert single.stats.max_in_flight == 1 and single.stats.starved_steps >= 10


def test_an_older_answer_never_replaces_a_newer_one():
    # call 1 (sent at step 1) takes 6 steps; the calls after it take none: they overtake it
    policy = ramp_policy(slow={1: 6 / RATE_HZ})
    with ChunkRunner(policy, rate_hz=RATE_HZ, request_ahead=HORIZON, max_in_flight=3) as runner:
        actions, _, _ = run_loop(runner, 30, RATE_HZ, full=True)
    assert [a[0] for a in actions] == [float(t) for t in range(30)]
    sources = [a[1] for a in actions]
    assert sources == sorted(sources)  # the observation behind the played action never goes back
    assert policy.calls[:3] == [0, 1, 2] and 1.0 not in sources  # the overtaken answer was never played
    assert runner.stats.out_of_order >= 1  # (others may overtake each other on a busy box too)


def test_a_late_answer_is_hedged_by_another_request():
    policy = ramp_policy(slow={1: 0.5})  # the second request takes 25 steps
    with ChunkRunner(policy, rate_hz=RATE_HZ, request_ahead=3, fallback=np.full(2, -1.0, np.float32)) as runner:
        actions, _, slowest = run_loop(runner, 40, RATE_HZ)
    assert actions == [float(t) for t in range(40)]  # overdue, it no longer counted: the next one went out
    assert runner.stats.starved_steps == 0
    assert runner.stats.out_of_order + runner.stats.stale_chunks == 1  # when it came, it was dropped
    assert slowest < 0.1  # act() never waited on the 0.5 s request


def test_a_latency_spike_past_the_horizon_never_has_more_than_the_cap_plus_one_out():
    """Calls 10-39 take longer than the horizon: each goes overdue and is hedged, but the
    requests still running (overdue ones included) never pass max_in_flight + 1."""
    rate_hz = 20  # a 10-action chunk covers 0.5 s; the slow calls take 0.6 s
    policy = ramp_policy(slow={n: 0.6 for n in range(10, 40)}, delay_s=0.1)
    with ChunkRunner(policy, rate_hz=rate_hz, max_in_flight=3, fallback=np.full(2, -1.0, np.float32)) as runner:
        run_loop(runner, 100, rate_hz)
    assert len(policy.calls) > 12  # the spike happened: requests went overdue and were hedged
    assert runner.stats.max_in_flight <= 4


def test_a_late_answer_with_one_request_in_flight_lets_the_chunk_play_out_then_the_fallback():
    policy = ramp_policy(slow={1: 0.5})  # sent at step 6, it would come at step 31
    with ChunkRunner(policy, rate_hz=RATE_HZ, request_ahead=3, max_in_flight=1,
                     fallback=np.full(2, -1.0, np.float32)) as runner:
        actions, _, slowest = run_loop(runner, 40, RATE_HZ)
    assert policy.calls[1] == 6
    assert actions[:10] == [float(t) for t in range(10)]  # the first chunk plays to its end
    # then the fallback, while the late answer is out and could still bring a useful action
    assert actions[10:16] == [-1.0] * 6
    assert actions[-10:] == [float(t) for t in range(30, 40)]  # from step 16 a new request, and fresh chunks
    assert runner.stats.starved_steps >= 6
    assert runner.stats.out_of_order + runner.stats.stale_chunks == 1  # when it came, it was dropped
    assert slowest < 0.1


def test_failed_requests_are_retried_with_backoff_and_reported():
    policy = ramp_policy(fail={1, 2, 3})
    with ChunkRunner(policy, rate_hz=RATE_HZ, request_ahead=4) as runner:
        actions, _, _ = run_loop(runner, 60, RATE_HZ)
    assert runner.stats.failures == 3 and len(runner.stats.errors) == 3
    assert "call 1 fails" in runner.stats.errors[0]
    assert actions[-1] == 59.0  # recovered
    gaps = np.diff([t for t in policy.calls[1:5]])
    assert all(g >= 1 for g in gaps) and gaps[-1] >= gaps[0]  # backoff grows (0.05, 0.1, 0.2 s)


class Busy(PolicyServerError):
    """A 503 the client gave up on, with the server's Retry-After hint."""

    def __init__(self, message: str) -> None:
        super().__init__(503, "busy", message)
        self.retry_after_s = 5.0


def test_a_retryable_failure_is_retried_within_the_chunk_not_after_retry_after():
    policy = ramp_policy(fail={1}, error=Busy)
    with ChunkRunner(policy, rate_hz=RATE_HZ) as runner:
        actions, _, _ = run_loop(runner, 40, RATE_HZ)
    assert runner.stats.failures == 1 and "503" in runner.stats.errors[0]
    assert runner.stats.starved_steps == 0  # retried before the plan ran out, not 5 s later
    assert actions == [float(t) for t in range(40)]


def test_each_request_carries_its_chunks_remaining_horizon_as_deadline():
    deadlines = []

    def policy(obs, *, deadline_s=None):
        deadlines.append(deadline_s)
        return {"action": np.zeros((HORIZON, 2), np.float32)}

    with ChunkRunner(policy, rate_hz=RATE_HZ, first_chunk_timeout_s=7.0) as runner:
        run_loop(runner, 20, RATE_HZ)
    assert deadlines[0] == pytest.approx(7.0, abs=0.05)  # the first chunk: the first-chunk timeout
    later = deadlines[1:]
    assert later and all(0.9 * (HORIZON - 1) / RATE_HZ <= d <= (HORIZON - 1) / RATE_HZ for d in later)


def test_no_first_chunk_raises_after_the_timeout():
    with ChunkRunner(ramp_policy(fail=set(range(100))), rate_hz=RATE_HZ, first_chunk_timeout_s=0.5) as runner:
        with pytest.raises(PolicyTimeoutError, match="call"):
            runner.act({"t": np.float32(0)})
        assert runner.stats.failures >= 2


def test_reset_discards_the_previous_episodes_answer():
    with ChunkRunner(ramp_policy(delay_s=0.05), rate_hz=RATE_HZ, request_ahead=HORIZON) as runner:
        runner.act({"t": np.float32(100)})  # asks again at once; the answer is in flight
        runner.reset()
        assert float(runner.act({"t": np.float32(0)})[0]) == 0.0  # the new episode's own chunk


# -- merge strategies in the loop (each strategy alone: test_chunk_merge.py) ---------------


@pytest.mark.parametrize("merge", MERGE_STRATEGIES)
def test_every_merge_strategy_keeps_actions_on_their_steps(merge):
    rate_hz = 25
    latency_s = 0.6 * HORIZON / rate_hz
    with ChunkRunner(ramp_policy(delay_s=latency_s), rate_hz=rate_hz, merge=merge) as runner:
        actions, _, _ = run_loop(runner, 50, rate_hz)
    assert runner.stats.starved_steps == 0
    np.testing.assert_allclose(actions, np.arange(50), atol=1e-5)  # every chunk agrees: so must the merge


# -- real-time chunking inputs ---------------------------------------------------------------

RTC_INFO = {
    "inputs": [
        {"name": "t", "dtype": "float32", "shape": []},
        {"name": "action_prefix", "dtype": "float32", "shape": [HORIZON, 2], "optional": True},
        {"name": "prefix_length", "dtype": "int32", "shape": [1], "optional": True},
        {"name": "inference_delay", "dtype": "int32", "shape": [1], "optional": True},
    ],
    "optional_inputs": list(RTC_INPUTS),
}


class RecordingPolicy:
    """Answers like ramp_policy after ``delay_s``, with ``model_info``; records every request.
    As a real-time chunking policy would, it keeps rows [0, inference_delay) of the prefix."""

    def __init__(self, info: dict, delay_s: float = 0.0) -> None:
        self.info, self.delay_s, self.requests = info, delay_s, []

    def model_info(self) -> dict:
        return self.info

    def __call__(self, obs, *, deadline_s=None):
        self.requests.append(obs)
        time.sleep(self.delay_s)
        t = float(obs["t"])
        actions = np.stack([np.arange(HORIZON, dtype=np.float32) + t, np.full(HORIZON, t, np.float32)], 1)
        if "action_prefix" in obs:
            d = int(obs["inference_delay"][0])
            actions[:d] = obs["action_prefix"][:d]
        return {"action": actions}


def test_rtc_requests_carry_the_plans_unexecuted_actions_and_the_delay():
    policy = RecordingPolicy(RTC_INFO, delay_s=2.5 / RATE_HZ)
    with ChunkRunner(policy, rate_hz=RATE_HZ, merge="rtc", max_in_flight=1) as runner:
        actions, _, _ = run_loop(runner, 40, RATE_HZ, full=True)
    assert runner.real_time_chunking
    first, later = policy.requests[0], policy.requests[1:]
    assert int(first["prefix_length"][0]) == 0 and int(first["inference_delay"][0]) == 0
    assert not first["action_prefix"].any()
    assert len(later) >= 3
    for request in later:
        s, length, delay = int(request["t"]), int(request["prefix_length"][0]), int(request["inference_delay"][0])
        prefix = request["action_prefix"]
        assert prefix.shape == (HORIZON, 2) and prefix.dtype == np.float32
        assert 1 <= length <= HORIZON and 3 <= delay <= length  # 2.5 steps measured: 3 or more
        assert not prefix[length:].any()  # zeros past the plan
        assert prefix[:length, 0].tolist() == [float(s + i) for i in range(length)]  # the plan for s, s+1, ...
        played = [a for a in actions[s:s + delay]]
        np.testing.assert_array_equal(prefix[:len(played)], played)  # and it is what was then played
    # asked early (rtc_request_ahead), so the prefix overlaps the fresh chunk past the delay
    assert max(int(r["prefix_length"][0]) - int(r["inference_delay"][0]) for r in later) >= 2
    assert runner.stats.starved_steps == 0


@pytest.mark.parametrize("delay, ahead", [(0, 5), (1, 5), (2, 6), (3, 6), (4, 6), (5, 5), (8, 8), (10, 10)])
def test_rtc_asks_with_the_delay_plus_an_overlap_left_keeping_one_request_per_delay(delay, ahead):
    # d + max(2, (H - d) // 2), capped at H - d (the paper's s >= d), never below d
    assert robot_loop.rtc_request_ahead(delay, HORIZON) == ahead


class GatedRtcPolicy:
    """Answers call n (observation step s) only once ``release(n)`` is called: rows ``[s + i,
    100 * n]``, except rows [0, inference_delay) which keep the prefix, as real-time chunking
    does. Records every request."""

    def __init__(self) -> None:
        self.requests, self.gates, self.lock = [], {}, threading.Lock()

    def gate(self, n: int) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(n, threading.Event())

    def release(self, *calls: int) -> None:
        for n in calls:
            self.gate(n).set()

    def model_info(self) -> dict:
        return RTC_INFO

    def __call__(self, obs, *, deadline_s=None):
        with self.lock:
            n = len(self.requests)
            self.requests.append(obs)
        self.gate(n).wait(10.0)
        s = float(obs["t"])
        actions = np.stack([np.arange(HORIZON, dtype=np.float32) + s, np.full(HORIZON, 100.0 * n, np.float32)], 1)
        d = int(obs["inference_delay"][0])
        actions[:d] = obs["action_prefix"][:d]
        return {"action": actions}


def test_rtc_answer_with_a_stale_prefix_is_anchored_one_with_the_live_prefix_played_as_is():
    policy = GatedRtcPolicy()
    policy.release(0)
    runner = ChunkRunner(policy, rate_hz=RATE_HZ, merge="rtc", request_ahead=8, max_in_flight=2)

    def act(t: int) -> float:
        return float(runner.act(step_obs(t))[1])

    def answered(count: int) -> None:  # wait until `count` answers wait in the runner's queue
        eventually(lambda: runner._answers.qsize() >= count, 10.0, f"{count} answers queued", every_s=0.001)

    try:
        played = [act(t) for t in range(6)]  # chunk 0 (rows [i, 0]); A sent at step 1, B at step 2
        eventually(lambda: len(policy.requests) >= 3, 10.0, "B's thread picking it up", every_s=0.001)
        assert [int(r["t"]) for r in policy.requests] == [0, 1, 2]
        assert [int(r["inference_delay"][0]) for r in policy.requests[1:]] == [5, 5]
        policy.release(1)
        answered(1)
        played.append(act(6))  # A's prefix (chunk 0 from step 1) is still the plan: played as-is
        policy.release(2)
        answered(1)
        played += [act(t) for t in range(7, 11)]  # B's prefix (chunk 0 from step 2) is not: A replaced it
    finally:
        for n in range(len(policy.requests) + 2):
            policy.release(n)
        runner.close()
    # steps 0-5 chunk 0; 6 A's own row (anchoring it would give 0); from 7 B anchored to A:
    # B's 200 shifted by A - B = -100 at its arrival, the shift falling as fast as B's own
    # largest step over the rows it plays (1, its first dim's) allows: 1 per step (played
    # as-is B would give 200, a step of 100).
    assert played == pytest.approx([0, 0, 0, 0, 0, 0, 100, 100, 101, 102, 103])
    assert runner.stats.stale_prefixes == 1 and runner.stats.chunks == 3
    assert runner.stats.to_dict()["stale_prefixes"] == 1


def test_rtc_answer_whose_prefix_ends_before_it_arrives_goes_on_from_the_last_played_action():
    # A (step 1) and B (step 2) go out before either answers; B's prefix holds chunk 0's
    # rows for steps 2..9 only, and B lands at step 11, after step 10 was played from A.
    policy = GatedRtcPolicy()
    policy.release(0)
    runner = ChunkRunner(policy, rate_hz=RATE_HZ, merge="rtc", request_ahead=9, max_in_flight=2)

    def answered(count: int) -> None:
        eventually(lambda: runner._answers.qsize() >= count, 10.0, f"{count} answers queued", every_s=0.001)

    try:
        played = [float(runner.act(step_obs(t))[1]) for t in range(3)]
        eventually(lambda: len(policy.requests) >= 3, 10.0, "3 requests sent", every_s=0.001)
        assert [int(r["t"]) for r in policy.requests] == [0, 1, 2]
        assert [int(r["prefix_length"][0]) for r in policy.requests[1:]] == [9, 8]
        policy.release(1)
        answered(1)
        played += [float(runner.act(step_obs(t))[1]) for t in range(3, 11)]
        policy.release(2)
        answered(1)
        played.append(float(runner.act(step_obs(11))[1]))
    finally:
        for n in range(len(policy.requests) + 2):
            policy.release(n)
        runner.close()
    # steps 0-5 chunk 0 (A keeps it for inference_delay 5 rows, steps 1-5); A's 100 from 6
    # to 10; at 11 B (200, its rows for 10 and 11 both its own) goes on from A's 100 at step
    # 10, anchored there, with no step larger than its own largest (1) instead of jumping to 200.
    assert played == [0] * 6 + [100] * 5 + [101]
    assert runner.stats.stale_prefixes == 1


def test_a_model_that_does_not_declare_the_rtc_inputs_gets_neither():
    info = {"inputs": [{"name": "t", "dtype": "float32", "shape": []}], "optional_inputs": []}
    policy = RecordingPolicy(info, delay_s=0.01)
    with ChunkRunner(policy, rate_hz=RATE_HZ, merge="rtc") as runner:
        actions, _, _ = run_loop(runner, 30, RATE_HZ)
    assert not runner.real_time_chunking
    assert len(policy.requests) >= 3 and all(set(r) == {"t"} for r in policy.requests)
    assert actions == [float(t) for t in range(30)]  # it plays answers as they come
    # a model that declares them, with a merge other than rtc: not sent either
    declared = RecordingPolicy(RTC_INFO, delay_s=0.01)
    with ChunkRunner(declared, rate_hz=RATE_HZ, merge="replace") as runner:
        run_loop(runner, 10, RATE_HZ)
    assert declared.requests and all(set(r) == {"t"} for r in declared.requests)


# -- observation history -------------------------------------------------------------------


def history_info(pad: str, steps: int = 3) -> dict:
    return {"inputs": [
        {"name": "t", "dtype": "float32", "shape": []},
        {"name": "pos", "dtype": "float32", "shape": [steps, 2], "history": {"steps": steps, "pad": pad}},
    ]}


def pos_obs(base: float):
    return lambda t: {"t": np.float32(t), "pos": np.full(2, base + t, np.float32)}


@pytest.mark.parametrize("pad", ["repeat_first", "zeros"])
def test_history_windows_are_kept_per_episode_and_padded_at_its_start(pad):
    policy = RecordingPolicy(history_info(pad))
    with ChunkRunner(policy, rate_hz=RATE_HZ, request_ahead=HORIZON, max_in_flight=1) as runner:
        run_loop(runner, 12, RATE_HZ, obs=pos_obs(100.0))
        first_episode = len(policy.requests)
        runner.reset()
        run_loop(runner, 12, RATE_HZ, obs=pos_obs(500.0))
    assert first_episode >= 3 and len(policy.requests) >= first_episode + 3
    bases = set()
    for n, request in enumerate(policy.requests):
        s = int(request["t"])
        base = float(request["pos"][-1, 0]) - s  # the episode's: 100 or 500
        bases.add(base)
        window = request["pos"]
        assert window.shape == (3, 2) and window.dtype == np.float32
        for row, step in enumerate(range(s - 2, s + 1)):  # row 2 is the newest
            expected = base + step if step >= 0 else (base if pad == "repeat_first" else 0.0)
            assert window[row].tolist() == [expected, expected], (n, s, window)
    assert bases == {100.0, 500.0}  # (a request sent at the first episode's end may be recorded after the reset)


class LoadingHistoryPolicy(RecordingPolicy):
    """A history model on a server still loading at the loop's start: the first
    ``model_info()`` is a 503; a request without the window is refused with a 422."""

    def __init__(self) -> None:
        super().__init__(history_info("repeat_first"))
        self.info_reads = 0

    def model_info(self) -> dict:
        self.info_reads += 1
        if self.info_reads == 1:
            raise PolicyServerError(503, "not ready", "model is loading")
        return self.info

    def __call__(self, obs, *, deadline_s=None):
        if np.shape(obs["pos"]) != (3, 2):
            self.requests.append(obs)
            got = list(np.shape(obs["pos"]))
            raise PolicyServerError(422, "invalid input", f"input 'pos': expected shape [3, 2], got {got}")
        return super().__call__(obs, deadline_s=deadline_s)


def test_declarations_unread_at_the_start_are_read_again_within_the_episode():
    policy = LoadingHistoryPolicy()
    with ChunkRunner(policy, rate_hz=RATE_HZ, request_ahead=HORIZON, max_in_flight=1,
                     first_chunk_timeout_s=5.0) as runner:
        actions, _, _ = run_loop(runner, 12, RATE_HZ, obs=pos_obs(100.0))  # no reset() in between
    assert policy.info_reads >= 2
    windows = [r["pos"] for r in policy.requests if np.shape(r["pos"]) == (3, 2)]
    assert windows and all(w.shape == (3, 2) for w in windows)
    assert actions[1:] == [float(t) for t in range(1, 12)]  # the episode went on, each step its own action
    assert runner.stats.starved_steps <= 1


def test_a_history_input_given_as_a_window_is_refused_with_its_name():
    with ChunkRunner(RecordingPolicy(history_info("zeros")), rate_hz=RATE_HZ) as runner:
        with pytest.raises(ObservationSpecError, match=r"'pos': shape \[3, 2\], expected one step \[2\]"):
            runner.act({"t": np.float32(0), "pos": np.zeros((3, 2), np.float32)})


# -- telemetry -----------------------------------------------------------------------------


def test_stats_report_latency_delay_staleness_and_in_flight_as_json():
    with ChunkRunner(ramp_policy(delay_s=0.5 * HORIZON / RATE_HZ), rate_hz=RATE_HZ) as runner:
        run_loop(runner, 40, RATE_HZ)
        dump = json.loads(runner.stats.to_json())
    assert dump["steps"] == 40 and dump["starved_steps"] == 0
    assert 90 <= dump["latency_ms_p50"] <= dump["latency_ms_p99"]  # 100 ms requests
    assert dump["delay_steps"] >= 5 and dump["max_in_flight"] >= 2
    staleness = list(runner.stats.staleness_steps)
    assert len(staleness) == 40 and max(staleness) <= HORIZON - 1 and max(staleness[5:]) >= 5
    assert dump["staleness_steps_max"] == max(staleness)


def test_stats_histories_are_bounded():
    stats = RunnerStats()
    for i in range(3 * robot_loop.HISTORY_LEN):
        stats.latencies_s.append(0.001 * i)
        stats.staleness_steps.append(i % 7)
        stats.delays_steps.append(i % 3)
    assert len(stats.latencies_s) == len(stats.staleness_steps) == len(stats.delays_steps) == robot_loop.HISTORY_LEN
    assert stats.to_dict()["staleness_steps_max"] == 6


# -- against a real server ---------------------------------------------------------------


@pytest.fixture
def tiny_root(tmp_path):
    root = tmp_path / "models"
    write_tiny_model(root / "slow", 3.0, forward_delay_s=0.2)
    write_tiny_model(root / "fast", 3.0)
    return root


def test_a_slow_server_below_the_horizon_does_not_slow_the_loop(tmp_path, tiny_root):
    rate_hz = 20  # a 10-action chunk covers 0.5 s; every forward takes 0.2 s
    with run_server(tmp_path, workers=1, args=("--model-path", str(tiny_root / "slow"),
                                               "--model-root", str(tiny_root))) as server:
        with PolicyClient(server.base_url) as client, ChunkRunner(client, rate_hz=rate_hz) as runner:
            actions, clock, slowest = run_loop(runner, 60, rate_hz, image_obs)
    assert runner.stats.starved_steps == 0 and runner.stats.failures == 0
    assert min(runner.stats.latencies_s) >= 0.2
    assert runner.stats.chunks >= 5 and set(runner.stats.versions) == {"1"}
    assert all(a == 3.0 for a in actions)
    assert slowest < 0.5 / HORIZON  # act() never waited on the network
    assert clock.achieved_hz > 0.9 * rate_hz


def test_the_loop_survives_a_server_killed_and_restarted_mid_episode(tmp_path, tiny_root):
    rate_hz, port = 20, free_port()
    args = ("--model-path", str(tiny_root / "fast"), "--model-root", str(tiny_root))
    env = {"POLICY_SERVER_MODEL_STORE": str(tmp_path / "store")}
    with PolicyClient(f"http://127.0.0.1:{port}", retries=0) as client:
        with run_server(tmp_path / "a", workers=1, args=args, env=env, port=port) as server:
            runner = ChunkRunner(client, rate_hz=rate_hz, max_backoff_s=0.5)
            run_loop(runner, 20, rate_hz, image_obs)
            assert runner.stats.failures == 0
            os.killpg(server.process.pid, signal.SIGKILL)  # master and worker: no drain
            server.process.wait()
        chunks_before = runner.stats.chunks
        restarted = threading.Event()

        def restart():
            with run_server(tmp_path / "b", workers=1, args=args, env=env, port=port):
                restarted.set()
                stop.wait(60)

        stop = threading.Event()
        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        try:
            clock = LoopClock(rate_hz)
            steps = 0
            while not restarted.is_set() and steps < 60 * rate_hz:  # bounded: a minute at most
                runner.act(image_obs())
                clock.tick()
                steps += 1
            assert restarted.is_set()
            starved_while_down = runner.stats.starved_steps
            actions, clock_after, slowest = run_loop(runner, 3 * rate_hz, rate_hz, image_obs)
        finally:
            runner.close()
            stop.set()
            thread.join(60)
    assert runner.stats.failures >= 1  # the outage was seen and reported
    assert starved_while_down > 0  # the chunk ran out while the server was down: fallback played
    assert runner.stats.chunks > chunks_before  # and chunks flow again after the restart
    assert actions[-rate_hz:] == [3.0] * rate_hz  # the last second is all served actions
    assert clock.overruns <= 2 and slowest < 0.5 / HORIZON  # the loop never blocked on the outage


def test_spec_mismatch_is_named_before_anything_is_sent(tmp_path, tiny_root):
    with run_server(tmp_path, workers=1, args=("--model-path", str(tiny_root / "fast"),
                                               "--model-root", str(tiny_root))) as server:
        with PolicyClient(server.base_url) as client:
            bad = {"state": np.zeros(6, np.float32), "image": np.zeros((480, 640, 3), np.uint8)}
            with pytest.raises(ObservationSpecError, match=r"'image': shape \[480, 640, 3\], expected \[8, 8, 3\]"):
                client.infer(bad)
            np.testing.assert_array_equal(client.infer(image_obs())["action"], np.full((10, 7), 3.0, np.float32))
            scrape = requests.get(server.base_url + "/metrics", timeout=5).text
    infer_lines = [line for line in scrape.splitlines() if line.startswith("policy_requests_total{route=\"/infer\"")]
    assert infer_lines == ['policy_requests_total{route="/infer",status="200"} 1.0']  # the bad one never left
