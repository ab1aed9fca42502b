"""The models inside one worker: start and stop, the device, the served models, serving.

Torch is imported here only when :meth:`PolicyRuntime.start` runs, which gunicorn does in
``post_worker_init``: never in the master, so forked workers get clean CUDA and OpenMP.

Threads in a worker:

- the *batcher thread* loads and warms the models at start, then runs every forward;
- the *store watcher* (:mod:`policy_server.store_follower`) follows the model store: it
  loads and warms a new version on its own thread (requests keep being served by the old
  one), then :meth:`PolicyRuntime.install` swaps the reference the batcher looks up per
  batch. A batch is launched and finished by one served entry, so no batch mixes versions
  and no request waits on a load;
- the *stats reporter* (:class:`policy_server.stats.StatsReporter`) shares this worker's
  request statistics with its siblings;
- request threads validate, queue and wait (see :mod:`policy_server.batcher`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from policy_server import metrics
from policy_server.batcher import Batcher, Request
from policy_server.config import ServerConfig
from policy_server.errors import InvalidInput, ModelError, NotReady, UnknownModel
from policy_server.model_files import Limits
from policy_server.model_loader import LoadedModel, describe, load_model_dir
from policy_server.response_cache import ResponseCache, input_digest
from policy_server.serving_model import Served, prepare, resolve_device
from policy_server.stats import RequestStats, StatsReporter
from policy_server.store import ModelStore
from policy_server.store_follower import StoreFollower
from policy_server.tensors import complete_inputs, split_rows, validate_inputs
from policy_server.worker_status import WorkerStatusBoard

log = logging.getLogger(__name__)


class PolicyRuntime:
    """Holds the worker's models and batcher, and answers inference calls.

    ``policy`` lets tests pass a ready object instead of loading from the store; the
    server then serves that one object and has no hot reload (``follower`` is None).
    """

    def __init__(self, config: ServerConfig, policy: Any = None) -> None:
        self.config = config
        self._given_policy = policy
        self.default_name = config.model_name
        self.store = (
            ModelStore(
                config.model_store, config.store_keep, model_root=config.model_root,
                limits=Limits(config.stage_max_files, config.stage_max_bytes),
            ) if policy is None and config.model_store else None
        )
        self.follower = StoreFollower(self.store, self, config.store_poll_ms / 1000.0) if self.store else None
        self.board = WorkerStatusBoard(config.run_dir)
        self.stats = RequestStats()
        self.reporter = StatsReporter(self.stats, config.run_dir)
        self.cache = ResponseCache(config.cache_size, config.cache_ttl_s)
        self.device = "cpu"
        self._torch_ready = False  # set up in this worker (_setup_torch)
        self._served: dict[str, Served] = {}  # replaced whole on every change, never mutated
        self._failure: str | None = None
        self._settled = threading.Event()  # loaded or failed
        self._start_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._serving = False  # the batcher loop started
        self.batcher = Batcher(
            max_batch_size=config.batch_size_for("cpu"),  # set for the device once it is known
            max_delay_s=config.max_batch_delay_ms / 1000.0,
            queue_size=config.queue_size,
            executor_for=self._executor_for,
            observer=metrics.BatchObserver(lambda: self.batcher.depth),
        )
        self.instance_workers = 1

    # -- start and stop -------------------------------------------------------------

    def start(self, *, block: bool = False, worker_index: int = 0, workers: int = 1) -> None:
        """Start the batcher thread (once): load, warm up, serve. ``block`` waits until ready or failed.

        ``workers`` is how many workers this instance runs (an update waits for all of them).
        """
        self.instance_workers = workers
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, args=(worker_index,), name="policy-batcher", daemon=True
                )
                self._thread.start()
        if block:
            self._settled.wait()

    def stop(self, timeout_s: float | None = None) -> None:
        """Refuse new requests and answer every accepted one (worker shutdown)."""
        self._stopping.set()
        self.batcher.stop(timeout_s)
        self.board.remove()
        self.reporter.stop()  # the final numbers, for final_metrics.json

    @property
    def booted(self) -> bool:
        """Whether :meth:`start` was called (its batcher thread exists)."""
        return self._thread is not None

    @property
    def ready(self) -> bool:
        return self.default_name in self._served

    @property
    def failure(self) -> str | None:
        """Why loading the default model failed, or None."""
        return self._failure

    @property
    def batcher_lost(self) -> bool:
        """True when the batcher thread ended while this worker should serve: nothing will
        answer what is queued (``/health`` is 503). A failed load is not this: ``/ready``
        reports it, and a worker that is stopping ends its batcher on purpose."""
        thread = self._thread
        return self._serving and thread is not None and not thread.is_alive() and not self._stopping.is_set()

    @property
    def stats_board(self) -> WorkerStatusBoard:
        """The sibling workers' request statistics (see :class:`StatsReporter`)."""
        return self.reporter.board

    def _serve(self, worker_index: int) -> None:
        try:
            self._setup_torch(worker_index)
            if self.follower is None:
                model = describe(
                    self._given_policy, name=self.default_name,
                    version=str(getattr(self._given_policy, "version", "0")), device=self.device,
                )
                self.install(self.default_name, self._prepare(model))
            else:
                self.store.seed(self.default_name, self.config.model_path)
                self.follower.sync()
                if not self.ready:
                    raise ModelError(self.follower.problems.get(self.default_name, "default model not in the store"))
        except Exception as exc:
            self._failure = f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed")
            if self.follower is None or not self._torch_ready:  # nothing would ever replace it
                self._settled.set()
                return
            # Keep following the store: a version that loads, published by any worker or
            # instance sharing it, makes this worker ready (held WebSocket clients included).
            log.warning("worker %d follows the store: a version of %s that loads will be served", os.getpid(),
                        self.default_name)
        else:
            self._log_ready()
        self._serving = True
        self._settled.set()
        self.reporter.start()
        if self.follower is not None:
            self.follower.start(self._stopping)
        try:
            self.batcher.run()
        finally:
            if not self._stopping.is_set():
                log.critical("the batcher thread ended while serving: /health answers 503")

    def _log_ready(self) -> None:
        log.info(
            "worker %d ready: serving %s on %s with %d torch threads", os.getpid(),
            ", ".join(f"{name} version {s.model.version}" for name, s in sorted(self._served.items())),
            self.device, self.config.torch_threads_per_worker(),
        )

    def _setup_torch(self, worker_index: int) -> None:
        threads = self.config.torch_threads_per_worker()
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(threads)
        self.device = resolve_device(self.config.device, worker_index)
        self.bind_device()
        self.batcher.max_batch_size = self.config.batch_size_for(self.device)
        self._torch_ready = True

    def bind_device(self) -> None:
        """torch's current CUDA device is per thread: set it on every thread that loads."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.set_device(self.device)

    def _prepare(self, model: LoadedModel) -> Served:
        return prepare(model, self.config, self.batcher.max_batch_size)

    def load(self, model_dir: str, name: str, version: str) -> Served:
        """Load a model directory on this worker's device and warm it up (not yet served).
        Raises ModelError, or whatever the model's code raises."""
        return self._prepare(load_model_dir(model_dir, self.device, name=name, version=version))

    # -- the served models ----------------------------------------------------------

    def install(self, name: str, served: Served | None) -> None:
        """Swap (or remove) one model: the batcher picks it up at its next batch."""
        models = dict(self._served)
        if served is None:
            models.pop(name, None)
        else:
            models[name] = served
        self._served = models
        if served is not None and name == self.default_name and self._failure is not None:
            self._failure = None  # a worker whose first load failed serves now
            self._log_ready()
        metrics.set_model_version(name, served.model.version if served else "0")
        self.cache.drop_model(name, keep_version=served.model.version if served else None)
        self.publish_status()

    def publish_status(self) -> None:
        """This worker's served versions, problems and acted-on generations, for its siblings."""
        follower = self.follower
        self.board.publish({
            "models": {
                name: {"version": s.model.version, "since": s.since}
                for name, s in self._served.items()
            },
            "problems": dict(follower.problems) if follower else {},
            "generations": dict(follower.generations) if follower else {},
        })

    # -- serving --------------------------------------------------------------------

    def served(self, name: str | None = None) -> Served:
        """A served model (default: the default one); NotReady or UnknownModel otherwise."""
        name = name or self.default_name
        served = self._served.get(name)
        if served is not None:
            return served
        if name == self.default_name:
            raise NotReady("model failed to load; see the server log" if self._failure else "model is loading")
        raise UnknownModel(f"model {name!r} is not loaded")

    @property
    def model(self) -> LoadedModel:
        """The default model; NotReady (503) while loading or after a failed load."""
        return self.served().model

    def served_models(self) -> dict[str, Served]:
        return dict(self._served)

    def problems(self) -> dict[str, str]:
        return dict(self.follower.problems) if self.follower else {}

    def submit(self, inputs: Mapping[str, Any], deadline: float, name: str | None = None) -> Request:
        """Validate and queue an observation (InvalidInput, QueueFull, NotReady); ``wait`` for its answer.

        Omitted optional inputs are filled with the model's defaults before queueing, so the
        request shares a batch with requests that send them.
        """
        name = name or self.default_name
        spec = self.served(name).model.input_spec
        return self._enqueue(complete_inputs(inputs, spec), None, deadline, name, spec)[0]

    def _enqueue(self, inputs: Mapping[str, Any], rows: int | None, deadline: float, name: str, spec) -> list[Request]:
        """Queue complete inputs: one request, or one per row of a vectorized request (all or none)."""
        if rows is None:
            requests = [self.batcher.submit(inputs, deadline, model=name, spec=spec)]
        else:
            requests = self.batcher.submit_rows(split_rows(inputs, rows), deadline, model=name, spec=spec)
        metrics.QUEUE_DEPTH.set(self.batcher.depth)
        return requests

    def wait(self, request: Request) -> tuple[dict[str, np.ndarray], str]:
        return self.batcher.wait(request)

    def _executor_for(self, request: Request) -> Served:
        """The batcher's per-batch lookup: the model's current served entry (its executor
        and version)."""
        served = self._served.get(request.model)
        if served is None:
            raise UnknownModel(f"model {request.model!r} was unloaded")
        spec = served.model.input_spec
        if request.spec is not spec and request.spec != spec:  # a new version changed its inputs
            try:
                validate_inputs(request.inputs, spec, allow_missing_optional=True)  # the executor fills them
            except InvalidInput as exc:
                raise InvalidInput(
                    f"model {request.model!r} changed to version {served.model.version}: {exc.detail}"
                ) from None
        return served

    def infer(
        self,
        inputs: Mapping[str, Any],
        deadline: float,
        name: str | None = None,
        outputs: Iterable[str] | None = None,
        rows: int | None = None,
    ) -> Answer:
        """One request's answer: from the cache when on and fresh, else queued, batched and
        computed. ``outputs`` asks for optional outputs (e.g. attention) besides the usual ones.

        ``rows`` N makes it a vectorized request: every input is ``[N, *shape]``, its rows are
        batched like N requests (split across batches as the cap needs) and every output is
        answered ``[N, *shape]`` in row order.
        """
        served = self.served(name)
        answered = served.model.answered_outputs(outputs)
        inputs = complete_inputs(inputs, served.model.input_spec, rows)
        key = input_digest(inputs) if self.cache.enabled else None
        if key is not None:
            hit = self.cache.get(served.model.name, served.model.version, key)
            if hit is not None:
                metrics.CACHE_HITS.inc()
                return Answer(_only(hit, answered), served.model.version, cache="hit", rows=rows)
            metrics.CACHE_MISSES.inc()
        requests = self._enqueue(inputs, rows, deadline, served.model.name, served.model.input_spec)
        per_row, version = self.batcher.wait_rows(requests)
        results = per_row[0] if rows is None else {k: np.stack([row[k] for row in per_row]) for k in per_row[0]}
        if key is not None:
            self.cache.put(served.model.name, version, key, results)
        return Answer(
            _only(results, answered), version, max(r.batch_size for r in requests),
            max(r.queue_s for r in requests), max(r.compute_s for r in requests),
            cache="miss" if key is not None else None, rows=rows,
        )


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
    images_s: float = 0.0  # decoding its encoded camera images (policy_server.inference)


def _only(outputs: dict[str, np.ndarray], names: frozenset[str]) -> dict[str, np.ndarray]:
    # A hot swap may have changed the outputs since ``names`` was worked out: keep what exists.
    return outputs if names.issuperset(outputs) else {k: v for k, v in outputs.items() if k in names}

