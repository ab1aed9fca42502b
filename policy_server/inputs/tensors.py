"""Request inputs against a policy's specs (arrays, and texts for :class:`TextSpec` inputs):
validation, defaults for optional inputs, vectorized requests, and random samples for warm-up
and tests."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from policy_server.contract import RTC_INPUTS, TensorSpec, TextSpec, is_text
from policy_server.errors import BadRequest, InvalidInput, PayloadTooLarge

BATCH_ROWS_HEADER = "X-Batch-Rows"
DIGITS = re.compile(r"[0-9]{1,18}")


def positive_header(raw: str | None, name: str) -> int | None:
    """A header that carries a positive integer: None when absent, else its value;
    BadRequest (400) naming ``name`` for anything else."""
    if raw is None:
        return None
    digits = raw.strip()
    # ASCII digits only: int() would also take "1_0", "+3" and other scripts' digits
    if not DIGITS.fullmatch(digits) or int(digits) < 1:
        raise BadRequest(f"{name} must be a positive integer, got {raw[:20]!r}")
    return int(digits)


def parse_batch_rows(raw: str | None, max_rows: int | None = None) -> int | None:
    """The ``X-Batch-Rows`` header: None when absent (one observation), else N >= 1 (BadRequest).

    PayloadTooLarge (413) for N over ``max_rows`` (the worker's queue size: more rows than it
    could ever hold), before anything of the body is decoded.
    """
    rows = positive_header(raw, BATCH_ROWS_HEADER)
    if rows is not None and max_rows is not None and rows > max_rows:
        raise PayloadTooLarge(f"{rows} rows exceed the queue size {max_rows}")
    return rows


def validate_inputs(
    inputs: Mapping[str, Any],
    spec: Sequence[TensorSpec],
    rows: int | None = None,
    *,
    allow_missing_optional: bool = False,
) -> None:
    """Raise InvalidInput naming the field unless ``inputs`` matches ``spec`` exactly.

    ``rows`` None: one observation, each input of its spec's shape. ``rows`` N: a vectorized
    request, each input ``[N, *shape]``. Byte order is free (the copy into the batch converts
    it); kind, size and shape are not. Optional inputs may be missing only with
    ``allow_missing_optional`` (:func:`complete_inputs` fills them first).
    """
    expected = {s.name: s for s in spec}
    missing = sorted(
        n for n in expected.keys() - inputs.keys() if not (allow_missing_optional and expected[n].optional)
    )
    if missing:
        raise InvalidInput(f"missing input {missing[0]!r}; expected {sorted(expected)}")
    extra = sorted(inputs.keys() - expected.keys())
    if extra:
        raise InvalidInput(f"unexpected input {extra[0]!r}; expected {sorted(expected)}")
    for name, s in expected.items():
        if name not in inputs:
            continue
        value = inputs[name]
        if is_text(s):
            check_text(name, value, s, rows)
            continue
        if not isinstance(value, np.ndarray):
            raise InvalidInput(f"input {name!r}: expected an array, got {type(value).__name__}")
        if value.dtype.newbyteorder("=") != s.np_dtype:
            raise InvalidInput(f"input {name!r}: expected dtype {s.dtype}, got {value.dtype.name}")
        if rows is None:
            if value.shape != s.shape:
                raise InvalidInput(f"input {name!r}: expected shape {list(s.shape)}, got {list(value.shape)}")
            continue
        if value.ndim != len(s.shape) + 1 or value.shape[0] != rows:
            raise InvalidInput(
                f"input {name!r}: a request of {BATCH_ROWS_HEADER} {rows} needs shape {[rows, *s.shape]}, "
                f"got {list(value.shape)}"
            )
        if value.shape[1:] != s.shape:
            raise InvalidInput(
                f"input {name!r}: expected shape {[rows, *s.shape]} (rows of {list(s.shape)}), got {list(value.shape)}"
            )
    for name, s in expected.items():
        if not is_text(s) and s.finite_only and name in inputs:
            check_finite(name, inputs[name], rows)


def check_text(name: str, value: Any, spec: TextSpec, rows: int | None) -> None:
    """InvalidInput naming the input (and row) unless ``value`` is a str (``rows`` N: a list of
    N str) of valid UTF-8 within the spec's ``max_bytes``."""
    if rows is None:
        texts = [value]
        if not isinstance(value, str):
            raise InvalidInput(f"input {name!r}: expected text (a string), got {type(value).__name__}")
    else:
        if not isinstance(value, (list, tuple)) or len(value) != rows:
            raise InvalidInput(f"input {name!r}: a request of {BATCH_ROWS_HEADER} {rows} needs a list of {rows} texts")
        texts = value
    for i, text in enumerate(texts):
        where = f"input {name!r}" + ("" if rows is None else f" row {i}")
        if not isinstance(text, str):
            raise InvalidInput(f"{where}: expected text (a string), got {type(text).__name__}")
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidInput(f"{where}: text is not valid UTF-8") from None
        if size > spec.max_bytes:
            raise InvalidInput(f"{where}: {size} bytes of text; the model takes at most {spec.max_bytes}")


