"""The training data of ``examples/train_policies.py``: arm states with the expert's labels,
drawn broadly or visited by lockstep rollouts (the noisy expert, DART; the policy, DAgger).

Every sample is an arm state (q, dq) and a target (plus, for a moving target, its angular
speed and the previous frame); images are rendered per batch. Re-exported by
``examples/train_policies.py``; logs as ``train_policies``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from examples import reacher

log = logging.getLogger("train_policies")

PADDED_FRACTION = 0.15  # broad states whose history window is padded (an episode's first step)


class Dataset:
    """Arm states, targets and expert labels; images are rendered per batch.

    A ``moving`` dataset also holds each target's angular speed and the previous frame's arm
    angles and target (equal to the current ones at an episode's first step, as the history
    window's ``repeat_first`` padding makes them)."""

    def __init__(self, moving: bool = False) -> None:
        keys = ["q", "dq", "target", "label"] + (["omega", "prev_q", "prev_target"] if moving else [])
        self.parts: dict[str, list[np.ndarray]] = {key: [] for key in keys}
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, q: np.ndarray, dq: np.ndarray, target: np.ndarray, omega=None, prev_q=None, prev_target=None) -> None:
        label = reacher.expert_actions(q, dq, target, omega=omega)
        values = [("q", q), ("dq", dq), ("target", target), ("label", label)]
        if omega is not None:
            values += [("omega", omega), ("prev_q", prev_q), ("prev_target", prev_target)]
        for key, value in values:
            self.parts[key].append(np.asarray(value, dtype=np.float32))
        self.arrays = {key: np.concatenate(parts) for key, parts in self.parts.items()}

    def __len__(self) -> int:
        return len(self.arrays.get("q", ()))


