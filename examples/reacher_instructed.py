"""The instructed reacher: two targets, a red and a blue disc, and a text instruction that names one.

The arm, the camera, the actions and the control rate are ``examples/reacher.py``'s. Each
episode draws a start configuration, two target positions, which of them is red, which
colour the instruction names and a phrasing, e.g. ``"reach the red target"`` or ``"go to
the blue one"``. Only the image shows where the targets are and only the instruction says
which one to reach, so a policy must read both.

Observation: ``{"state": float32[6], "image": uint8[480, 640, 3], "prompt": str}``; the
prompt stays the same for the whole episode.

Success: the end effector within ``SUCCESS_RADIUS`` (2 cm) of the *named* target's centre.
Touching the other target (within the same radius of its centre) ends the episode as a
failure, so a policy that tries both targets in turn gains nothing, and one that ignores
the instruction succeeds about half the time. Scenes are drawn so that the expert's path
to either target (a straight line in joint space from the start) passes the other one at
least ``PATH_CLEARANCE`` away: every scene is solvable for both instructions, which is what
the mismatched-instruction control (``swap=True``, the other target named in the same
scene) needs.

Phrasings: the policy is trained on :data:`TRAIN_PHRASINGS`; :data:`HELD_OUT_PHRASINGS`
(other verbs and nouns, capitals and punctuation) are kept for evaluation. Everything is
deterministic given the seed. Only numpy is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from examples.reacher import (
    MAX_STEPS,
    MIN_START_DISTANCE,
    SUCCESS_RADIUS,
    TARGET_ANGLE,
    TARGET_DISTANCE,
    EpisodeResult,
    ReacherEnv,
    StepResult,
    forward_kinematics,
    inverse_kinematics,
    make_state,
    render,
    run_episode,
    sample_episode,
)
from examples.reacher_camera import BLUE_TARGET_COLOUR, TARGET_COLOUR, draw_target

COLOURS = ("red", "blue")
COLOUR_RGB = {"red": TARGET_COLOUR, "blue": BLUE_TARGET_COLOUR}
TRAIN_PHRASINGS = (
    "reach the {} target",
    "go to the {} one",
    "touch the {} disc",
    "move to the {} target",
    "put the end effector on the {} dot",
    "reach for the {} circle",
    "{} target",
    "go to the {} disc please",
    "touch {}",
    "the {} one",
)
HELD_OUT_PHRASINGS = (
    "head for the {} disc",
    "Bring the gripper to the {} one.",
    "can you touch the {} circle?",
    "{} please",
    "aim for the {} target now",
)
PHRASING_SETS = {"train": TRAIN_PHRASINGS, "held-out": HELD_OUT_PHRASINGS, "all": TRAIN_PHRASINGS + HELD_OUT_PHRASINGS}
MIN_SEPARATION = 0.08  # metres between the two targets' centres (the discs never overlap)
PATH_CLEARANCE = 0.035  # metres: the straight joint-space path to either target passes the other this far off
PATH_POINTS = 32  # points checked along that path
SCENE_TRIES = 20  # second-target draws per start before the start is drawn again


def instruction(colour: str, phrasing: str) -> str:
    """The prompt naming ``colour`` ("red" or "blue") in ``phrasing`` (a template with one ``{}``)."""
    return phrasing.format(colour)


def path_clearance(q: np.ndarray, goal_q: np.ndarray, point: np.ndarray) -> float:
    """Metres between ``point`` [2] and the end effector along the straight joint-space path
    from ``q`` [2] to ``goal_q`` [2] (the expert's path from rest, up to its velocity lag)."""
    s = np.linspace(0.0, 1.0, PATH_POINTS)[:, None]
    ee = forward_kinematics(q + s * (goal_q - q))[1]
    return float(np.min(np.linalg.norm(ee - point, axis=-1)))


def scene_ok(q: np.ndarray, first: np.ndarray, second: np.ndarray) -> bool:
    """True when the two targets are apart, the start is off both, and the path to each clears the other."""
    ee = forward_kinematics(q)[1]
    return bool(
        np.linalg.norm(first - second) >= MIN_SEPARATION
        and np.linalg.norm(ee - second) > MIN_START_DISTANCE
        and path_clearance(q, inverse_kinematics(first), second) >= PATH_CLEARANCE
        and path_clearance(q, inverse_kinematics(second), first) >= PATH_CLEARANCE
    )


def sample_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A start configuration q [2] and two target positions [2] (metres) that pass :func:`scene_ok`."""
    while True:
        q, first = sample_episode(rng)
        for _ in range(SCENE_TRIES):
            radius, angle = rng.uniform(*TARGET_DISTANCE), rng.uniform(*TARGET_ANGLE)
            second = radius * np.array([np.cos(angle), np.sin(angle)])
            if scene_ok(q, first, second):
                return q, first, second


def render_scene(q: np.ndarray, red: np.ndarray, blue: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The camera image uint8[480, 640, 3]: the arm at ``q``, the red and the blue disc (metres)."""
    return draw_target(render(q, red, out), blue, BLUE_TARGET_COLOUR)


@dataclass(frozen=True)
class Episode:
    """One drawn episode: start ``q`` [2], each colour's position (metres), the named colour
    and the phrasing (a template); ``prompt`` is the instruction."""

    q: np.ndarray
    positions: dict[str, np.ndarray]
    colour: str
    phrasing: str

    @property
    def prompt(self) -> str:
        return instruction(self.colour, self.phrasing)


def sample_instructed(rng: np.random.Generator, phrasings: Sequence[str] = TRAIN_PHRASINGS) -> Episode:
    """Draw a scene, which target is red, the named colour and a phrasing (in that order)."""
    q, first, second = sample_scene(rng)
    red_first = bool(rng.random() < 0.5)
    positions = {"red": first, "blue": second} if red_first else {"red": second, "blue": first}
    colour = COLOURS[int(rng.integers(2))]
    return Episode(q, positions, colour, phrasings[int(rng.integers(len(phrasings)))])


class InstructedReacherEnv(ReacherEnv):
    """The instructed reacher; ``reset()`` draws the next episode from the env's seeded generator.

    ``phrasings``: ``"train"``, ``"held-out"`` or ``"all"`` (:data:`PHRASING_SETS`), the
    templates instructions are drawn from. ``swap``: every episode names the *other* target
    than its draw (same scene, same phrasing): the mismatched-instruction control.
    ``target`` is the named target's position, ``other`` the other one's, ``colour`` the
    named colour, ``prompt`` the instruction.
    """

    def __init__(self, seed: int | None = None, *, phrasings: str = "all", swap: bool = False) -> None:
        super().__init__(seed)
        self.phrasings = PHRASING_SETS[phrasings]
        self.swap = swap
        self.positions = {c: np.zeros(2) for c in COLOURS}
        self.other = np.zeros(2)
        self.colour = COLOURS[0]
        self.prompt = ""
        self._touched_other = False

    def reset(self, *, colour: str | None = None) -> dict:  # type: ignore[override]
        """Start an episode (arm at rest) and return its first observation.

        ``colour`` pins the named colour (the generator still draws it, so the scene and the
        phrasing are the ones the seed gives).
        """
        episode = sample_instructed(self.rng, self.phrasings)
        named = episode.colour
        if self.swap:
            named = COLOURS[1 - COLOURS.index(named)]
        if colour is not None:
            named = COLOURS[COLOURS.index(colour)]
        self.colour = named
        self.prompt = instruction(named, episode.phrasing)
        self.positions = {c: np.array(p, dtype=np.float64) for c, p in episode.positions.items()}
        self.target = self.positions[named]
        self.other = self.positions[COLOURS[1 - COLOURS.index(named)]]
        self.q = np.array(episode.q, dtype=np.float64)
        self.dq = np.zeros(2)
        self.steps = 0
        self._success = False
        self._touched_other = False
        return self.observe()

    def step(self, action: np.ndarray) -> StepResult:
        """Apply one float32[7] action; the episode ends on the named target (success) or the other (failure)."""
        result = super().step(action)
        self._touched_other = not self._success and self.other_distance <= SUCCESS_RADIUS
        return StepResult(result.obs, self.done, self._success)

    def observe(self) -> dict:
        """state float32[6], image uint8[480, 640, 3] (both discs) and the prompt (str)."""
        return {
            "state": make_state(self.q, self.dq),
            "image": render_scene(self.q, self.positions["red"], self.positions["blue"]),
            "prompt": self.prompt,
        }

    @property
    def other_distance(self) -> float:
        """End effector to the other (not named) target's centre, metres."""
        return float(np.linalg.norm(self.ee - self.other))

    @property
    def touched_other(self) -> bool:
        """True when the episode ended on the target the instruction did not name (a failure)."""
        return self._touched_other

    @property
    def done(self) -> bool:
        return self._success or self._touched_other or self.steps >= self.max_steps


# -- evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """Success rate (named target reached), the rate of episodes ended on the other target, and each result."""

    success_rate: float
    other_rate: float
    results: list[EpisodeResult]


def evaluate(
    chunk_fn: Callable[[dict], np.ndarray],
    seeds: Iterable[int],
    *,
    phrasings: str = "all",
    swap: bool = False,
    **options,
) -> Evaluation:
    """``reacher.run_episode`` over one fresh :class:`InstructedReacherEnv` per seed
    (``options``: staleness, align, execute)."""
    results, other = [], 0
    for seed in seeds:
        env = InstructedReacherEnv(seed, phrasings=phrasings, swap=swap)
        results.append(run_episode(env, chunk_fn, **options))
        other += env.touched_other
    n = max(len(results), 1)
    return Evaluation(sum(r.success for r in results) / n, other / n, results)


def with_prompt(chunk_fn: Callable[[dict], np.ndarray], prompt: str) -> Callable[[dict], np.ndarray]:
    """``chunk_fn`` shown ``prompt`` instead of each observation's own: a policy that ignores the instruction."""
    return lambda obs: chunk_fn({**obs, "prompt": prompt})


__all__ = [
    "COLOURS",
    "COLOUR_RGB",
    "HELD_OUT_PHRASINGS",
    "MAX_STEPS",
    "PHRASING_SETS",
    "TRAIN_PHRASINGS",
    "Episode",
    "Evaluation",
    "InstructedReacherEnv",
    "evaluate",
    "instruction",
    "path_clearance",
    "render_scene",
    "sample_instructed",
    "sample_scene",
    "scene_ok",
    "with_prompt",
]
