"""JSON tensor data into arrays without holding a worker's GIL for long.

An Open Inference Protocol request may carry its tensors as JSON numbers. Two things about
that cost a worker more than its request: ``json.loads`` holds the GIL for its whole run,
and the cyclic garbage collector, run by whichever thread allocates next, walks every list
a parse made. :func:`big_json` is the one section per worker where a big header is parsed
and converted, and :func:`json_tensor` converts its data in bounded steps that let go of the
GIL. Sizes: about 60 ms of parsing per MB of JSON numbers on this project's 2-core box, so
keep JSON for small tensors and send images with the binary extension.
"""

from __future__ import annotations

import contextlib
import gc
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from policy_server.errors import BadRequest

JSON_STEP_ELEMENTS = 1 << 16  # JSON numbers converted per step (about 1-3 ms of numpy on 2 cores)
BIG_JSON_BYTES = 1 << 18  # JSON headers larger than this are decoded one at a time per worker ...
BIG_JSON_PAUSE_S = 0.005  # ... with this pause after each (the interpreter's GIL switch interval)
_BIG_PARSE = threading.Lock()
_ALLOWED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}  # JSON value kinds each datatype takes


@contextlib.contextmanager
def big_json() -> Iterator[None]:
    """The one section per worker where a big JSON header is parsed and its data converted.

    ``json.loads`` holds the GIL for its whole run, and the cyclic garbage collector, run by
    whichever thread allocates next, walks every list the parse made (measured on this
    project's 2-core box, a 3.6 MB image as JSON: 83 ms to parse without the collector, 166 to
    341 ms with it, gen-2 passes of up to 150 ms). So one big header at a time is decoded,
    with the collector paused (the parsed lists hold no cycles and are freed before the
    section ends), and then the GIL is let go for a moment while the next one still waits:
    the poller and the probe lane run between two sections, and wait for one at most.
    """
    with _BIG_PARSE:
        collecting = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if collecting:
                gc.enable()
            time.sleep(BIG_JSON_PAUSE_S)


def json_tensor(name: str, dtype: np.dtype, shape: tuple[int, ...], data: list) -> np.ndarray:
    """JSON ``data`` (flat, or nested as ``shape``; row-major) as ``dtype[shape]``, strictly typed.

    Converted in steps of at most :data:`JSON_STEP_ELEMENTS` numbers, each one short call
    into numpy that lets go of the GIL after it: the worker's probes and poller keep running
    while a big JSON tensor converts.
    """
    count = math.prod(shape)
    out = np.empty(count, dtype)
    flat = len(data) == count and not (count and isinstance(data[0], list))
    if flat:
        for start in range(0, count, JSON_STEP_ELEMENTS):
            _json_step(name, dtype, data[start : start + JSON_STEP_ELEMENTS], out[start : start + JSON_STEP_ELEMENTS])
    elif shape and len(data) == shape[0]:
        _json_nested(name, dtype, shape, data, out)
    else:
        raise BadRequest(
            f"input {name!r}: 'data' has {len(data)} elements, shape {list(shape)} needs {count} "
            f"(flat) or {shape[0] if shape else 1} rows (nested)"
        )
    return out.reshape(shape)


def _json_nested(name: str, dtype: np.dtype, shape: tuple[int, ...], data: Any, out: np.ndarray) -> None:
    """Fill ``out`` (flat, ``prod(shape)`` elements) from ``data`` nested as ``shape``."""
    if out.size <= JSON_STEP_ELEMENTS:
        _json_step(name, dtype, data, out, shape)
        return
    if not isinstance(data, list) or len(data) != shape[0]:
        raise BadRequest(f"input {name!r}: 'data' is not a rectangular array of numbers of shape {list(shape)}")
    row = out.size // shape[0]
    for i, item in enumerate(data):
        _json_nested(name, dtype, shape[1:], item, out[i * row : (i + 1) * row])


def _json_step(name: str, dtype: np.dtype, data: Any, out: np.ndarray, shape: tuple[int, ...] | None = None) -> None:
    """One bounded step: ``data`` (flat, or nested as ``shape``) checked and written into ``out``."""
    try:
        array = np.array(data)
    except (ValueError, TypeError, RecursionError):
        raise BadRequest(f"input {name!r}: 'data' is not a rectangular array of numbers") from None
    if array.shape != (shape if shape is not None else (out.size,)):
        raise BadRequest(f"input {name!r}: 'data' is not a rectangular array of numbers")
    if array.size and array.dtype.kind not in _ALLOWED_KINDS[dtype.kind]:
        raise BadRequest(f"input {name!r}: 'data' holds {array.dtype.name} values, not {dtype.name}")
    if array.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if int(array.min()) < info.min or int(array.max()) > info.max:
            raise BadRequest(f"input {name!r}: 'data' does not fit {dtype.name}")
    out[...] = array.reshape(-1)
    time.sleep(0)  # let go of the GIL between steps: a waiting probe or the poller runs now
