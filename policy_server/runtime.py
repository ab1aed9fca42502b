"""The policy inside one worker: load it off the request path, warm it up, run inference.

Torch is imported here only when :meth:`PolicyRuntime.start` runs, which gunicorn does in
``post_worker_init``: never in the master, so forked workers get clean CUDA and OpenMP.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from policy_server.config import ServerConfig
from policy_server.errors import ConfigError, InferenceFailed, ModelError, NotReady
from policy_server.model_loader import LoadedModel, describe, load_model_dir
from policy_server.tensors import sample_inputs, split_outputs, stack_inputs, validate_inputs

log = logging.getLogger(__name__)

WARMUP_PASSES = 2


def resolve_device(name: str) -> str:
    """``auto`` becomes ``cuda`` when torch sees a GPU, else ``cpu``; CUDA must exist if asked."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name} requested but torch sees no CUDA device")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {name} requested, {torch.cuda.device_count()} present")
    return name


class PolicyRuntime:
    """Holds the worker's loaded model and answers inference calls.

    ``policy`` lets tests pass a ready object instead of loading ``config.model_path``.
    """

    def __init__(self, config: ServerConfig, policy: Any = None) -> None:
        self.config = config
        self._given_policy = policy
        self._model: LoadedModel | None = None
        self._failure: str | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._forward_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------

    def start(self, *, block: bool = False) -> None:
        """Load and warm up the model in a background thread (once); ``block`` waits for it."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._load, name="policy-loader", daemon=True)
                self._thread.start()
        if block:
            self._thread.join()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def ready(self) -> bool:
        return self._model is not None

    @property
    def failure(self) -> str | None:
        """Why loading failed, or None."""
        return self._failure

    def _load(self) -> None:
        try:
            threads = self.config.torch_threads_per_worker()
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
            import torch

            torch.set_num_threads(threads)
            device = resolve_device(self.config.device)
            if self._given_policy is not None:
                model = describe(self._given_policy, name="policy", version="0", device=device)
            else:
                model = load_model_dir(self.config.model_path, device)
            self._warm_up(model)
            self._model = model
            log.info(
                "worker %d ready: %s version %s on %s, %d torch threads",
                os.getpid(), model.name, model.version, device, threads,
            )
        except Exception as exc:
            self._failure = f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed")

    def _warm_up(self, model: LoadedModel) -> None:
        for i in range(WARMUP_PASSES):
            sample = sample_inputs(model.input_spec, batch=1, seed=i)
            outputs = model.policy.forward(stack_inputs([_row(sample)], model.input_spec, model.device))
            rows = split_outputs(outputs, 1, model.output_spec)
            for name, value in rows[0].items():
                if value.dtype.kind in "fc" and not np.isfinite(value).all():
                    raise ModelError(f"warm-up output {name!r} is not finite")

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

    def infer(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
        """Run one validated observation; return its outputs and the model version used."""
        model = self.model
        try:
            batch = stack_inputs([inputs], model.input_spec, model.device)
            with self._forward_lock:
                outputs = model.policy.forward(batch)
            return split_outputs(outputs, 1, model.output_spec)[0], model.version
        except Exception as exc:
            log.exception("forward pass failed")
            raise InferenceFailed() from exc


def _row(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: value[0] for name, value in batch.items()}
