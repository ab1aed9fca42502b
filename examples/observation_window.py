"""The observation window a history model takes: each step's observation with its last T frames.

Re-exported by ``examples/reacher.py``. Only numpy is imported.
"""

from __future__ import annotations

import numpy as np


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
