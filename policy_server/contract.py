"""The model contract: what a directory under ``--model-path`` provides.

A model directory holds ``policy.py`` defining ``load_model(model_dir: str, device) -> policy``
and its weights (safetensors; never an arbitrary pickle). The policy it returns has:

- ``input_spec`` and ``output_spec``: sequences of :class:`TensorSpec` (name, numpy dtype
  name, per-sample shape without the batch dimension). An input may be *optional*
  (``optional=True``): a request may omit it and the server fills zeros before batching,
  so requests with and without it share a batch. An input may be a *history window*
  (``history=History(steps=T, pad=...)``): its shape is ``[T, *per_step_shape]``, row T-1
  the newest observation, and the client pads an episode's start as declared;
- ``forward(batch)``: a dict of tensors ``[B, *shape]`` on the policy's device to a dict of
  tensors ``[B, *shape]``, one per output spec;
- optionally ``name`` (default: the directory name), ``version`` (default: a digest of the
  directory's files), ``num_parameters()`` and ``optional_outputs``.

Real-time chunking (Black et al. 2025, "Real-Time Execution of Action Chunking Flow
Policies", arXiv 2506.07339): a policy that supports it declares the three optional inputs
named in :data:`RTC_INPUTS` (:func:`rtc_specs` builds them):

- ``action_prefix`` float32[H, DOF]: row i is the action the client will play at step s+i
  (s = the step of this request's observation) from its current plan, zeros past the end;
- ``prefix_length`` int32[1]: how many rows of ``action_prefix`` are real (0..H);
- ``inference_delay`` int32[1]: the delay d in steps the client expects (0..prefix_length).

It keeps its output rows [0, d) equal to the prefix and continues smoothly after it. A
request that omits them (zeros) asks for a plain chunk.

:class:`policy_server.torch_policy.ModulePolicy` implements it for any ``torch.nn.Module``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


HISTORY_PADS = ("repeat_first", "zeros")
RTC_INPUTS = ("action_prefix", "prefix_length", "inference_delay")


@dataclass(frozen=True)
class History:
    """An input that is a window of the last ``steps`` observations (row ``steps - 1`` the newest).

    ``pad`` says how a window is filled at an episode's start, before ``steps`` observations
    exist: ``"repeat_first"`` repeats the episode's first observation, ``"zeros"`` uses zeros.
    The server is stateless: the client keeps the window and sends it whole.
    """

    steps: int
    pad: str = "repeat_first"

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", int(self.steps))
        if self.steps < 1:
            raise ValueError(f"history steps must be >= 1, got {self.steps}")
        if self.pad not in HISTORY_PADS:
            raise ValueError(f"history pad must be one of {HISTORY_PADS}, got {self.pad!r}")

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "pad": self.pad}


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: numpy dtype name and per-sample shape.

    ``optional`` (inputs only): a request may omit it; the server fills zeros.
    ``history`` (inputs only): the input is a window of past observations, ``shape[0] ==
    history.steps`` (ValueError otherwise).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    optional: bool = False
    history: History | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "optional", bool(self.optional))
        if self.history is not None and (not self.shape or self.shape[0] != self.history.steps):
            raise ValueError(
                f"{self.name}: a history of {self.history.steps} steps needs shape [{self.history.steps}, ...], "
                f"got {list(self.shape)}"
            )

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def default(self, rows: int | None = None) -> np.ndarray:
        """The value the server fills for an omitted optional input: zeros (``[rows, *shape]`` if rows)."""
        return np.zeros(self.shape if rows is None else (rows, *self.shape), dtype=self.np_dtype)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.optional:
            out["optional"] = True
        if self.history is not None:
            out["history"] = self.history.to_json()
        return out


def rtc_specs(horizon: int, action_dim: int) -> tuple[TensorSpec, TensorSpec, TensorSpec]:
    """The three optional real-time chunking inputs for chunks float32[horizon, action_dim]."""
    return (
        TensorSpec(RTC_INPUTS[0], "float32", (horizon, action_dim), optional=True),
        TensorSpec(RTC_INPUTS[1], "int32", (1,), optional=True),
        TensorSpec(RTC_INPUTS[2], "int32", (1,), optional=True),
    )


@runtime_checkable
class Policy(Protocol):
    """What ``load_model`` returns. ``forward`` takes and returns batched tensors."""

    input_spec: Sequence[TensorSpec]
    output_spec: Sequence[TensorSpec]

    def forward(self, batch: Mapping[str, Any]) -> Mapping[str, Any]: ...
