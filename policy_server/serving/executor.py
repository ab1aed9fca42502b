"""Runs batches on the model's device: one copy per input, staging reused.

A batch is a sequence of input dicts, one per row (``{name: array of the spec's per-sample
shape}``, a str for a text input), and its answer one output dict per row. Texts are not
staged: the forward gets each text input as one list of the batch's str. Each row's arrays (views into its request
body) are copied once, straight into a
preallocated staging buffer of ``max_batch_size`` rows per input. On CPU the forward reads
the staging buffer in place. On CUDA the staging buffers are pinned and double-buffered:
the host copy and the non-blocking host-to-device copy of batch k+1 (on a copy stream)
overlap the forward of batch k (on a compute stream that waits on the copy's event); an
event per slot is synchronized before the slot is refilled, ``record_stream`` tells the
caching allocator that the compute stream uses the copied tensors, and outputs come back
into pinned buffers whose event is synchronized before rows are split and answered.

The executor knows nothing of requests or versions: the served entry that owns it
(:class:`policy_server.serving.served.Served`) adapts it to the batcher and names the version.
The speed options that transform the module live in :mod:`policy_server.serving.served`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from policy_server.contract import TensorSpec, is_text
from policy_server.errors import ModelError
from policy_server.model.loader import LoadedModel

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class _Slot:
    """Staging for one batch: host input buffers (pinned on CUDA) and host output buffers."""

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], rows: int, pinned: bool) -> None:
        def alloc(spec: TensorSpec) -> torch.Tensor:
            return torch.empty((rows, *spec.shape), dtype=torch_dtype(spec.np_dtype), pin_memory=pinned)

        self.host_in = {s.name: alloc(s) for s in inputs if not is_text(s)}  # texts go to forward as lists
        self.host_in_np = {name: t.numpy() for name, t in self.host_in.items()}
        self.host_out = {s.name: alloc(s) for s in outputs} if pinned else {}

        def event() -> torch.cuda.Event | None:
            return torch.cuda.Event(enable_timing=True) if pinned else None

        self.h2d_started = event()
        self.copied = event()  # H2D from host_in done
        self.d2h_started = event()  # forward done, D2H starts
        self.computed = event()  # forward and D2H done


@dataclass
class _Launched:
    slot: _Slot
    rows: int
    outputs: dict[str, torch.Tensor] | None  # CPU: the forward's outputs


class BatchExecutor:
    """Executes batches for one loaded model (see the module docstring). ``autocast`` is
    ``"off"``, ``"bf16"`` or ``"fp16"`` (the forward runs under ``torch.autocast``).

    ``on_transfer(h2d_s, d2h_s)``, when set, is called on CUDA after each finished batch with
    the GPU-measured time of its host-to-device and device-to-host copies (metrics).
    """

    on_transfer: Callable[[float, float], None] | None = None

    def __init__(self, model: LoadedModel, max_batch_size: int, autocast: str = "off") -> None:
        self.policy = model.policy
        self.input_spec = model.input_spec
        self.output_spec = model.output_spec
        self.max_batch_size = max_batch_size
        self.device = torch.device(model.device)
        self.pipelined = self.device.type == "cuda"
        self.autocast = AUTOCAST_DTYPES.get(autocast)
        self.out_dtypes = {s.name: torch_dtype(s.np_dtype) for s in model.output_spec}
        if self.pipelined:
            torch.cuda.synchronize(self.device)  # weights were uploaded on the default stream
            self.copy_stream = torch.cuda.Stream(self.device)
            self.compute_stream = torch.cuda.Stream(self.device)
        n_slots = 2 if self.pipelined else 1
        self.slots = [
            _Slot(model.input_spec, model.output_spec, max_batch_size, self.pipelined) for _ in range(n_slots)
        ]
        self._next_slot = 0

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _stage(self, slot: _Slot, batch: Sequence[Mapping[str, Any]]) -> tuple[int, dict[str, list[str]]]:
        """Copy the batch's arrays into the slot's staging buffers; its texts as one list of
        ``rows`` str per text input (the spec's default where a row lacks one)."""
        rows = len(batch)
        if rows > self.max_batch_size:
            raise ValueError(f"batch of {rows} exceeds max_batch_size {self.max_batch_size}")
        texts = {}
        for spec in self.input_spec:
            if is_text(spec):
                texts[spec.name] = [row.get(spec.name, spec.default) for row in batch]
                continue
            out = slot.host_in_np[spec.name][:rows]
            if spec.optional and any(spec.name not in row for row in batch):
                # queued before a hot swap added this optional input: the server's default
                for i, row in enumerate(batch):
                    out[i] = row[spec.name] if spec.name in row else 0
                continue
            np.stack([row[spec.name] for row in batch], out=out)
        return rows, texts

    def launch(self, batch: Sequence[Mapping[str, np.ndarray]]) -> _Launched:
        """Start one batch: ``batch`` holds one input dict per row (at most ``max_batch_size``,
        ValueError otherwise). Returns the handle :meth:`finish` takes; on CPU the forward has
        run, on CUDA it is queued on the compute stream."""
        slot = self.slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self.slots)
        if not self.pipelined:
            rows, texts = self._stage(slot, batch)
            staged = {name: t[:rows] for name, t in slot.host_in.items()}
            with torch.inference_mode(), self._autocast():
                outputs = self.policy.forward({**staged, **texts})
            return _Launched(slot, rows, outputs)

        slot.copied.synchronize()  # the previous H2D from this slot must be done before refilling
        slot.computed.synchronize()  # and its outputs read
        rows, texts = self._stage(slot, batch)
        with torch.cuda.stream(self.copy_stream):
            slot.h2d_started.record(self.copy_stream)
            device_in = {name: t[:rows].to(self.device, non_blocking=True) for name, t in slot.host_in.items()}
            slot.copied.record(self.copy_stream)
        self.compute_stream.wait_event(slot.copied)
        with torch.cuda.stream(self.compute_stream):
            for tensor in device_in.values():
                tensor.record_stream(self.compute_stream)
            with torch.inference_mode(), self._autocast():
                outputs = self.policy.forward({**device_in, **texts})
            slot.d2h_started.record(self.compute_stream)
            for spec in self.output_spec:
                out = _output(outputs, spec, rows)
                slot.host_out[spec.name][:rows].copy_(out, non_blocking=True)
            slot.computed.record(self.compute_stream)
        return _Launched(slot, rows, None)

    def finish(self, launched: _Launched) -> list[dict[str, np.ndarray]]:
        """The launched batch's outputs, one dict per row in order (``{name: array of the
        output spec's per-sample shape and dtype}``); ModelError when the policy's outputs do
        not match its spec."""
        rows, slot = launched.rows, launched.slot
        if self.pipelined:
            slot.computed.synchronize()
            if self.on_transfer is not None:  # both copies are complete once computed is
                self.on_transfer(
                    slot.h2d_started.elapsed_time(slot.copied) / 1000.0,
                    slot.d2h_started.elapsed_time(slot.computed) / 1000.0,
                )
            arrays = {s.name: _checked(slot.host_out[s.name][:rows].numpy(), s, rows) for s in self.output_spec}
        else:
            arrays = {}
            for spec in self.output_spec:
                out = _output(launched.outputs, spec, rows).detach()
                if out.dtype != self.out_dtypes[spec.name]:
                    out = out.to(self.out_dtypes[spec.name])
                array = _checked(out.cpu().numpy(), spec, rows)
                if any(np.may_share_memory(array, staged) for staged in slot.host_in_np.values()):
                    array = array.copy()  # the next batch overwrites the staging buffer
                arrays[spec.name] = array
        if self.pipelined:  # rows of reused pinned buffers: copy out before the slot is refilled
            return [{name: a[i].copy() for name, a in arrays.items()} for i in range(rows)]
        return [{name: a[i] for name, a in arrays.items()} for i in range(rows)]


def _output(outputs: Any, spec: TensorSpec, rows: int) -> torch.Tensor:
    """The named output, its shape checked before any copy could broadcast it."""
    try:
        out = outputs[spec.name]
    except (KeyError, TypeError):
        raise ModelError(f"policy output lacks {spec.name!r}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (rows, *spec.shape):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"policy output {spec.name!r} is {got}, spec says {[rows, *spec.shape]}")
    return out


def _checked(array: np.ndarray, spec: TensorSpec, rows: int) -> np.ndarray:
    if array.shape != (rows, *spec.shape) or array.dtype != spec.np_dtype:
        raise ModelError(
            f"policy output {spec.name!r} is {array.dtype.name}{list(array.shape)}, "
            f"spec says {spec.dtype}{[rows, *spec.shape]}"
        )
    return array
