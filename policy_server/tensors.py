"""Request arrays against a policy's specs: validation, and random samples for warm-up and tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from policy_server.contract import TensorSpec
from policy_server.errors import InvalidInput


def validate_inputs(inputs: Mapping[str, Any], spec: Sequence[TensorSpec]) -> None:
    """Raise InvalidInput naming the field unless ``inputs`` matches ``spec`` exactly.

    Byte order is free (the copy into the batch converts it); kind, size and shape are not.
    """
    expected = {s.name: s for s in spec}
    missing = sorted(expected.keys() - inputs.keys())
    if missing:
        raise InvalidInput(f"missing input {missing[0]!r}; expected {sorted(expected)}")
    extra = sorted(inputs.keys() - expected.keys())
    if extra:
        raise InvalidInput(f"unexpected input {extra[0]!r}; expected {sorted(expected)}")
    for name, s in expected.items():
        value = inputs[name]
        if not isinstance(value, np.ndarray):
            raise InvalidInput(f"input {name!r}: expected an array, got {type(value).__name__}")
        if value.dtype.newbyteorder("=") != s.np_dtype:
            raise InvalidInput(f"input {name!r}: expected dtype {s.dtype}, got {value.dtype.name}")
        if value.shape != s.shape:
            raise InvalidInput(
                f"input {name!r}: expected shape {list(s.shape)}, got {list(value.shape)}"
            )


def sample_inputs(spec: Sequence[TensorSpec], batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching ``spec`` with a leading batch dimension (for warm-up and tests)."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in spec:
        shape = (batch, *s.shape)
        if s.np_dtype.kind in "iu":
            info = np.iinfo(s.np_dtype)
            out[s.name] = rng.integers(max(info.min, -128), min(info.max, 255), shape, dtype=s.np_dtype, endpoint=True)
        elif s.np_dtype.kind == "b":
            out[s.name] = rng.random(shape) < 0.5
        else:
            out[s.name] = rng.standard_normal(shape).astype(s.np_dtype)
    return out
