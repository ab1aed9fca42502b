"""The reacher's arm and task geometry: constants, kinematics, dynamics and the target's motion.

Units: metres, radians, rad/s; arrays ``[..., 2]`` throughout (vectorised). The task itself
(``ReacherEnv``, the expert, episodes) is ``examples/reacher.py``, which re-exports all of this.
Only numpy is imported.
"""

from __future__ import annotations

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
