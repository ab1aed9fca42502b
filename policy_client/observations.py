"""Observations against a model's input spec: the check before sending, and the stacking of
N observations into one vectorized request (numpy only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from policy_client.errors import ObservationSpecError

__all__ = ["check_observation", "stack_observations"]

TEXT = "text"  # the dtype /model_info gives a text input (a task instruction)


def check_observation(obs: Mapping[str, Any], spec: list[dict]) -> None:
    """Check ``obs`` against an input spec as ``/model_info`` gives it (name, dtype, shape).

    An input marked ``"optional": true`` may be missing (the server fills its default); one
    of dtype ``"text"`` takes a str of at most its ``max_bytes`` bytes.
    Raises ObservationSpecError naming the first missing, unexpected or mismatched field.
    """
    expected = {entry["name"]: entry for entry in spec}
    for name, entry in expected.items():
        if name not in obs and not entry.get("optional", False):
            raise ObservationSpecError(name, f"missing; the model expects {sorted(expected)}")
    for name, value in obs.items():
        entry = expected.get(name)
        if entry is None:
            raise ObservationSpecError(str(name), f"not an input of the model; it expects {sorted(expected)}")
        if entry["dtype"] == TEXT:
            check_text(name, value, entry)
            continue
        if not isinstance(value, np.ndarray):
            raise ObservationSpecError(name, f"is {type(value).__name__}, expected a numpy array")
        if value.dtype.name != entry["dtype"]:
            raise ObservationSpecError(name, f"dtype {value.dtype.name}, expected {entry['dtype']}")
        if list(value.shape) != list(entry["shape"]):
            raise ObservationSpecError(name, f"shape {list(value.shape)}, expected {list(entry['shape'])}")


def check_text(name: str, value: Any, entry: Mapping[str, Any]) -> None:
    """A text input (``"dtype": "text"``): a str of at most ``max_bytes`` bytes of UTF-8."""
    if not isinstance(value, str):
        raise ObservationSpecError(name, f"is {type(value).__name__}, expected text (a str)")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ObservationSpecError(name, "is not valid UTF-8 text") from None
    if size > entry.get("max_bytes", size):
        raise ObservationSpecError(name, f"is {size} bytes of text, the model takes at most {entry['max_bytes']}")


def stack_observations(observations: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """N observations with the same fields to one dict of ``[N, ...]`` arrays (a vectorized
    request); a text field becomes the list of its N texts.

    Raises ObservationSpecError naming the field and the row that differs from row 0.
    """
    if not observations:
        raise ValueError("no observations to stack")
    names = set(observations[0])
    for i, obs in enumerate(observations):
        if set(obs) != names:
            odd = sorted(names ^ set(obs))[0]
            raise ObservationSpecError(odd, f"row {i} {'lacks' if odd in names else 'adds'} it (compared with row 0)")
    out: dict[str, Any] = {}
    for name in observations[0]:
        if isinstance(observations[0][name], str):
            texts = [obs[name] for obs in observations]
            odd = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
            if odd is not None:
                raise ObservationSpecError(name, f"row {odd} is {type(texts[odd]).__name__}, row 0 is text")
            out[name] = texts
            continue
        first = np.asarray(observations[0][name])
        for i, obs in enumerate(observations):
            value = obs[name]
            if not isinstance(value, np.ndarray) or value.shape != first.shape or value.dtype != first.dtype:
                got = (f"{value.dtype.name}{list(value.shape)}" if isinstance(value, np.ndarray)
                       else type(value).__name__)
                raise ObservationSpecError(name, f"row {i} is {got}, row 0 is {first.dtype.name}{list(first.shape)}")
        out[name] = np.stack([obs[name] for obs in observations])
    return out