def broad_states(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """States spread over (and a little beyond) every configuration an episode can reach."""
    q = np.stack([rng.uniform(-0.8, 4.8, n), rng.uniform(-3.1, 3.1, n)], axis=1)
    moving = rng.random((n, 1)) < 0.7
    dq = moving * rng.uniform(-reacher.MAX_JOINT_SPEED, reacher.MAX_JOINT_SPEED, (n, 2))
    target = np.stack([reacher.sample_episode(rng)[1] for _ in range(n)])
    return q, dq, target


def moving_broad_states(rng: np.random.Generator, n: int):
    """``broad_states`` with a target speed each and the previous frame (some padded)."""
    q, dq, target = broad_states(rng, n)
    omega = reacher.sample_omega(rng, n)
    padded = (rng.random(n) < PADDED_FRACTION)[:, None]
    prev_q = np.where(padded, q, q - reacher.DT * dq)
    prev_target = np.where(padded, target, reacher.move_target(target, omega, -reacher.DT)[0])
    return q, dq, target, omega, prev_q, prev_target


def moving_rollouts(
    chunk_fn, rng: np.random.Generator, episodes: int, *, staleness: int, align: bool, noise: float = 0.0,
    max_steps: int = reacher.MAX_STEPS,
):
    """``rollouts`` on the moving-target task. ``chunk_fn(q, dq, target, omega, prev_q,
    prev_target) -> [N, 10, 7]`` gets the observed step's state and its previous frame's."""
    starts = [reacher.sample_episode(rng) for _ in range(episodes)]
    q = np.stack([s[0] for s in starts])
    target = np.stack([s[1] for s in starts])
    omega = reacher.sample_omega(rng, episodes)
    dq = np.zeros_like(q)
    frames = [(q, dq, target, omega)]
    done = np.zeros(episodes, dtype=bool)
    visited = []
    execute = reacher.CHUNK - staleness if align else reacher.CHUNK
    t = 0
    while t < max_steps and not done.all():
        seen = max(0, t - staleness)
        prev = frames[max(0, seen - 1)]
        chunk = chunk_fn(*frames[seen], prev[0], prev[2])[:, :, :2]
        offset = noise * rng.standard_normal((episodes, 2))
        start = t - seen if align else 0
        for k in range(start, start + execute):
            live = ~done
            prev = frames[max(0, t - 1)]
            visited.append((q[live], dq[live], target[live], omega[live], prev[0][live], prev[2][live]))
            command = chunk[:, k] + offset + noise * 0.5 * rng.standard_normal((episodes, 2))
            q, dq = reacher.step_arm(q, dq, command)
            target, omega = reacher.move_target(target, omega, reacher.DT)
            frames.append((q, dq, target, omega))
            t += 1
            distance = np.linalg.norm(reacher.forward_kinematics(q)[1] - target, axis=1)
            done |= distance <= reacher.SUCCESS_RADIUS
            if done.all() or t >= max_steps:
                break
    parts = [np.concatenate(p) for p in zip(*visited, strict=False)]
    return (*parts, float(done.mean()))


def moving_expert_fn(q, dq, target, omega, prev_q, prev_target):
    return reacher.expert_actions(q, dq, target, omega=omega)


def history_module_fn(module: torch.nn.Module, image_buffer: np.ndarray):
    """``module_fn`` for the two-frame history policy (``image_buffer`` [B, 2, H, W, 3])."""

    def chunk_fn(q, dq, target, omega, prev_q, prev_target):
        out = []
        with torch.inference_mode():
            for i in range(0, len(q), len(image_buffer)):
                part = slice(i, i + len(image_buffer))
                images = render_frames(q[part], target[part], prev_q[part], prev_target[part], image_buffer)
                state = torch.from_numpy(states_of(q[part], dq[part]))
                out.append(module(state, torch.from_numpy(images))["action"].numpy())
        return np.concatenate(out)

    return chunk_fn


def render_frames(q, target, prev_q, prev_target, out: np.ndarray) -> np.ndarray:
    """Two-frame windows [N, 2, H, W, 3]: the previous frame, then the current one."""
    for i in range(len(q)):
        reacher.render(prev_q[i], prev_target[i], out=out[i, 0])
        reacher.render(q[i], target[i], out=out[i, 1])
    return out[: len(q)]


def states_of(q: np.ndarray, dq: np.ndarray) -> np.ndarray:
    """Batched ``reacher.make_state``: [N, 2] x 2 -> float32 [N, 6]."""
    return np.concatenate([q, dq, reacher.forward_kinematics(q)[1]], axis=1).astype(np.float32)


def render_batch(q: np.ndarray, target: np.ndarray, out: np.ndarray) -> np.ndarray:
    for i in range(len(q)):
        reacher.render(q[i], target[i], out=out[i])
    return out[: len(q)]


def rollouts(
    chunk_fn,
    rng: np.random.Generator,
    episodes: int,
    *,
    staleness: int,
    align: bool,
    noise: float = 0.0,
    max_steps: int = reacher.MAX_STEPS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Run ``episodes`` episodes in lockstep, chunks open loop as ``reacher.run_episode`` does.

    ``chunk_fn(seen_q, seen_dq, target) -> [N, 10, 7]`` gets the (stale) observed arm
    states and the targets; a policy renders its images from them, the expert reads the
    target. ``noise`` (rad/s) perturbs each executed command: a constant offset per chunk
    plus fresh per-step noise. Returns every state visited before success (q, dq, target)
    and the success rate.
    """
    starts = [reacher.sample_episode(rng) for _ in range(episodes)]
    q = np.stack([s[0] for s in starts])
    target = np.stack([s[1] for s in starts])
    return lockstep(chunk_fn, rng, q, target, (target,), staleness=staleness, align=align, noise=noise,
                    max_steps=max_steps)


def lockstep(
    chunk_fn,
    rng: np.random.Generator,
    q: np.ndarray,
    target: np.ndarray,
    context: tuple[np.ndarray, ...],
    *,
    staleness: int,
    align: bool,
    noise: float,
    max_steps: int,
) -> tuple:
    """The lockstep loop of :func:`rollouts` from starts ``q`` [N, 2] (at rest), episode ``i``
    done once its end effector is within ``SUCCESS_RADIUS`` of ``target[i]``.

    ``context``: per-episode arrays ``[N, ...]`` (the target, and whatever else the task
    draws) handed to ``chunk_fn(seen_q, seen_dq, *context)`` and returned with each visited
    state. Returns (q, dq, *context) of every state visited before success, and the success rate.
    """
    episodes = len(q)
    dq = np.zeros_like(q)
    history = [(q, dq)]
    done = np.zeros(episodes, dtype=bool)
    visited: list[tuple[np.ndarray, ...]] = []
    execute = reacher.CHUNK - staleness if align else reacher.CHUNK
    t = 0
    while t < max_steps and not done.all():
        seen = max(0, t - staleness)
        chunk = chunk_fn(*history[seen], *context)[:, :, :2]
        offset = noise * rng.standard_normal((episodes, 2))
        start = t - seen if align else 0
        for k in range(start, start + execute):
            live = ~done
            visited.append((q[live], dq[live], *(c[live] for c in context)))
            command = chunk[:, k] + offset + noise * 0.5 * rng.standard_normal((episodes, 2))
            q, dq = reacher.step_arm(q, dq, command)
            history.append((q, dq))
            t += 1
            distance = np.linalg.norm(reacher.forward_kinematics(q)[1] - target, axis=1)
            done |= distance <= reacher.SUCCESS_RADIUS
            if done.all() or t >= max_steps:
                break
    parts = [np.concatenate(p) for p in zip(*visited, strict=False)]
    return (*parts, float(done.mean()))


def expert_fn(seen_q, seen_dq, target):
    return reacher.expert_actions(seen_q, seen_dq, target)


def module_fn(module: torch.nn.Module, image_buffer: np.ndarray):
    """A lockstep ``chunk_fn`` that renders the observed states and runs ``module`` in batches."""

    def chunk_fn(seen_q, seen_dq, target):
        out = []
        with torch.inference_mode():
            for i in range(0, len(seen_q), len(image_buffer)):
                part = slice(i, i + len(image_buffer))
                images = render_batch(seen_q[part], target[part], image_buffer)
                state = torch.from_numpy(states_of(seen_q[part], seen_dq[part]))
                out.append(module(state, torch.from_numpy(images))["action"].numpy())
        return np.concatenate(out)

    return chunk_fn


def collect(
    dataset: Dataset, chunk_fn, rng: np.random.Generator, episodes: int, noise: float, what: str, max_steps: int,
    rollouts_fn=None,
) -> None:
    """Lockstep rollouts over every staleness 0-3, aligned and not, added to ``dataset``;
    ``rollouts_fn`` (default: ``moving_rollouts`` for a moving dataset, else ``rollouts``) runs them."""
    rates = []
    groups = [(s, align) for s in range(4) for align in (True, False)]
    if rollouts_fn is None:
        rollouts_fn = moving_rollouts if "omega" in dataset.parts else rollouts
    for index, (staleness, align) in enumerate(groups):
        n = episodes // len(groups) + (index < episodes % len(groups))
        if n:
            *visited, rate = rollouts_fn(
                chunk_fn, rng, n, staleness=staleness, align=align, noise=noise, max_steps=max_steps)
            dataset.add(*visited)
            rates.append(rate)
    log.info("%s: %d episodes, success %.2f, dataset now %d states", what, episodes, np.mean(rates), len(dataset))


# -- the tasks train_policies.py trains on ----------------------------------------------------


@dataclass(frozen=True)
class Task:
    """What ``examples/train_policies.py``'s loop needs of one task.

    ``dataset()`` an empty data set; ``broad(rng, n)`` the broad states' arrays for
    ``Dataset.add``; ``expert`` the lockstep expert ``chunk_fn``; ``rollouts`` its lockstep
    rollouts (for :func:`collect`); ``policy(module, image_buffer)`` a lockstep ``chunk_fn``
    running the module; ``inputs(batch, image_buffer, rng)`` the module's keyword inputs for
    a batch of samples (a dict of the data set's arrays); ``frames`` the image buffer's
    extra axis (``(2,)`` for a two-frame window).
    """

    dataset: Callable[[], Dataset]
    broad: Callable
    expert: Callable
    rollouts: Callable
    policy: Callable
    inputs: Callable[[dict[str, np.ndarray], np.ndarray, np.random.Generator], dict[str, Any]]
    frames: tuple[int, ...] = ()


def _fixed_inputs(batch: dict[str, np.ndarray], images: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    return {"state": torch.from_numpy(states_of(batch["q"], batch["dq"])),
            "image": torch.from_numpy(render_batch(batch["q"], batch["target"], images))}


def _moving_inputs(batch: dict[str, np.ndarray], images: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    frames = render_frames(batch["q"], batch["target"], batch["prev_q"], batch["prev_target"], images)
    return {"state": torch.from_numpy(states_of(batch["q"], batch["dq"])), "image": torch.from_numpy(frames)}


FIXED_TASK = Task(Dataset, broad_states, expert_fn, rollouts, module_fn, _fixed_inputs)
MOVING_TASK = Task(lambda: Dataset(moving=True), moving_broad_states, moving_expert_fn, moving_rollouts,
                   history_module_fn, _moving_inputs, frames=(2,))
