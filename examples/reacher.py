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
:func:`move_target`.
Only numpy is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

CHUNK, ACTION_DIM, STATE_DIM = 10, 7, 6
HEIGHT, WIDTH = 480, 640
CONTROL_HZ = 20
DT = 1.0 / CONTROL_HZ
MAX_STEPS = 100
LINK_LENGTHS = (0.1, 0.1)  # metres
MAX_JOINT_SPEED = 3.0  # rad/s, the clip on action dims 0-1
VELOCITY_LAG = 0.5  # fraction of the gap between command and joint velocity closed each step
TARGET_RADIUS = 0.02  # metres
SUCCESS_RADIUS = TARGET_RADIUS

# Camera: metres to pixels, base at BASE_PX (x right, y down in the image).
PIXELS_PER_METRE = 1400.0
BASE_PX = (320.0, 340.0)
LINK_HALF_WIDTH_PX = 8.0
JOINT_RADIUS_PX = 11.0

# Episode distribution.
TARGET_DISTANCE = (0.07, 0.19)  # from the base, metres
TARGET_ANGLE = (0.25, np.pi - 0.25)  # above the base
START_Q1 = (0.0, np.pi)
START_ABS_Q2 = (0.3, 2.6)  # the elbow starts bent either way
MIN_START_DISTANCE = 0.06  # from end effector to target

TARGET_OMEGA = (0.4, 0.9)  # rad/s about the base, for moving targets
EXPERT_LEAD_S = 0.0  # extra lead (s) on a moving target: aiming where it is at each action's step is best

# Expert: joint-space PD toward the inverse-kinematics solution with the elbow at q2 <= 0.
EXPERT_KP, EXPERT_KD = 10.0, 0.4

BACKGROUND_COLOUR = (206, 204, 198)
LINK_COLOUR = (52, 84, 190)
JOINT_COLOUR = (40, 40, 48)
EFFECTOR_COLOUR = (250, 200, 40)
TARGET_COLOUR = (220, 40, 40)


