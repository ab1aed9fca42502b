"""A planar 2-link reacher seen by a 640x480 camera: a closed-loop task for the shipped policies.

The arm's base sits near the bottom of the picture; the arm must bring its end effector onto
a red disc. The target is drawn in the image and nowhere else, so a policy has to read the
camera to find it; the joint state tells it where the arm is.

Observation (exactly the shipped policies' input spec)::

    {"state": float32[6], "image": uint8[480, 640, 3]}
    state = [q1, q2, dq1, dq2, ee_x, ee_y]

``q1`` is the shoulder angle from the +x axis (counter-clockwise, radians, never wrapped),
``q2`` the elbow angle relative to the first link, ``dq`` the joint velocities (rad/s) and
``ee`` the end effector in metres from the base (x right, y up).

Action: float32[7]. Dims 0-1 are joint velocity commands (rad/s), clipped to
``MAX_JOINT_SPEED``; dims 2-6 are ignored (a 7-dof action space shared with other arms). The
joints follow their command through a first-order lag (``VELOCITY_LAG`` of the gap per step),
at ``control_hz`` = 20. A policy returns a chunk float32[10, 7]: the next 10 actions.

With ``moving_target=True`` the target circles the base at a constant radius and angular
speed ``omega`` (``TARGET_OMEGA``, rad/s, either direction, drawn per episode), bouncing back
at the ends of its arc: a policy must see it move (two or more frames) to lead it.

An episode succeeds once the end effector is within ``SUCCESS_RADIUS`` (the target disc's
radius) of the target's centre; it ends there, or after ``max_steps``. Everything is
deterministic given the seed. Rendering redraws only the bounding boxes of the arm and the
target over a preallocated, lightly textured background (about 1 ms per frame).

Public API: :class:`ReacherEnv` (with :class:`StepResult`), :func:`run_episode` and
:func:`evaluate` (with :class:`EpisodeResult`), :func:`expert_chunk`, :func:`expert_policy`,
:func:`expert_actions`, :func:`render`, :func:`step_arm`, :func:`forward_kinematics`,
:func:`inverse_kinematics`, :func:`make_state`, :func:`sample_episode`, :func:`sample_omega`,
:func:`move_target`, :class:`ObservationWindow`.
Only numpy is imported. The arm's constants, kinematics and dynamics live in
``examples/reacher_arm.py``, the camera in ``examples/reacher_camera.py`` and the history
window in ``examples/observation_window.py``; this module re-exports their public names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from examples.observation_window import ObservationWindow
from examples.reacher_arm import (  # noqa: F401 (the task's constants and arm, re-exported)
    ACTION_DIM,
    CHUNK,
    CONTROL_HZ,
    DT,
    EXPERT_KD,
    EXPERT_KP,
    EXPERT_LEAD_S,
    HEIGHT,
    LINK_LENGTHS,
    MAX_JOINT_SPEED,
    MAX_STEPS,
    MIN_START_DISTANCE,
    START_ABS_Q2,
    START_Q1,
    STATE_DIM,
    SUCCESS_RADIUS,
    TARGET_ANGLE,
    TARGET_DISTANCE,
    TARGET_OMEGA,
    TARGET_RADIUS,
    VELOCITY_LAG,
    WIDTH,
    forward_kinematics,
    inverse_kinematics,
    make_state,
    move_target,
    step_arm,
)
from examples.reacher_camera import (  # noqa: F401 (the camera, re-exported)
    BACKGROUND,
    BACKGROUND_COLOUR,
    BASE_PX,
    EFFECTOR_COLOUR,
    JOINT_COLOUR,
    JOINT_RADIUS_PX,
    LINK_COLOUR,
    LINK_HALF_WIDTH_PX,
    PIXELS_PER_METRE,
    TARGET_COLOUR,
    render,
    to_pixels,
)


def expert_actions(
    q: np.ndarray, dq: np.ndarray, target: np.ndarray, horizon: int = CHUNK, omega: np.ndarray | None = None
) -> np.ndarray:
    """The expert's next ``horizon`` actions from arm state (q, dq) toward ``target``.

    With ``omega`` (a moving target's angular speed, [...]) each action aims where the target
    will be ``EXPERT_LEAD_S`` after that action's step.

    Vectorised: q, dq, target [..., 2] give float32[..., horizon, 7]. Each action is a PD
    command toward the IK solution, scaled (direction kept) to the speed limit, and the copy
    of the arm is stepped with the env's own dynamics, so executing the chunk open loop
    reproduces the expert's closed-loop trajectory (up to float32 rounding).
    """
    q = np.array(q, dtype=np.float64)
    dq = np.array(dq, dtype=np.float64)
    goal = inverse_kinematics(target)
    out = np.zeros((*q.shape[:-1], horizon, ACTION_DIM), dtype=np.float32)
    for k in range(horizon):
        if omega is not None:
            goal = inverse_kinematics(move_target(target, omega, (k + 1) * DT + EXPERT_LEAD_S)[0])
        command = EXPERT_KP * (goal - q) - EXPERT_KD * dq
        peak = np.max(np.abs(command), axis=-1, keepdims=True)
        command = command * np.minimum(1.0, MAX_JOINT_SPEED / np.maximum(peak, 1e-9))
        out[..., k, :2] = command
        q, dq = step_arm(q, dq, command)
    return out


def expert_chunk(env: ReacherEnv) -> np.ndarray:
    """float32[10, 7]: the expert's chunk from the env's current state (uses the privileged target)."""
    return expert_actions(env.q, env.dq, env.target, omega=env.omega if env.moving_target else None)


def expert_policy(env: ReacherEnv) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A ``chunk_fn`` for :func:`run_episode`: the expert's chunk from the observed (possibly
    stale) arm state in ``obs["state"]`` and the env's privileged target."""

    def chunk_fn(obs: dict[str, np.ndarray]) -> np.ndarray:
        state = obs["state"].astype(np.float64)
        return expert_actions(state[:2], state[2:4], env.target, omega=env.omega if env.moving_target else None)

    return chunk_fn


# -- the environment ---------------------------------------------------------------------


def sample_episode(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A start configuration q [2] and a target [2] (metres) from the task's distribution."""
    while True:
        radius = rng.uniform(*TARGET_DISTANCE)
        angle = rng.uniform(*TARGET_ANGLE)
        target = radius * np.array([np.cos(angle), np.sin(angle)])
        q = np.array([rng.uniform(*START_Q1), rng.choice([-1.0, 1.0]) * rng.uniform(*START_ABS_Q2)])
        if np.linalg.norm(forward_kinematics(q)[1] - target) > MIN_START_DISTANCE:
            return q, target


def sample_omega(rng: np.random.Generator, size: int | None = None) -> np.ndarray:
    """A moving target's angular speed (rad/s): ``TARGET_OMEGA`` in magnitude, either sign."""
    return rng.uniform(*TARGET_OMEGA, size) * rng.choice([-1.0, 1.0], size)


@dataclass(frozen=True)
class StepResult:
    """What :meth:`ReacherEnv.step` returns."""

    obs: dict[str, np.ndarray]
    done: bool
    success: bool


class ReacherEnv:
    """The reacher task; ``reset()`` draws the next episode from the env's seeded generator.

    ``moving_target``: the target circles the base (see the module docstring); ``omega`` is
    its current angular speed (rad/s), 0 for a fixed target. A moving episode draws its
    speed after the fixed draws, so its start and first target equal the fixed episode's.
    """

    control_hz = CONTROL_HZ
    max_steps = MAX_STEPS

    def __init__(self, seed: int | None = None, *, moving_target: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.moving_target = moving_target
        self.omega = 0.0
        self.q = np.zeros(2)
        self.dq = np.zeros(2)
        self.target = np.zeros(2)
        self.steps = 0
        self._success = False

    def reset(self, *, q: np.ndarray | None = None, target: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Start an episode (arm at rest) and return its first observation.

        ``q`` and ``target`` pin the start configuration or the target; the generator still
        draws both, so a pinned reset consumes the same randomness as a free one.
        """
        sampled_q, sampled_target = sample_episode(self.rng)
        self.q = np.array(sampled_q if q is None else q, dtype=np.float64)
        self.target = np.array(sampled_target if target is None else target, dtype=np.float64)
        self.omega = float(sample_omega(self.rng)) if self.moving_target else 0.0
        self.dq = np.zeros(2)
        self.steps = 0
        self._success = self.distance <= SUCCESS_RADIUS
        return self.observe()

    def step(self, action: np.ndarray) -> StepResult:
        """Apply one float32[7] action (dims 0-1 used) for 1 / control_hz seconds."""
        if self.done:
            raise RuntimeError("episode is done; call reset()")
        action = np.asarray(action, dtype=np.float64).reshape(ACTION_DIM)
        self.q, self.dq = step_arm(self.q, self.dq, action[:2])
        if self.moving_target:
            self.target, omega = move_target(self.target, self.omega, DT)
            self.omega = float(omega)
        self.steps += 1
        self._success = self._success or self.distance <= SUCCESS_RADIUS
        return StepResult(self.observe(), self.done, self._success)

    def observe(self) -> dict[str, np.ndarray]:
        """The current observation: state float32[6] and the camera image uint8[480, 640, 3]."""
        return {"state": make_state(self.q, self.dq), "image": render(self.q, self.target)}

    @property
    def ee(self) -> np.ndarray:
        return forward_kinematics(self.q)[1]

    @property
    def distance(self) -> float:
        """End effector to target centre, metres."""
        return float(np.linalg.norm(self.ee - self.target))

    @property
    def success(self) -> bool:
        """True once the end effector has been within SUCCESS_RADIUS of the target."""
        return self._success

    @property
    def done(self) -> bool:
        return self._success or self.steps >= self.max_steps


# -- running a policy --------------------------------------------------------------------


ChunkFn = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class EpisodeResult:
    success: bool
    steps: int
    chunks: int
    final_distance: float


def run_episode(
    env: ReacherEnv,
    chunk_fn: ChunkFn,
    *,
    execute: int | None = None,
    staleness: int = 0,
    align: bool = True,
    reset: bool = True,
    windows: dict[str, tuple[int, str]] | None = None,
) -> EpisodeResult:
    """Run one episode executing whole chunks open loop; ``chunk_fn(obs) -> float32[10, 7]``.

    Each chunk drives the arm for ``execute`` steps without looking at the scene. With
    ``staleness`` s, the chunk that starts at step t was computed from the observation of step
    t - s (the client asked for it s steps before the previous chunk ran out; the first chunk
    of an episode is computed from the first observation, while the arm waits). With ``align``
    the chunk is entered at the action meant for step t (index t - t_obs, the actions for
    steps already past are dropped); without it the chunk is played from its first action, s
    steps late. ``execute`` defaults to CHUNK - s when aligned, else CHUNK. ``windows`` (see
    :class:`ObservationWindow`) hands ``chunk_fn`` each seen observation with its history window.
    """
    if execute is None:
        execute = CHUNK - staleness if align else CHUNK
    if not 0 <= staleness < CHUNK or execute < 1 or (align and staleness + execute > CHUNK) or execute > CHUNK:
        raise ValueError(f"cannot execute {execute} actions of a {CHUNK}-chunk with staleness {staleness}")
    window = ObservationWindow(windows or {})
    first = env.reset() if reset else env.observe()
    history = {env.steps: window(first)}  # step -> its observation (windowed)
    chunks = 0
    while not env.done:
        t = env.steps
        seen = max(min(history), t - staleness)
        chunk = np.asarray(chunk_fn(history[seen]), dtype=np.float32).reshape(CHUNK, ACTION_DIM)
        for old in [k for k in history if k < t - staleness]:
            del history[old]
        chunks += 1
        start = t - seen if align else 0
        for action in chunk[start : start + execute]:
            obs = env.step(action).obs
            history[env.steps] = window(obs)
            if env.done:
                break
    return EpisodeResult(env.success, env.steps, chunks, env.distance)


def evaluate(
    chunk_fn: ChunkFn, seeds: Iterable[int], *, moving_target: bool = False, **options
) -> tuple[float, list[EpisodeResult]]:
    """Success rate and per-episode results of ``run_episode`` over one fresh env per seed."""
    results = [run_episode(ReacherEnv(seed, moving_target=moving_target), chunk_fn, **options) for seed in seeds]
    return sum(r.success for r in results) / max(len(results), 1), results
