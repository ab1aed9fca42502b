"""The model contract: what a directory under ``--model-path`` provides.

A model directory holds ``policy.py`` (:data:`POLICY_FILE`) defining
``load_model(model_dir: str, device) -> policy`` and its weights (safetensors, conventionally
:data:`WEIGHTS_FILE`; never an arbitrary pickle). :func:`require_model_dir` is the one check
that a path is a model directory (its content digest is :func:`policy_server.model.files.digest`), and
:data:`MODEL_NAME_PATTERN` what a model may be called (:func:`check_model_name`). The policy
``load_model`` returns follows :class:`Policy`:

- ``input_spec`` and ``output_spec``: sequences of :class:`TensorSpec` (name, numpy dtype
  name, per-sample shape without the batch dimension). An input may be *optional*
  (``optional=True``): a request may omit it and the server fills zeros before batching,
  so requests with and without it share a batch. An input may be a *history window*
  (``history=History(steps=T, pad=...)``): its shape is ``[T, *per_step_shape]``, row T-1
  the newest observation, and the client pads an episode's start as declared;
- ``input_spec`` may also hold :class:`TextSpec` entries: a text input such as a task
  instruction (``prompt``), UTF-8 of at most ``max_bytes`` bytes; ``forward`` gets the
  batch's texts as a list of ``B`` Python ``str`` under its name, and tokenizes them itself;
- ``forward(batch)``: a dict of tensors ``[B, *shape]`` on the policy's device (and lists of
  ``B`` strings for text inputs) to a dict of tensors ``[B, *shape]``, one per output spec;
- optionally ``name`` (default: the directory name), ``version`` (default: a digest of the
  directory's files), ``num_parameters()``, ``optional_outputs``, ``encoded_inputs`` and
  ``openpi_metadata`` (keys openpi clients read from the server's first frame, e.g. ALOHA's
  ``reset_pose``; plain values msgpack can carry).

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

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from policy_server.errors import InvalidModelName, NotAModelDirectory

POLICY_FILE = "policy.py"
WEIGHTS_FILE = "model.safetensors"  # what a weights push replaces
# Model names are path components in the store and in URLs: letters, digits, ``_.-``, at most 64, no leading dot.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HISTORY_PADS = ("repeat_first", "zeros")
RTC_INPUTS = ("action_prefix", "prefix_length", "inference_delay")
MAX_TEXT_BYTES = 1 << 16  # the most a text input may declare (64 KiB)


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
    ``allow_nonfinite`` (float inputs only): the input may carry NaN or inf (e.g. NaN for a
    missing reading). Without it, a request whose float input is not finite everywhere is
    refused (422 naming the input). Outputs are always checked: a non-finite action is
    never served.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    optional: bool = False
    history: History | None = None
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "optional", bool(self.optional))
        object.__setattr__(self, "allow_nonfinite", bool(self.allow_nonfinite))
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
        if self.allow_nonfinite:
            out["allow_nonfinite"] = True
        return out

    @property
    def finite_only(self) -> bool:
        """True when values must be finite: a float (or complex) input without ``allow_nonfinite``."""
        return self.np_dtype.kind in "fc" and not self.allow_nonfinite


@dataclass(frozen=True)
class TextSpec:
    """One text input, e.g. the task instruction of a vision-language-action policy (openpi's
    ``prompt``): a UTF-8 string of at most ``max_bytes`` bytes (encoded), one per observation.

    ``forward`` receives the batch's texts as a list of ``B`` Python ``str`` under ``name``,
    beside the tensors; tokenization is the policy's own (local files only, no download).
    ``optional``: a request may omit it and the server fills ``default``. Texts never split
    batches: requests with different texts share one.
    """

    name: str
    max_bytes: int = 256
    optional: bool = False
    default: str = ""

    # Class attributes, not fields: what code written for TensorSpec reads of any input.
    dtype = "text"  # what /model_info shows as the input's dtype
    shape = ()  # one string per observation
    history = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_bytes", int(self.max_bytes))
        object.__setattr__(self, "optional", bool(self.optional))
        if not 1 <= self.max_bytes <= MAX_TEXT_BYTES:
            raise ValueError(f"{self.name}: max_bytes must be in 1..{MAX_TEXT_BYTES}, got {self.max_bytes}")
        if not isinstance(self.default, str) or len(self.default.encode("utf-8")) > self.max_bytes:
            raise ValueError(f"{self.name}: default must be a str of at most max_bytes ({self.max_bytes}) bytes")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": [], "max_bytes": self.max_bytes}
        if self.optional:
            out["optional"] = True
            out["default"] = self.default
        return out


def is_text(spec: Any) -> bool:
    """True for a :class:`TextSpec` (a text input), False for a :class:`TensorSpec`."""
    return isinstance(spec, TextSpec)


def rtc_specs(horizon: int, action_dim: int) -> tuple[TensorSpec, TensorSpec, TensorSpec]:
    """The three optional real-time chunking inputs for chunks float32[horizon, action_dim]."""
    return (
        TensorSpec(RTC_INPUTS[0], "float32", (horizon, action_dim), optional=True),
        TensorSpec(RTC_INPUTS[1], "int32", (1,), optional=True),
        TensorSpec(RTC_INPUTS[2], "int32", (1,), optional=True),
    )


class Policy(Protocol):
    """What ``load_model`` returns. ``forward`` takes and returns batched tensors.

    The members in :data:`POLICY_REQUIRED` must exist; the others are optional, with the
    defaults in :data:`POLICY_DEFAULTS` (``model.loader.describe`` checks both).
    """

    input_spec: Sequence[TensorSpec]
    output_spec: Sequence[TensorSpec]
    optional_outputs: Sequence[str]  # computed always, answered only when a request asks for them
    encoded_inputs: Sequence[str]  # uint8 image inputs a client may send JPEG/PNG encoded
    openpi_metadata: Mapping[str, Any]  # extra keys of openpi's first frame (e.g. ALOHA's reset_pose)
    name: str  # default: the directory name
    version: str  # default: the directory digest

    def forward(self, batch: Mapping[str, Any]) -> Mapping[str, Any]: ...

    def num_parameters(self) -> int: ...


POLICY_REQUIRED = ("input_spec", "output_spec", "forward")
# the value of each optional member a policy lacks (``num_parameters``: the count reported)
POLICY_DEFAULTS: Mapping[str, Any] = {
    "optional_outputs": (), "encoded_inputs": (), "num_parameters": 0, "openpi_metadata": {},
}


def check_model_name(name: Any) -> str:
    """``name`` when it matches :data:`MODEL_NAME_PATTERN`; InvalidModelName (400) otherwise."""
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name):
        raise InvalidModelName(f"model name must match {MODEL_NAME_PATTERN.pattern}")
    return name


def require_model_dir(path: str, shown: str | None = None) -> str:
    """``path`` when it is a model directory (holds :data:`POLICY_FILE`); NotAModelDirectory
    (an InvalidModel, 422, and a ModelError) naming it as ``shown`` (default: ``path``) otherwise."""
    if not os.path.isfile(os.path.join(path, POLICY_FILE)):
        raise NotAModelDirectory(f"{shown or path} is not a model directory (no {POLICY_FILE})")
    return path
