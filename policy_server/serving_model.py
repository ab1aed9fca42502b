"""Turn a loaded model into one ready to serve on a device: speed options, executor, warm-up.

Torch is imported inside the functions: this module is imported by the runtime, which the
gunicorn master must be able to import without torch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from policy_server import metrics
from policy_server.config import ServerConfig
from policy_server.errors import ConfigError, ModelError
from policy_server.model_loader import LoadedModel
from policy_server.tensors import sample_inputs

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
class Served:
    """One model as this worker serves it."""

    model: LoadedModel
    executor: Any  # BatchExecutor
    since: float  # wall-clock time it started serving
    warnings: tuple[str, ...] = ()  # from the warm-up: outputs identical for every observation


def prepare(model: LoadedModel, config: ServerConfig, max_batch_size: int) -> Served:
    """Apply the speed options, make an executor, warm it up (ModelError on non-finite outputs)."""
    from policy_server.executor import BatchExecutor, SpeedOptions, apply_speed_options

    options = SpeedOptions(
        autocast=config.autocast,
        compile=config.compile,
        quantize_int8=config.quantize_int8,
        channels_last=config.channels_last,
    )
    apply_speed_options(model, options)
    executor = BatchExecutor(model, max_batch_size, options)
    start = time.perf_counter()
    warnings = warm_up(executor, model)
    executor.on_transfer = metrics.transfer_observer(model.name)  # after warm-up: not counted
    log.info(
        "worker %d loaded %s version %s on %s, max batch %d, warm-up %.2f s",
        os.getpid(), model.name, model.version, model.device, executor.max_batch_size,
        time.perf_counter() - start,
    )
    return Served(model, executor, time.time(), tuple(warnings))


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
        requests = [SimpleNamespace(inputs={k: v[i] for k, v in sample.items()}) for i in range(size)]
        rows, _ = executor.finish(executor.launch(requests))
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
