"""The reacher task (examples/reacher.py) and the two shipped policies trained on it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from examples import reacher
from examples.reacher import CHUNK, ReacherEnv, evaluate, expert_chunk, expert_policy, run_episode
from policy_server.launcher import ROOT
from policy_server.model.loader import load_model_dir

HELD_OUT = range(2_000_000, 2_000_005)  # seeds neither training nor train_policies' evaluation uses


def rollout(env: ReacherEnv, actions: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [env.reset()] + [env.step(a).obs for a in actions]


def test_observations_have_the_policy_input_spec():
    env = ReacherEnv(0)
    for obs in (env.reset(), env.step(np.zeros(7, np.float32)).obs):
        assert sorted(obs) == ["image", "state"]
        assert obs["state"].dtype == np.float32 and obs["state"].shape == (6,)
        assert obs["image"].dtype == np.uint8 and obs["image"].shape == (480, 640, 3)
    assert env.control_hz == 20 and env.max_steps == 100


def test_env_is_deterministic_given_the_seed():
    actions = np.random.default_rng(0).uniform(-3, 3, (12, 7)).astype(np.float32)
    first, second = rollout(ReacherEnv(7), actions), rollout(ReacherEnv(7), actions)
    for a, b in zip(first, second, strict=False):
        np.testing.assert_array_equal(a["state"], b["state"])
        np.testing.assert_array_equal(a["image"], b["image"])
    other = ReacherEnv(8).reset()
    assert not np.array_equal(other["image"], first[0]["image"])


def test_reset_draws_a_new_episode_each_time():
    env = ReacherEnv(3)
    env.reset()
    target = env.target.copy()
    env.reset()
    assert not np.allclose(env.target, target)


def test_target_is_only_in_the_image():
    q = np.array([1.0, -1.2])
    env = ReacherEnv(0)
    near = env.reset(q=q, target=np.array([0.05, 0.12]))
    far = env.reset(q=q, target=np.array([-0.1, 0.08]))
    np.testing.assert_array_equal(near["state"], far["state"])
    assert not np.array_equal(near["image"], far["image"])
    red = np.all(near["image"] == reacher.TARGET_COLOUR, axis=-1)
    rows, cols = np.nonzero(red)
    np.testing.assert_allclose([cols.mean(), rows.mean()], reacher.to_pixels([0.05, 0.12]), atol=1.0)


def test_only_action_dims_0_and_1_move_the_arm():
    actions = np.zeros((5, 7), np.float32)
    actions[:, :2] = 1.5
    noisy = actions.copy()
    noisy[:, 2:] = np.random.default_rng(1).normal(size=(5, 5)) * 100
    a, b = rollout(ReacherEnv(2), actions), rollout(ReacherEnv(2), noisy)
    np.testing.assert_array_equal(a[-1]["state"], b[-1]["state"])
    assert not np.array_equal(a[0]["state"], a[-1]["state"])


def test_commands_are_clipped_to_the_speed_limit():
    env = ReacherEnv(4)
    env.reset()
    for _ in range(20):
        env.step(np.array([100.0, -100.0, 0, 0, 0, 0, 0], np.float32))
        if env.done:
            break
    assert np.all(np.abs(env.dq) <= reacher.MAX_JOINT_SPEED + 1e-9)


@pytest.mark.parametrize("staleness, align", [(0, True), (3, True), (3, False)])
def test_expert_reaches_the_target(staleness, align):
    for seed in range(10):
        env = ReacherEnv(seed)
        result = run_episode(env, expert_policy(env), staleness=staleness, align=align)
        assert result.success and result.final_distance <= reacher.SUCCESS_RADIUS, seed
        assert env.done and result.steps < env.max_steps


def test_expert_chunk_executed_open_loop_tracks_the_expert():
    env = ReacherEnv(5)
    env.reset()
    chunk = expert_chunk(env)
    assert chunk.shape == (CHUNK, 7) and chunk.dtype == np.float32
    assert np.all(chunk[:, 2:] == 0)
    for action in chunk[:3]:
        env.step(action)
    np.testing.assert_allclose(expert_chunk(env)[:3], chunk[3:6], atol=1e-5)


@pytest.mark.parametrize("align", [True, False])
def test_run_episode_sees_observations_staleness_steps_old(align):
    """Chunks start at steps 0, e, 2e, ...; each is computed from the state s steps earlier."""
    staleness = 2
    seen = []

    def chunk_fn(obs):
        seen.append(obs["state"].copy())
        return np.full((CHUNK, 7), 0.4, np.float32)

    env = ReacherEnv(11)
    result = run_episode(env, chunk_fn, staleness=staleness, align=align)
    execute = CHUNK - staleness if align else CHUNK
    twin = ReacherEnv(11)
    states = [s["state"] for s in rollout(twin, np.full((result.steps, 7), 0.4, np.float32))]
    expected = [states[max(0, k * execute - staleness)] for k in range(result.chunks)]
    np.testing.assert_array_equal(np.array(seen), np.array(expected))


def test_run_episode_refuses_impossible_schedules():
    with pytest.raises(ValueError):
        run_episode(ReacherEnv(0), lambda obs: np.zeros((CHUNK, 7)), staleness=3, execute=8)


def chunk_fn_of(model):
    def chunk_fn(obs):
        batch = {k: torch.from_numpy(v[None]) for k, v in obs.items()}
        return model.policy.forward(batch)["action"][0].numpy()

    return chunk_fn


@pytest.fixture(scope="module", params=["default", "transformer"])
def shipped(request):
    return load_model_dir(os.path.join(ROOT, "models", request.param), "cpu")


def test_shipped_policies_load_with_the_reacher_spec(shipped):
    info = shipped.info()
    assert info["name"] in ("default", "transformer")
    assert info["inputs"][:2] == [
        {"name": "state", "dtype": "float32", "shape": [6]},
        {"name": "image", "dtype": "uint8", "shape": [480, 640, 3]},
    ]
    # the rest are optional: the transformer's real-time chunking inputs
    assert [e["name"] for e in info["inputs"][2:]] == info["optional_inputs"]
    assert all(e.get("optional") for e in info["inputs"][2:])
    assert info["outputs"][0] == {"name": "action", "dtype": "float32", "shape": [10, 7]}


@pytest.mark.parametrize("staleness", [0, 2])
def test_shipped_policies_reach_held_out_targets(shipped, staleness):
    rate, results = evaluate(chunk_fn_of(shipped), HELD_OUT, staleness=staleness)
    assert rate >= 0.8, [r.final_distance for r in results]


def test_transformer_returns_attention_rows_that_sum_to_one():
    model = load_model_dir(os.path.join(ROOT, "models", "transformer"), "cpu")
    assert model.policy.optional_outputs == ("attention",)
    spec = {s.name: s for s in model.output_spec}
    assert spec["attention"].shape == (4, CHUNK, 301) and spec["attention"].dtype == "float32"
    obs = ReacherEnv(0).reset()
    batch = {k: torch.from_numpy(np.stack([v, v])) for k, v in obs.items()}
    out = model.policy.forward(batch)
    attention = out["attention"].numpy()
    assert attention.shape == (2, *spec["attention"].shape) and attention.dtype == np.float32
    assert np.all(attention >= 0)
    np.testing.assert_allclose(attention.sum(axis=-1), 1.0, atol=1e-5)
    assert out["action"].shape == (2, CHUNK, 7)


# -- moving targets and history windows ---------------------------------------------------


def test_a_moving_target_circles_the_base_and_bounces_at_the_ends_of_its_arc():
    env = ReacherEnv(21, moving_target=True)
    env.reset()
    fixed = ReacherEnv(21)
    fixed.reset()
    np.testing.assert_array_equal(env.target, fixed.target)  # same episode draw, then it moves
    radius = np.linalg.norm(env.target)
    assert reacher.TARGET_OMEGA[0] <= abs(env.omega) <= reacher.TARGET_OMEGA[1]
    angles = []
    for _ in range(60):
        before = env.target.copy()
        obs = env.step(np.zeros(7, np.float32)).obs
        angles.append(np.arctan2(env.target[1], env.target[0]))
        assert np.isclose(np.linalg.norm(env.target), radius)
        assert not np.allclose(before, env.target)
        if env.done:
            break
    assert min(angles) >= reacher.TARGET_ANGLE[0] - 1e-9 and max(angles) <= reacher.TARGET_ANGLE[1] + 1e-9
    red = np.all(obs["image"] == reacher.TARGET_COLOUR, axis=-1)  # drawn where it now is
    rows, cols = np.nonzero(red)
    np.testing.assert_allclose([cols.mean(), rows.mean()], reacher.to_pixels(env.target), atol=1.0)
    target, omega = reacher.move_target(np.array([0.0, 0.1]), np.array(1.0), 2.0)  # past the arc's end
    assert omega == -1.0 and np.arctan2(target[1], target[0]) <= reacher.TARGET_ANGLE[1]


def test_the_expert_leads_a_moving_target():
    for seed in range(8):
        env = ReacherEnv(seed, moving_target=True)
        assert run_episode(env, expert_policy(env), staleness=2).success, seed


@pytest.mark.parametrize("pad", ["repeat_first", "zeros"])
def test_observation_window_pads_an_episode_start_as_declared(pad):
    window = reacher.ObservationWindow({"image": (3, pad)})
    frames = [{"image": np.full((2, 2), i, np.uint8), "state": np.full(6, i, np.float32)} for i in range(1, 5)]
    first = window(frames[0])
    assert first["image"].shape == (3, 2, 2) and first["state"].shape == (6,)  # only declared keys are windowed
    expected_pad = 1 if pad == "repeat_first" else 0
    assert first["image"][:, 0, 0].tolist() == [expected_pad, expected_pad, 1]  # row T-1 the newest
    assert window(frames[1])["image"][:, 0, 0].tolist() == [expected_pad, 1, 2]
    assert window(frames[2])["image"][:, 0, 0].tolist() == [1, 2, 3]
    assert window(frames[3])["image"][:, 0, 0].tolist() == [2, 3, 4]
    window.reset()
    assert window(frames[3])["image"][:, 0, 0].tolist() == [expected_pad if pad == "zeros" else 4] * 2 + [4]


def test_observation_window_reads_the_model_info_declaration():
    inputs = [{"name": "state", "dtype": "float32", "shape": [6]},
              {"name": "image", "dtype": "uint8", "shape": [2, 480, 640, 3], "history": {"steps": 2, "pad": "zeros"}}]
    assert reacher.ObservationWindow.from_spec(inputs).windows == {"image": (2, "zeros")}


@pytest.mark.parametrize("staleness", [0, 2])
def test_history_policy_reaches_held_out_moving_targets(staleness):
    model = load_model_dir(os.path.join(ROOT, "models", "history"), "cpu")
    windows = reacher.ObservationWindow.from_spec(model.info()["inputs"]).windows
    rate, results = evaluate(chunk_fn_of(model), HELD_OUT, staleness=staleness, moving_target=True, windows=windows)
    assert rate >= 0.8, [r.final_distance for r in results]
