"""The model contract: what a directory under ``--model-path`` provides.

A model directory holds ``policy.py`` defining ``load_model(model_dir: str, device) -> policy``
and its weights (safetensors; never an arbitrary pickle). The policy it returns has:

- ``input_spec`` and ``output_spec``: sequences of :class:`TensorSpec` (name, numpy dtype
  name, per-sample shape without the batch dimension);
- ``forward(batch)``: a dict of tensors ``[B, *shape]`` on the policy's device to a dict of
  tensors ``[B, *shape]``, one per output spec;
- optionally ``name`` (default: the directory name), ``version`` (default: a digest of the
  directory's files) and ``num_parameters()``.

:class:`policy_server.torch_policy.ModulePolicy` implements it for any ``torch.nn.Module``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: numpy dtype name and per-sample shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@runtime_checkable
class Policy(Protocol):
    """What ``load_model`` returns. ``forward`` takes and returns batched tensors."""

    input_spec: Sequence[TensorSpec]
    output_spec: Sequence[TensorSpec]

    def forward(self, batch: Mapping[str, Any]) -> Mapping[str, Any]: ...
