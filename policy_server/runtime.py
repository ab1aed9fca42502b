"""The policy inside one worker: a batcher thread that loads, warms up, then serves batches.

Torch is imported here only when :meth:`PolicyRuntime.start` runs, which gunicorn does in
``post_worker_init``: never in the master, so forked workers get clean CUDA and OpenMP.
Loading, warm-up and every forward run on the one batcher thread, so nothing thread-local
that torch sets up on first use is paid by a request.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np

from policy_server.batcher import Batcher, Request
from policy_server.config import ServerConfig
from policy_server.errors import ConfigError, ModelError, NotReady
from policy_server.model_loader import LoadedModel, describe, load_model_dir
from policy_server.tensors import sample_inputs, validate_inputs

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


class PolicyRuntime:
    """Holds the worker's model and batcher, and answers inference calls.

    ``policy`` lets tests pass a ready object instead of loading ``config.model_path``.
    """

    def __init__(self, config: ServerConfig, policy: Any = None) -> None:
        self.config = config
        self._given_policy = policy
        self._model: LoadedModel | None = None
        self._failure: str | None = None
        self._settled = threading.Event()  # loaded or failed
        self._start_lock = threading.Lock()
        self.batcher = Batcher(
            max_batch_size=config.batch_size_for("cpu"),  # set for the device once it is known
            max_delay_s=config.max_batch_delay_ms / 1000.0,
            queue_size=config.queue_size,
        )
        self._started = False

    # -- lifecycle ------------------------------------------------------------------

    def start(self, *, block: bool = False, worker_index: int = 0) -> None:
        """Start the batcher thread (once): load, warm up, serve. ``block`` waits until ready or failed."""
        with self._start_lock:
            if not self._started:
                self._started = True
                threading.Thread(
                    target=self._serve, args=(worker_index,), name="policy-batcher", daemon=True
                ).start()
        if block:
            self._settled.wait()

    def stop(self, timeout_s: float | None = None) -> None:
        """Refuse new requests and answer every accepted one (worker shutdown)."""
        self.batcher.stop(timeout_s)

    @property
    def started(self) -> bool:
        return self._started

    @property
    def ready(self) -> bool:
        return self._model is not None

    @property
    def failure(self) -> str | None:
        """Why loading failed, or None."""
        return self._failure

    def _serve(self, worker_index: int) -> None:
        try:
            model = self._load(worker_index)
        except Exception as exc:
            self._failure = f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed")
            self._settled.set()
            return
        self._model = model
        self._settled.set()
        self.batcher.run()

    def _load(self, worker_index: int) -> LoadedModel:
        from policy_server.executor import BatchExecutor, SpeedOptions, apply_speed_options

        threads = self.config.torch_threads_per_worker()
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(threads)
        device = resolve_device(self.config.device, worker_index)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        if self._given_policy is not None:
            model = describe(self._given_policy, name="policy", version="0", device=device)
        else:
            model = load_model_dir(self.config.model_path, device)
        options = SpeedOptions(
            autocast=self.config.autocast,
            compile=self.config.compile,
            quantize_int8=self.config.quantize_int8,
            channels_last=self.config.channels_last,
        )
        apply_speed_options(model, options)
        max_batch = self.config.batch_size_for(device)
        executor = BatchExecutor(model, max_batch, options)
        start = time.perf_counter()
        warm_up(executor, model)
        self.batcher.max_batch_size = max_batch
        self.batcher.executor = executor
        log.info(
            "worker %d ready: %s version %s on %s, %d torch threads, max batch %d, warm-up %.2f s",
            os.getpid(), model.name, model.version, device, threads, max_batch, time.perf_counter() - start,
        )
        return model

    # -- serving --------------------------------------------------------------------

    @property
    def model(self) -> LoadedModel:
        """The loaded model; NotReady (503) while loading or after a failed load."""
        model = self._model
        if model is None:
            raise NotReady("model failed to load; see the server log" if self._failure else "model is loading")
        return model

    def validate(self, inputs: Mapping[str, Any]) -> None:
        validate_inputs(inputs, self.model.input_spec)

    def submit(self, inputs: Mapping[str, np.ndarray], deadline: float) -> Request:
        """Queue a validated observation (QueueFull, NotReady); ``wait`` for its answer."""
        self.model  # noqa: B018 - NotReady before anything is queued
        return self.batcher.submit(inputs, deadline)

    def wait(self, request: Request) -> tuple[dict[str, np.ndarray], str]:
        return self.batcher.wait(request)


def warm_up(executor, model: LoadedModel) -> None:
    """Run the executor at batch 1 (twice) and at full batch on random inputs from the spec;
    check the outputs are finite. Allocates staging and initialises kernels off the request path."""
    sizes = [1] * WARMUP_PASSES + ([executor.max_batch_size] if executor.max_batch_size > 1 else [])
    for seed, size in enumerate(sizes):
        sample = sample_inputs(model.input_spec, batch=size, seed=seed)
        requests = [SimpleNamespace(inputs={k: v[i] for k, v in sample.items()}) for i in range(size)]
        rows, _ = executor.finish(executor.launch(requests))
        for name, value in rows[0].items():
            if value.dtype.kind in "fc" and not np.isfinite(value).all():
                raise ModelError(f"warm-up output {name!r} is not finite")
