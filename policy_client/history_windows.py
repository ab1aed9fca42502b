"""The history windows of a ``ChunkRunner``: for each input a model declares as a window of
its last T observations (``"history": {"steps": T, "pad": ...}`` in ``/model_info``), the
per-step values of the current episode, sent whole as ``[T, ...]`` (numpy only)."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from policy_client.errors import ObservationSpecError

__all__ = ["HISTORY_PADS", "HistoryWindows"]

HISTORY_PADS = ("repeat_first", "zeros")


class HistoryWindows:
    """The last T per-step values of each history input, newest last.

    Args:
        inputs: the model's input entries by name, as ``/model_info`` lists them; an entry
            with ``history`` (``steps`` T, ``pad`` one of :data:`HISTORY_PADS`, default
            ``repeat_first``) and shape ``[T, *step_shape]`` gets a window.

    Raises:
        ValueError: an unknown pad.
    """

    def __init__(self, inputs: Mapping[str, Mapping[str, Any]]) -> None:
        self._windows: dict[str, tuple[int, str, tuple[int, ...], deque]] = {}
        for name, entry in inputs.items():
            history = entry.get("history")
            if history:
                pad = history.get("pad", "repeat_first")
                if pad not in HISTORY_PADS:
                    raise ValueError(f"input {name!r}: unknown history pad {pad!r}")
                self._windows[name] = (int(history["steps"]), pad, tuple(entry["shape"][1:]), deque())

    def clear(self) -> None:
        """Forget every value: a new episode starts."""
        for _, _, _, window in self._windows.values():
            window.clear()

    def observe(self, obs: Mapping[str, Any]) -> None:
        """Append this step's value of each history input (copied: the caller may reuse its buffer).

        Raises:
            ObservationSpecError: a history input is missing or has the wrong per-step shape.
        """
        for name, (steps, _, shape, window) in self._windows.items():
            if name not in obs:
                raise ObservationSpecError(name, "missing; the model takes a window of it, pass each step's value")
            value = np.array(obs[name])  # a copy: the caller may reuse its buffer
            if value.shape != shape:
                raise ObservationSpecError(
                    name, f"shape {list(value.shape)}, expected one step {list(shape)} (the runner keeps the window)")
            window.append(value)
            if len(window) > steps:
                window.popleft()

    def fill(self, request: dict[str, Any]) -> None:
        """Set each history input of ``request`` to its window ``[T, *step_shape]``, the
        episode's start padded (its first value repeated, or zeros). Call after :meth:`observe`."""
        for name, (steps, pad, _, window) in self._windows.items():
            rows = list(window)
            filler = rows[0] if pad == "repeat_first" else np.zeros_like(rows[0])
            request[name] = np.stack([filler] * (steps - len(rows)) + rows)
