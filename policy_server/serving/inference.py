"""One inference, whatever the wire: the steps every wire shares between its decoder and encoder.

Each wire (``/infer`` with wire format v1, the Open Inference Protocol's ``/v2`` routes,
openpi's WebSocket messages) decodes its request into a :class:`Call` and encodes the
:class:`policy_server.serving.runtime.Answer` that :func:`infer_call` returns. Between the two, the same
steps run for all of them: the served model is looked up, encoded camera images are decoded
within their bounds, and the runtime validates, batches and computes (the response cache,
the queue and deadline, non-finite checks), and every wire encodes the same :class:`Answer`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from policy_server.config import ServerConfig
from policy_server.inputs.images import decoded_inputs
from policy_server.wsgi_keys import ByteBudget


@dataclass(frozen=True)
class Call:
    """One decoded inference request.

    ``model``: its name (None: the default model). ``inputs``: name -> array (or text, or
    encoded-image marker), ``[N, *shape]`` when ``rows`` is N (a vectorized request).
    ``deadline``: ``time.monotonic()`` by which its answer must be computed. ``outputs``:
    optional outputs asked for. ``budget``: the worker's byte budget, when behind the front
    door (images decode against it). ``version``: the version that must compute it (a pin,
    see :mod:`policy_server.inputs.episodes`; None: the stable one, or a canary's candidate for
    ``episode``, its episode id).
    """

    model: str | None
    inputs: Mapping[str, Any]
    deadline: float
    rows: int | None = None
    outputs: Sequence[str] = ()
    budget: ByteBudget | None = None
    version: str | None = None
    episode: str | None = None


@dataclass(frozen=True)
class Answer:
    """What :meth:`PolicyRuntime.infer` returns; ``batch_size`` is 0 for a cache hit."""

    outputs: dict[str, np.ndarray]
    version: str
    batch_size: int = 0
    queue_s: float = 0.0
    compute_s: float = 0.0
    cache: str | None = None  # "hit", "miss", or None when the cache is off
    rows: int | None = None  # N of a vectorized request, None for one observation
    images_s: float = 0.0  # decoding its encoded camera images (infer_call)


def answered_only(outputs: dict[str, np.ndarray], names: frozenset[str]) -> dict[str, np.ndarray]:
    """``outputs`` limited to ``names`` (the outputs a request gets)."""
    # A hot swap may have changed the outputs since ``names`` was worked out: keep what exists.
    return outputs if names.issuperset(outputs) else {k: v for k, v in outputs.items() if k in names}


def infer_call(runtime, config: ServerConfig, call: Call):
    """The answer to ``call`` from ``runtime`` (a :class:`policy_server.serving.runtime.PolicyRuntime`).

    Raises what the steps raise, each a :class:`policy_server.errors.ServingError`: NotReady
    or UnknownModel (the model), VersionNotServed (a pin to a version not served here; 503
    NotReady while it loads), InvalidInput / PayloadTooLarge / QueueFull (images and
    validation), QueueFull, DeadlineExceeded, InferenceFailed, NonFiniteOutput (serving).
    """
    target = runtime.resolve(call.model, call.version, call.episode)
    model = target.served.model
    start = time.perf_counter()
    with decoded_inputs(
        call.inputs, model.input_spec, model.encoded_inputs, call.rows,
        max_bytes=config.max_body_bytes, budget=call.budget, deadline=call.deadline,
    ) as inputs:
        images_s = time.perf_counter() - start if inputs is not call.inputs else 0.0
        answer = runtime.infer(inputs, call.deadline, call.model, call.outputs, call.rows, target)
    return dataclasses.replace(answer, images_s=images_s) if images_s else answer
