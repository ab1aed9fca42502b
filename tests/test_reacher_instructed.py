"""The instructed reacher (examples/reacher_instructed.py): two discs, an instruction naming one."""

from __future__ import annotations

import numpy as np

from examples import reacher
from examples.reacher import CHUNK, expert_actions, expert_policy, run_episode
from examples.reacher_instructed import (
    COLOUR_RGB,
    COLOURS,
    HELD_OUT_PHRASINGS,
    MIN_SEPARATION,
    PATH_CLEARANCE,
    TRAIN_PHRASINGS,
    InstructedReacherEnv,
    evaluate,
    instruction,
    path_clearance,
    sample_scene,
    scene_ok,
    with_prompt,
)


def centroid(image: np.ndarray, colour) -> np.ndarray:
    rows, cols = np.nonzero(np.all(image == colour, axis=-1))
    assert len(rows) > 1000, f"no disc of {colour}"  # a disc of radius 28 px is about 2,460 px
    return np.array([cols.mean(), rows.mean()])


def test_observation_carries_the_instruction_beside_the_reacher_inputs():
    env = InstructedReacherEnv(0)
    for obs in (env.reset(), env.step(np.zeros(7, np.float32)).obs):
        assert sorted(obs) == ["image", "prompt", "state"]
        assert obs["state"].dtype == np.float32 and obs["state"].shape == (6,)
        assert obs["image"].dtype == np.uint8 and obs["image"].shape == (480, 640, 3)
        assert isinstance(obs["prompt"], str) and obs["prompt"] == env.prompt
        assert env.colour in obs["prompt"] and COLOURS[1 - COLOURS.index(env.colour)] not in obs["prompt"]


def test_both_targets_are_drawn_in_their_colours_where_they_are():
    for seed in range(4):
        env = InstructedReacherEnv(seed)
        image = env.reset()["image"]
        for colour in COLOURS:
            np.testing.assert_allclose(centroid(image, COLOUR_RGB[colour]), reacher.to_pixels(env.positions[colour]),
                                       atol=1.0)
        np.testing.assert_array_equal(env.target, env.positions[env.colour])
        np.testing.assert_array_equal(env.other, env.positions[COLOURS[1 - COLOURS.index(env.colour)]])
    assert len({reacher.LINK_COLOUR, reacher.EFFECTOR_COLOUR, reacher.JOINT_COLOUR, *COLOUR_RGB.values()}) == 5


def drive(env: InstructedReacherEnv, goal: np.ndarray) -> None:
    """Play the expert's chunks toward ``goal`` (metres) until the episode ends."""
    while not env.done:
        for action in expert_actions(env.q, env.dq, goal):
            env.step(action)
            if env.done:
                break


def test_success_only_at_the_named_target_and_touching_the_other_ends_the_episode_as_a_failure():
    for colour in COLOURS:
        env = InstructedReacherEnv(5)
        env.reset(colour=colour)
        assert env.colour == colour and colour in env.prompt
        drive(env, env.target)
        assert env.success and not env.touched_other and env.distance <= reacher.SUCCESS_RADIUS
        assert env.steps < env.max_steps

        env = InstructedReacherEnv(5)
        env.reset(colour=colour)
        drive(env, env.other)
        assert env.done and env.touched_other and not env.success, colour
        assert env.other_distance <= reacher.SUCCESS_RADIUS < env.distance
        assert env.steps < env.max_steps


def test_episodes_are_deterministic_given_the_seed():
    actions = np.random.default_rng(0).uniform(-3, 3, (12, 7)).astype(np.float32)

    def rollout(seed):
        env = InstructedReacherEnv(seed)
        return [env.reset()] + [env.step(a).obs for a in actions[:5]] + [env.reset()]

    first, second = rollout(7), rollout(7)
    for a, b in zip(first, second, strict=True):
        assert a["prompt"] == b["prompt"]
        np.testing.assert_array_equal(a["state"], b["state"])
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(rollout(8)[0]["image"], first[0]["image"])


def test_instructions_name_both_colours_in_every_phrasing_and_keep_a_held_out_set():
    assert not set(TRAIN_PHRASINGS) & set(HELD_OUT_PHRASINGS)
    seen = {"train": set(), "held-out": set()}
    colours = []
    for phrasings, templates in (("train", TRAIN_PHRASINGS), ("held-out", HELD_OUT_PHRASINGS)):
        env = InstructedReacherEnv(1, phrasings=phrasings)
        for _ in range(150):
            prompt = env.reset()["prompt"]
            assert prompt in {instruction(env.colour, t) for t in templates}, prompt
            seen[phrasings].add(prompt)
            colours.append(env.colour)
    assert seen["train"] == {instruction(c, t) for c in COLOURS for t in TRAIN_PHRASINGS}
    assert seen["held-out"] == {instruction(c, t) for c in COLOURS for t in HELD_OUT_PHRASINGS}
    assert 0.4 < colours.count("red") / len(colours) < 0.6


def test_swap_names_the_other_target_in_the_same_scene_and_phrasing():
    for seed in range(6):
        drawn, swapped = InstructedReacherEnv(seed), InstructedReacherEnv(seed, swap=True)
        a, b = drawn.reset(), swapped.reset()
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(drawn.target, swapped.other)
        assert swapped.colour != drawn.colour
        assert b["prompt"] == a["prompt"].replace(drawn.colour, swapped.colour)


def test_scenes_keep_the_targets_apart_and_each_path_clear_of_the_other():
    rng = np.random.default_rng(3)
    for _ in range(100):
        q, first, second = sample_scene(rng)
        assert scene_ok(q, first, second)
        assert np.linalg.norm(first - second) >= MIN_SEPARATION
        for goal, other in ((first, second), (second, first)):
            assert path_clearance(q, reacher.inverse_kinematics(goal), other) >= PATH_CLEARANCE
    q = np.array([1.0, -0.5])
    goal = reacher.forward_kinematics(q)[1]
    assert not scene_ok(np.array([0.5, -0.5]), goal, goal + 0.01)  # overlapping targets are refused


def test_the_expert_follows_either_instruction_and_a_text_blind_policy_reaches_half():
    seeds = range(20)
    for swap in (False, True):
        for seed in seeds:
            env = InstructedReacherEnv(seed, swap=swap)
            result = run_episode(env, expert_policy(env), staleness=2)
            assert result.success and not env.touched_other, (seed, swap)

    def go_red(obs):  # text-blind: always the red disc, found in the image
        rows, cols = np.nonzero(np.all(obs["image"] == COLOUR_RGB["red"], axis=-1))
        x, y = (cols.mean() - reacher.BASE_PX[0], reacher.BASE_PX[1] - rows.mean())
        red = np.array([x, y]) / reacher.PIXELS_PER_METRE
        return expert_actions(obs["state"][:2], obs["state"][2:4], red)[:CHUNK]

    blind = evaluate(go_red, seeds)
    told = evaluate(with_prompt(go_red, "reach the blue target"), seeds)  # the prompt changes nothing for it
    named_red = [InstructedReacherEnv(s) for s in seeds]
    for env in named_red:
        env.reset()
    assert [r.success for r in blind.results] == [env.colour == "red" for env in named_red]
    assert blind.other_rate == 1 - blind.success_rate and told.results == blind.results
