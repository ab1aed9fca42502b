"""One inference, whatever the wire: the steps every wire shares between its decoder and encoder.

Each wire (``/infer`` with wire format v1, the Open Inference Protocol's ``/v2`` routes,
openpi's WebSocket messages) decodes its request into a :class:`Call` and encodes the
:class:`policy_server.runtime.Answer` that :func:`infer_call` returns. Between the two, the same
steps run for all of them: the served model is looked up, encoded camera images are decoded
within their bounds, and the runtime validates, batches and computes (the response cache,
the queue and deadline, non-finite checks).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from policy_server.config import ServerConfig
from policy_server.images import decoded_inputs
from policy_server.wsgi_keys import ByteBudget


@dataclass(frozen=True)
class Call:
    """One decoded inference request.

    ``model``: its name (None: the default model). ``inputs``: name -> array (or text, or
    encoded-image marker), ``[N, *shape]`` when ``rows`` is N (a vectorized request).
    ``deadline``: ``time.monotonic()`` by which its answer must be computed. ``outputs``:
    optional outputs asked for. ``budget``: the worker's byte budget, when behind the front
    door (images decode against it).
    """

    model: str | None
    inputs: Mapping[str, Any]
    deadline: float
    rows: int | None = None
    outputs: Sequence[str] = ()
    budget: ByteBudget | None = None


def infer_call(runtime, config: ServerConfig, call: Call):
    """The answer to ``call`` from ``runtime`` (a :class:`policy_server.runtime.PolicyRuntime`).

    Raises what the steps raise, each a :class:`policy_server.errors.ServingError`: NotReady
    or UnknownModel (the model), InvalidInput / PayloadTooLarge / QueueFull (images and
    validation), QueueFull, DeadlineExceeded, InferenceFailed, NonFiniteOutput (serving).
    """
    model = runtime.served(call.model).model
    start = time.perf_counter()
    with decoded_inputs(
        call.inputs, model.input_spec, model.encoded_inputs, call.rows,
        max_bytes=config.max_body_bytes, budget=call.budget,
    ) as inputs:
        images_s = time.perf_counter() - start if inputs is not call.inputs else 0.0
        answer = runtime.infer(inputs, call.deadline, call.model, call.outputs, call.rows)
    return dataclasses.replace(answer, images_s=images_s) if images_s else answer
