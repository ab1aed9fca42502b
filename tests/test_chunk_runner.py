"""request_tools.ChunkRunner: chunks played in time, requests ahead in the background, late
and failed answers, a server killed and restarted mid-episode, the spec handshake."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import requests

from request_tools import ChunkRunner, LoopClock, ObservationSpecError, PolicyClient, PolicyTimeoutError
from tests.serving import free_port, run_server
from tests.tiny_model import write_tiny_model

HORIZON = 10


def ramp_policy(delay_s: float = 0.0, fail: set[int] | None = None, slow: dict[int, float] | None = None):
    """A callable policy whose chunk for the observation at step t is [t, t+1, ..., t+9]:
    an action's value is the step it was planned for. ``fail``/``slow``: call numbers that
    raise or take longer."""
    calls = []

    def policy(obs):
        n = len(calls)
        calls.append(int(obs["t"]))
        time.sleep((slow or {}).get(n, delay_s))
        if n in (fail or set()):
            raise ConnectionError(f"call {n} fails")
        return {"action": (np.arange(HORIZON, dtype=np.float32) + obs["t"])[:, None]}

    policy.calls = calls
    return policy


def step_obs(t: int) -> dict:
    return {"t": np.float32(t)}


def image_obs(t: int = 0) -> dict:
    return {"state": np.zeros(6, np.float32), "image": np.zeros((8, 8, 3), np.uint8)}


def run_loop(runner: ChunkRunner, steps: int, rate_hz: float, obs=step_obs) -> tuple[list[float], LoopClock, float]:
    """``steps`` paced steps; returns each step's action (first dim), the clock, and the
    slowest act() after the first (which waits for the first chunk by design)."""
    clock = LoopClock(rate_hz)
    actions, slowest_act = [], 0.0
    for t in range(steps):
        start = time.perf_counter()
        actions.append(float(runner.act(obs(t))[0]))
        if t:
            slowest_act = max(slowest_act, time.perf_counter() - start)
        clock.tick()
    return actions, clock, slowest_act


def test_each_action_is_the_one_planned_for_its_step():
    with ChunkRunner(ramp_policy(delay_s=0.03), rate_hz=50) as runner:
        actions, _, _ = run_loop(runner, 60, 50)
    assert actions == [float(t) for t in range(60)]  # newer chunks start where time has got to
    assert runner.stats.starved_steps == 0 and runner.stats.failures == 0
    assert runner.stats.chunks >= 6 and runner.stats.skipped_actions >= runner.stats.chunks - 1


def test_a_late_answer_lets_the_chunk_play_out_then_the_fallback():
    policy = ramp_policy(slow={1: 0.5})  # the second request takes 25 steps at 50 Hz
    with ChunkRunner(policy, rate_hz=50, request_ahead=3, fallback=np.full(1, -1.0, np.float32)) as runner:
        actions, _, slowest = run_loop(runner, 40, 50)
    assert actions[:10] == [float(t) for t in range(10)]  # the first chunk plays to its end
    assert -1.0 in actions  # then the fallback, while the late answer is out
    assert runner.stats.starved_steps > 0
    assert runner.stats.stale_chunks == 1  # it arrived after its last action's step: dropped
    later = actions[actions.index(-1.0):]
    assert later[-1] == 39.0  # and the loop caught up with fresh chunks
    assert slowest < 0.01  # act() never waited on the slow request


def test_failed_requests_are_retried_with_backoff_and_reported():
    policy = ramp_policy(fail={1, 2, 3})
    with ChunkRunner(policy, rate_hz=50, request_ahead=4) as runner:
        actions, _, _ = run_loop(runner, 60, 50)
    assert runner.stats.failures == 3 and len(runner.stats.errors) == 3
    assert "call 1 fails" in runner.stats.errors[0]
    assert actions[-1] == 59.0  # recovered
    gaps = np.diff([t for t in policy.calls[1:5]])
    assert all(g >= 1 for g in gaps) and gaps[-1] >= gaps[0]  # backoff grows (0.05, 0.1, 0.2 s)


def test_no_first_chunk_raises_after_the_timeout():
    with ChunkRunner(ramp_policy(fail=set(range(100))), rate_hz=50, first_chunk_timeout_s=0.5) as runner:
        with pytest.raises(PolicyTimeoutError, match="call"):
            runner.act({"t": np.float32(0)})
        assert runner.stats.failures >= 2


def test_reset_discards_the_previous_episodes_answer():
    with ChunkRunner(ramp_policy(delay_s=0.05), rate_hz=50, request_ahead=HORIZON) as runner:
        runner.act({"t": np.float32(100)})  # asks again at once; the answer is in flight
        runner.reset()
        assert float(runner.act({"t": np.float32(0)})[0]) == 0.0  # the new episode's own chunk


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