def forward_kinematics(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elbow and end-effector positions (metres, [..., 2]) for joint angles ``q`` [..., 2]."""
    q = np.asarray(q, dtype=np.float64)
    l1, l2 = LINK_LENGTHS
    a1, a12 = q[..., 0], q[..., 0] + q[..., 1]
    elbow = np.stack([l1 * np.cos(a1), l1 * np.sin(a1)], axis=-1)
    ee = elbow + np.stack([l2 * np.cos(a12), l2 * np.sin(a12)], axis=-1)
    return elbow, ee


def inverse_kinematics(target: np.ndarray) -> np.ndarray:
    """Joint angles [..., 2] that put the end effector on ``target`` [..., 2], elbow at q2 <= 0.

    One elbow convention for every target makes the solution a continuous function of the
    target (and the expert's goal a function of the target alone); targets are sampled above
    the base, so q1 stays within (0.25, 4.2) and is never wrapped.
    """
    target = np.asarray(target, dtype=np.float64)
    l1, l2 = LINK_LENGTHS
    r2 = np.sum(target**2, axis=-1)
    cos_q2 = np.clip((r2 - l1**2 - l2**2) / (2 * l1 * l2), -1.0, 1.0)
    q2 = -np.arccos(cos_q2)
    q1 = np.arctan2(target[..., 1], target[..., 0]) - np.arctan2(l2 * np.sin(q2), l1 + l2 * np.cos(q2))
    return np.stack([q1, q2], axis=-1)


def make_state(q: np.ndarray, dq: np.ndarray) -> np.ndarray:
    """The observation's state vector: [q1, q2, dq1, dq2, ee_x, ee_y] as float32."""
    _, ee = forward_kinematics(q)
    return np.concatenate([q, dq, ee]).astype(np.float32)


def step_arm(q: np.ndarray, dq: np.ndarray, command: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The arm's dynamics for one control step, on arrays [..., 2] (vectorised): clip the
    joint velocity command, lag the velocity toward it, integrate the angles."""
    command = np.clip(command, -MAX_JOINT_SPEED, MAX_JOINT_SPEED)
    dq = dq + VELOCITY_LAG * (command - dq)
    return q + DT * dq, dq


def move_target(target: np.ndarray, omega: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """A moving target ``dt`` seconds later (vectorised, [..., 2] and [...]): rotated about the
    base by ``omega * dt``, reflected back (and ``omega`` reversed) at the ends of ``TARGET_ANGLE``."""
    target = np.asarray(target, dtype=np.float64)
    omega = np.asarray(omega, dtype=np.float64)
    radius = np.linalg.norm(target, axis=-1)
    angle = np.arctan2(target[..., 1], target[..., 0]) + omega * dt
    low, high = TARGET_ANGLE
    over, under = angle > high, angle < low
    angle = np.where(over, 2 * high - angle, np.where(under, 2 * low - angle, angle))
    omega = np.where(over | under, -omega, omega)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1), omega


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


# -- rendering ---------------------------------------------------------------------------

_YS = np.arange(HEIGHT, dtype=np.float32)[:, None]
_XS = np.arange(WIDTH, dtype=np.float32)[None, :]


def _background() -> np.ndarray:
    """The fixed backdrop: a flat colour, faint deterministic noise and a 40-px grid."""
    noise = np.random.default_rng(1234).integers(-6, 7, size=(HEIGHT, WIDTH, 1))
    image = np.clip(np.array(BACKGROUND_COLOUR)[None, None, :] + noise, 0, 255).astype(np.uint8)
    image[::40, :, :] -= 14
    image[:, ::40, :] -= 14
    return image


BACKGROUND = _background()
BACKGROUND.setflags(write=False)


def to_pixels(point: np.ndarray) -> np.ndarray:
    """World metres [..., 2] to image pixel coordinates (column, row), as float."""
    point = np.asarray(point, dtype=np.float64)
    return np.stack(
        [BASE_PX[0] + PIXELS_PER_METRE * point[..., 0], BASE_PX[1] - PIXELS_PER_METRE * point[..., 1]], axis=-1
    )


def _box(x0: float, x1: float, y0: float, y1: float) -> tuple[int, int, int, int] | None:
    c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)) + 1, WIDTH)
    r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)) + 1, HEIGHT)
    return (c0, c1, r0, r1) if c0 < c1 and r0 < r1 else None


def _disc(image: np.ndarray, centre: np.ndarray, radius: float, colour: tuple[int, int, int]) -> None:
    cx, cy = float(centre[0]), float(centre[1])
    box = _box(cx - radius, cx + radius, cy - radius, cy + radius)
    if box is None:
        return
    c0, c1, r0, r1 = box
    mask = (_XS[:, c0:c1] - cx) ** 2 + (_YS[r0:r1] - cy) ** 2 <= radius * radius
    image[r0:r1, c0:c1][mask] = colour


def _segment(image: np.ndarray, a: np.ndarray, b: np.ndarray, half_width: float, colour: tuple[int, int, int]) -> None:
    ax, ay, bx, by = float(a[0]), float(a[1]), float(b[0]), float(b[1])
    box = _box(min(ax, bx) - half_width, max(ax, bx) + half_width, min(ay, by) - half_width, max(ay, by) + half_width)
    if box is None:
        return
    c0, c1, r0, r1 = box
    dx, dy = bx - ax, by - ay
    length2 = max(dx * dx + dy * dy, 1e-9)
    px, py = _XS[:, c0:c1] - ax, _YS[r0:r1] - ay
    t = np.clip((px * dx + py * dy) / length2, 0.0, 1.0)
    mask = (px - t * dx) ** 2 + (py - t * dy) ** 2 <= half_width * half_width
    image[r0:r1, c0:c1][mask] = colour


def render(q: np.ndarray, target: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The camera image uint8[480, 640, 3] of the arm at ``q`` and the target (metres).

    Copies the background into ``out`` (allocated when None) and draws the links, the joints,
    the end effector and, last and so never hidden, the target.
    """
    if out is None:
        out = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    np.copyto(out, BACKGROUND)
    elbow, ee = forward_kinematics(q)
    base, elbow, ee = to_pixels(np.zeros(2)), to_pixels(elbow), to_pixels(ee)
    _segment(out, base, elbow, LINK_HALF_WIDTH_PX, LINK_COLOUR)
    _segment(out, elbow, ee, LINK_HALF_WIDTH_PX, LINK_COLOUR)
    _disc(out, base, JOINT_RADIUS_PX + 3, JOINT_COLOUR)
    _disc(out, elbow, JOINT_RADIUS_PX, JOINT_COLOUR)
    _disc(out, ee, JOINT_RADIUS_PX - 3, EFFECTOR_COLOUR)
    _disc(out, to_pixels(target), TARGET_RADIUS * PIXELS_PER_METRE, TARGET_COLOUR)
    return out


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


class ObservationWindow:
    """Turns each step's observation into the one a history model takes.

    ``windows`` maps an observation key to ``(steps, pad)`` as a model declares it in
    ``/model_info`` (``{"history": {"steps": T, "pad": ...}}``): that key is sent as
    ``[T, *shape]``, row T-1 the newest, the episode's start padded with its first
    observation (``"repeat_first"``) or zeros (``"zeros"``). Other keys pass through.
    """

    def __init__(self, windows: dict[str, tuple[int, str]]) -> None:
        self.windows = dict(windows)
        self._frames: dict[str, list[np.ndarray]] = {}

    @classmethod
    def from_spec(cls, inputs: list[dict]) -> ObservationWindow:
        """From ``/model_info``'s ``inputs`` (entries without ``history`` pass through)."""
        return cls({e["name"]: (e["history"]["steps"], e["history"]["pad"]) for e in inputs if e.get("history")})

    def reset(self) -> None:
        """Forget the episode (the next observation starts a new window)."""
        self._frames = {}

    def __call__(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add this step's observation; return it with each windowed key as ``[T, ...]``."""
        out = dict(obs)
        for name, (steps, pad) in self.windows.items():
            frames = self._frames.setdefault(name, [])
            frames.append(obs[name])
            del frames[:-steps]
            missing = steps - len(frames)
            filler = frames[0] if pad == "repeat_first" else np.zeros_like(frames[0])
            out[name] = np.stack([filler] * missing + frames)
        return out

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
