"""The reacher's camera: renders the arm and the target into a uint8[480, 640, 3] image.

Rendering redraws only the bounding boxes of the arm and the target over a preallocated,
lightly textured background (about 1 ms per frame). Re-exported by ``examples/reacher.py``.
Only numpy is imported.
"""

from __future__ import annotations

import numpy as np

from examples.reacher_arm import HEIGHT, TARGET_RADIUS, WIDTH, forward_kinematics

# Camera: metres to pixels, base at BASE_PX (x right, y down in the image).
PIXELS_PER_METRE = 1400.0
BASE_PX = (320.0, 340.0)
LINK_HALF_WIDTH_PX = 8.0
JOINT_RADIUS_PX = 11.0

BACKGROUND_COLOUR = (206, 204, 198)
LINK_COLOUR = (52, 84, 190)
JOINT_COLOUR = (40, 40, 48)
EFFECTOR_COLOUR = (250, 200, 40)
TARGET_COLOUR = (220, 40, 40)
BLUE_TARGET_COLOUR = (30, 150, 250)  # the instructed reacher's second target (examples/reacher_instructed.py)

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
    draw_target(out, target, TARGET_COLOUR)
    return out


def draw_target(image: np.ndarray, target: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Draw a target disc (radius ``TARGET_RADIUS``) of ``colour`` at ``target`` (metres) into
    ``image`` uint8[480, 640, 3], in place; returns ``image``."""
    _disc(image, to_pixels(target), TARGET_RADIUS * PIXELS_PER_METRE, colour)
    return image
