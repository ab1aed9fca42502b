"""Turn a loaded model into one ready to serve on a device: speed options, executor, warm-up.

:class:`Served` is one model as a worker serves it: the loaded model (its version included)
and its executor, adapted to the batcher (:class:`policy_server.serving.batcher.Executor`).

Torch is imported inside the functions: this module is imported by the runtime, which the
gunicorn master must be able to import without torch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from policy_server.config import ServerConfig
from policy_server.errors import ConfigError, ModelError, NonFiniteOutput
from policy_server.inputs.tensors import sample_inputs
from policy_server.model.loader import LoadedModel
from policy_server.telemetry import metrics

log = logging.getLogger(__name__)

WARMUP_PASSES = 2


def resolve_device(name: str, worker_index: int = 0) -> str:
    """``auto`` picks CUDA when torch sees a GPU, else CPU; with several GPUs, worker i
    gets GPU i % n (``auto`` and ``cuda``). ``cuda:N`` must exist."""
    import torch

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name} requested but torch sees no CUDA device")
    count = torch.cuda.device_count()
    if name in ("auto", "cuda"):
        return f"cuda:{worker_index % count}"
    index = int(name.partition(":")[2])
    if index >= count:
        raise ConfigError(f"device {name} requested, {count} present")
    return name


@dataclass(frozen=True)
class SpeedOptions:
    """Optional speed-ups, each off by default (see docs/tuning.md)."""

    autocast: str = "off"  # off, bf16, fp16: applied by the executor around each forward
    compile: bool = False
    quantize_int8: bool = False  # dynamic int8 for Linear layers, CPU only
    channels_last: bool = False

    @classmethod
    def from_config(cls, config: ServerConfig) -> SpeedOptions:
        return cls(autocast=config.autocast, compile=config.compile,
                   quantize_int8=config.quantize_int8, channels_last=config.channels_last)


def apply_speed_options(model: LoadedModel, options: SpeedOptions) -> None:
    """Transform the policy's module in place; only policies with a ``module`` attribute
    (ModelError for ``quantize_int8`` off the CPU)."""
    import torch

    module = getattr(model.policy, "module", None)
    wanted = options.compile or options.quantize_int8 or options.channels_last
    if module is None:
        if wanted:
            log.warning("speed options need a policy with .module (ModulePolicy); ignored")
        return
    if options.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if options.quantize_int8:
        if model.device != "cpu":
            raise ModelError("quantize_int8 is a CPU option")
        module = torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)
    if options.compile:
        module = torch.compile(module, dynamic=True)
    model.policy.module = module


@dataclass(frozen=True)
class Served:
    """One model as this worker serves it: what the batcher runs a batch on.

    The version a batch was computed by is ``model.version``: a batch is launched and
    finished by one ``Served``, so its answer names the version that computed it.
    """

    model: LoadedModel
    executor: Any  # BatchExecutor
    since: float  # wall-clock time it started serving
    warnings: tuple[str, ...] = ()  # from the warm-up: outputs identical for every observation
    weight_bytes: int = 0  # its module's parameters and buffers, as served (after the speed options)

    @property
    def pipelined(self) -> bool:
        return self.executor.pipelined

    def launch(self, requests: Sequence[Any]) -> Any:
        """Start a batch of queued requests (each with ``.inputs``) on the executor."""
        return self.executor.launch([r.inputs for r in requests])

    def finish(self, handle: Any) -> tuple[list[dict[str, np.ndarray] | NonFiniteOutput], str]:
        """One output dict per request, and the version that computed them.

        A request whose outputs hold NaN or inf gets a :class:`NonFiniteOutput` in place of
        its dict (the batcher fails it; its batch mates are answered): a robot never receives
        a non-finite action. Each one is counted and logged with the model and version.
        """
        rows = self.executor.finish(handle)
        checked = self._finite_outputs
        for i, row in enumerate(rows):
            bad = [name for name in checked if not np.isfinite(row[name]).all()]
            if bad:
                rows[i] = self._refuse(bad)
        return rows, self.model.version

    @functools.cached_property
    def _finite_outputs(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.model.output_spec if s.np_dtype.kind in "fc")

    def _refuse(self, names: list[str]) -> NonFiniteOutput:
        model, version = self.model.name, self.model.version
        metrics.NONFINITE_OUTPUTS.labels(model, version).inc()
        log.warning("model %s version %s answered NaN or inf in %s; the answer was refused", model, version, names)
        return NonFiniteOutput(
            f"model {model!r} version {version} computed NaN or inf in {', '.join(map(repr, names))}; "
            "nothing was served"
        )

    def as_version(self, version: str) -> Served:
        """This validated candidate served as store version ``version``, from now."""
        return Served(dataclasses.replace(self.model, version=version), self.executor, time.time(), self.warnings,
                      self.weight_bytes)


def prepare(model: LoadedModel, config: ServerConfig, max_batch_size: int) -> Served:
    """Apply the speed options, make an executor, warm it up (ModelError on non-finite outputs)."""
    from policy_server.serving.executor import BatchExecutor

    options = SpeedOptions.from_config(config)
    apply_speed_options(model, options)
    executor = BatchExecutor(model, max_batch_size, options.autocast)
    start = time.perf_counter()
    warnings = warm_up(executor, model)
    executor.on_transfer = metrics.transfer_observer(model.name)  # after warm-up: not counted
    log.info(
        "worker %d loaded %s version %s on %s, max batch %d, warm-up %.2f s",
        os.getpid(), model.name, model.version, model.device, executor.max_batch_size,
        time.perf_counter() - start,
    )
    return Served(model, executor, time.time(), tuple(warnings), weight_bytes(model.policy))


def weight_bytes(policy: Any) -> int:
    """Bytes of a policy's ``module`` parameters and buffers (each tensor once); 0 without a module."""
    module = getattr(policy, "module", None)
    if module is None or not callable(getattr(module, "parameters", None)):
        return 0
    tensors = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        tensors.setdefault((tensor.device, tensor.data_ptr()), tensor.numel() * tensor.element_size())
    return sum(tensors.values())


def warm_up(executor, model: LoadedModel) -> list[str]:
    """Run the executor at batch 1 (twice) and at full batch on random inputs from the spec
    (at least 4 distinct observations in all); every float output of every row must be finite
    (ModelError otherwise). Allocates staging and initialises kernels off the request path.

    Returns one warning per output that was identical for every observation: a policy that
    ignores its input (legitimate at times, so reported with the update, not refused).
    """
    full = [executor.max_batch_size] if executor.max_batch_size > 1 else [1, 1]
    sizes = [1] * WARMUP_PASSES + full
    seen: list[dict[str, np.ndarray]] = []
    for seed, size in enumerate(sizes):
        sample = sample_inputs(model.input_spec, batch=size, seed=seed)
        rows = executor.finish(executor.launch([{k: v[i] for k, v in sample.items()} for i in range(size)]))
        for row in rows:
            for name, value in row.items():
                if value.dtype.kind in "fc" and not np.isfinite(value).all():
                    raise ModelError(f"warm-up output {name!r} is not finite")
            seen.append({name: np.array(value, copy=True) for name, value in row.items()})
    return [
        f"output {name!r} was identical for {len(seen)} distinct random observations: "
        "the policy may ignore its input"
        for name in seen[0]
        if all(np.array_equal(seen[0][name], other[name]) for other in seen[1:])
    ]