def check_finite(name: str, value: np.ndarray, rows: int | None) -> None:
    """InvalidInput naming the input (and the first row) unless every value is finite."""
    if np.isfinite(value).all():
        return
    where = ""
    if rows is not None:
        where = f" row {int(np.flatnonzero(~np.isfinite(value).reshape(rows, -1).all(axis=1))[0])}"
    raise InvalidInput(
        f"input {name!r}{where}: holds NaN or inf; this model takes only finite values there "
        "(a model declares allow_nonfinite=True for an input that may carry them)"
    )


def complete_inputs(inputs: Mapping[str, Any], spec: Sequence[TensorSpec], rows: int | None = None) -> dict[str, Any]:
    """Validate ``inputs`` (see :func:`validate_inputs`), check each row's real-time chunking
    inputs, and return them with every omitted optional input filled with zeros.

    Raises InvalidInput naming the field, and the row (``row i``) for a per-row problem.
    """
    validate_inputs(inputs, spec, rows, allow_missing_optional=True)
    out = dict(inputs)
    for s in spec:
        if s.name not in out:
            if is_text(s):
                out[s.name] = s.default if rows is None else [s.default] * rows
            else:
                out[s.name] = s.default(rows)
    names = {s.name for s in spec}
    if all(n in names for n in RTC_INPUTS):
        check_rtc_rows(out, rows)
    return out


def check_rtc_rows(inputs: Mapping[str, np.ndarray], rows: int | None) -> None:
    """Per row: 0 <= prefix_length <= H, 0 <= inference_delay <= prefix_length, a finite prefix."""
    prefix, length, delay = (np.asarray(inputs[n]) for n in RTC_INPUTS)
    if rows is None:
        prefix, length, delay = prefix[None], length[None], delay[None]
    horizon = prefix.shape[1]
    for i in range(prefix.shape[0]):
        where = "" if rows is None else f"row {i}: "
        n, d = int(length[i, 0]), int(delay[i, 0])
        if not 0 <= n <= horizon:
            raise InvalidInput(f"{where}prefix_length {n} is outside 0..{horizon}")
        if not 0 <= d <= n:
            raise InvalidInput(f"{where}inference_delay {d} is outside 0..prefix_length ({n})")
        if not np.isfinite(prefix[i, :n]).all():
            raise InvalidInput(f"{where}action_prefix is not finite in its first {n} rows")


def split_rows(inputs: Mapping[str, Any], rows: int) -> list[dict[str, Any]]:
    """A vectorized request's inputs ``[N, ...]`` (and lists of N texts) as N single
    observations (views, no copy)."""
    return [{name: value[i] for name, value in inputs.items()} for i in range(rows)]


def sample_inputs(spec: Sequence[TensorSpec], batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching ``spec`` with a leading batch dimension (for warm-up and tests).

    Real-time chunking inputs get valid values (a random prefix, lengths and delays in range).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for s in spec:
        if is_text(s):  # a few short words, different per row and seed
            words = ("reach", "the", "red", "blue", "target", "go", "to", "pick", "place", "cube")
            out[s.name] = [" ".join(rng.choice(words, 4)) for _ in range(batch)]
            continue
        shape = (batch, *s.shape)
        if s.np_dtype.kind in "iu":
            info = np.iinfo(s.np_dtype)
            out[s.name] = rng.integers(max(info.min, -128), min(info.max, 255), shape, dtype=s.np_dtype, endpoint=True)
        elif s.np_dtype.kind == "b":
            out[s.name] = rng.random(shape) < 0.5
        else:
            out[s.name] = rng.standard_normal(shape).astype(s.np_dtype)
    by_name = {s.name: s for s in spec}
    if all(n in by_name for n in RTC_INPUTS):
        horizon = by_name[RTC_INPUTS[0]].shape[0]
        length = rng.integers(0, horizon, (batch, 1), endpoint=True).astype(np.int32)
        out[RTC_INPUTS[1]] = length
        out[RTC_INPUTS[2]] = (rng.random((batch, 1)) * (length + 1)).astype(np.int32).clip(0, length)
    return out
