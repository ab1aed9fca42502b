"""The models inside one worker: loading, warm-up, hot swaps from the model store, and serving.

Torch is imported here only when :meth:`PolicyRuntime.start` runs, which gunicorn does in
``post_worker_init``: never in the master, so forked workers get clean CUDA and OpenMP.

Threads in a worker:

- the *batcher thread* loads and warms the models at start, then runs every forward;
- the *store watcher* polls the store's pointers; when one changes it loads and warms the
  new version on its own thread (requests keep being served by the old one), then swaps
  the reference the batcher looks up per batch. A batch is launched and finished by one
  executor, so no batch mixes versions and no request waits on a load;
- request threads validate, queue and wait (see :mod:`policy_server.batcher`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from policy_server import metrics
from policy_server.batcher import Batcher, Request
from policy_server.config import ServerConfig
from policy_server.errors import InvalidInput, ModelError, NotReady
from policy_server.model_files import Limits
from policy_server.model_loader import LoadedModel, describe, load_model_dir
from policy_server.response_cache import ResponseCache, input_digest
from policy_server.stats import RequestStats
from policy_server.serving_model import Served, prepare, resolve_device
from policy_server.store import ModelStore, Pointer, UnknownModel
from policy_server.tensors import complete_inputs, split_rows, validate_inputs
from policy_server.worker_status import WorkerStatusBoard

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 1.0


class PolicyRuntime:
    """Holds the worker's models and batcher, and answers inference calls.

    ``policy`` lets tests pass a ready object instead of loading from the store; the
    server then serves that one object and has no hot reload.
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
        self.board = WorkerStatusBoard(config.run_dir)
        self.stats = RequestStats()
        self.stats_board = WorkerStatusBoard(config.run_dir, "stats", prune_dead=False)
        self.cache = ResponseCache(config.cache_size, config.cache_ttl_s)
        self.device = "cpu"
        self._served: dict[str, Served] = {}  # replaced whole on every change, never mutated
        self._generations: dict[str, int] = {}  # store pointer generation last acted on, per model
        self._problems: dict[str, str] = {}  # model -> why its current version did not load here
        self._candidates: dict[str, Served] = {}  # validated here, by digest: reused when published
        self._failure: str | None = None
        self._settled = threading.Event()  # loaded or failed
        self._start_lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load or validation at a time per worker
        self._stopping = threading.Event()
        self.batcher = Batcher(
            max_batch_size=config.batch_size_for("cpu"),  # set for the device once it is known
            max_delay_s=config.max_batch_delay_ms / 1000.0,
            queue_size=config.queue_size,
            executor_for=self._executor_for,
            on_launch=self._batch_launched,
            on_finish=_batch_finished,
        )
        self._started = False
        self.instance_workers = 1

    # -- lifecycle ------------------------------------------------------------------

    def start(self, *, block: bool = False, worker_index: int = 0, workers: int = 1) -> None:
        """Start the batcher thread (once): load, warm up, serve. ``block`` waits until ready or failed.

        ``workers`` is how many workers this instance runs (an update waits for all of them).
        """
        self.instance_workers = workers
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
        self._stopping.set()
        self.batcher.stop(timeout_s)
        self.board.remove()
        self.stats_board.publish(self.stats.snapshot())  # the final numbers, for final_metrics.json

    @property
    def started(self) -> bool:
        return self._started

    @property
    def ready(self) -> bool:
        return self.default_name in self._served

    @property
    def failure(self) -> str | None:
        """Why loading the default model failed, or None."""
        return self._failure

    def _serve(self, worker_index: int) -> None:
        try:
            self._setup_torch(worker_index)
            if self.store is None:
                model = describe(
                    self._given_policy, name=self.default_name,
                    version=str(getattr(self._given_policy, "version", "0")), device=self.device,
                )
                self._install(self.default_name, self._prepare(model))
            else:
                self.store.seed(self.default_name, self.config.model_path)
                self.sync_with_store()
                if not self.ready:
                    raise ModelError(self._problems.get(self.default_name, "default model not in the store"))
        except Exception as exc:
            self._failure = f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed")
            self._settled.set()
            return
        log.info(
            "worker %d ready: serving %s on %s with %d torch threads", os.getpid(),
            ", ".join(f"{name} version {s.model.version}" for name, s in sorted(self._served.items())),
            self.device, self.config.torch_threads_per_worker(),
        )
        self._settled.set()
        threading.Thread(target=self._report, name="policy-stats", daemon=True).start()
        if self.store is not None:
            threading.Thread(target=self._watch, name="policy-store-watcher", daemon=True).start()
        self.batcher.run()

    def _setup_torch(self, worker_index: int) -> None:
        threads = self.config.torch_threads_per_worker()
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(threads)
        self.device = resolve_device(self.config.device, worker_index)
        self._bind_device()
        self.batcher.max_batch_size = self.config.batch_size_for(self.device)

    def _prepare(self, model: LoadedModel) -> Served:
        return prepare(model, self.config, self.batcher.max_batch_size)

    def _install(self, name: str, served: Served | None) -> None:
        """Swap (or remove) one model: the batcher picks it up at its next batch."""
        models = dict(self._served)
        if served is None:
            models.pop(name, None)
        else:
            models[name] = served
        self._served = models
        metrics.set_model_version(name, served.model.version if served else "0")
        self.cache.drop_model(name, keep_version=served.model.version if served else None)
        self._publish_status()

    def _publish_status(self) -> None:
        self.board.publish({
            "models": {
                name: {"version": s.model.version, "since": s.since}
                for name, s in self._served.items()
            },
            "problems": dict(self._problems),
            "generations": dict(self._generations),
        })

    # -- following the store ---------------------------------------------------------

    def _report(self) -> None:
        """Share this worker's request statistics with its siblings, every second."""
        while not self._stopping.wait(STATS_INTERVAL_S):
            try:
                self.stats_board.publish(self.stats.snapshot())
            except OSError:
                log.exception("writing request statistics failed")

    def _bind_device(self) -> None:
        """torch's current CUDA device is per thread: set it on every thread that loads."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.set_device(self.device)

    def _watch(self) -> None:
        self._bind_device()
        interval = self.config.store_poll_ms / 1000.0
        while not self._stopping.wait(interval):
            try:
                self.sync_with_store()
            except Exception:  # keep watching: the next poll may find the store readable again
                log.exception("checking the model store failed")

    def sync_with_store(self) -> None:
        """Act on every pointer that changed since the last call: load and swap, or unload."""
        names = self.store.names()
        for name in set(self._served) - set(names):
            self._install(name, None)
        for name in names:
            pointer = self.store.pointer(name)
            if pointer is None or pointer.generation == self._generations.get(name):
                continue
            self._follow(pointer)

    def _follow(self, pointer: Pointer) -> None:
        name = pointer.model
        current = self._served.get(name)
        self._generations[name] = pointer.generation  # acted on, whatever the outcome
        if not pointer.loaded:
            if name != self.default_name:
                self._install(name, None)
                return
        elif current is None or current.model.version != str(pointer.version):
            try:
                served = self._load_version(pointer)
            except Exception as exc:
                if self._superseded(pointer):
                    log.info("%s version %d was pruned by a later update before it loaded; following the "
                             "pointer at the next poll", name, pointer.version)
                    return
                metrics.RELOAD_FAILURES.labels(name).inc()
                self._problems[name] = f"version {pointer.version}: {type(exc).__name__}: {exc}"
                log.exception("loading %s version %d failed; still serving the previous one", name, pointer.version)
            else:
                self._problems.pop(name, None)
                if current is not None:
                    metrics.RELOADS.labels(name).inc()
                self._install(name, served)
                return
        self._publish_status()

    def _superseded(self, pointer: Pointer) -> bool:
        """Whether ``pointer``'s version vanished because a later publish pruned it (no failure:
        the watcher's next poll sees the newer pointer and follows that)."""
        if os.path.isdir(self.store.version_dir(pointer.model, pointer.version)):
            return False
        latest = self.store.pointer(pointer.model)
        return latest is not None and latest.generation > pointer.generation

    def _load_version(self, pointer: Pointer) -> Served:
        with self._load_lock:
            candidate = self._candidates.pop(pointer.digest, None)
            if candidate is not None and candidate.model.name == pointer.model:
                model = dataclasses.replace(candidate.model, version=str(pointer.version))
                candidate.executor.model = model
                return Served(model, candidate.executor, time.time())
            model = load_model_dir(
                self.store.version_dir(pointer.model, pointer.version), self.device,
                name=pointer.model, version=str(pointer.version),
            )
            return self._prepare(model)

    def validate_candidate(self, name: str, model_dir: str) -> tuple[LoadedModel, list[str]]:
        """Load and warm up a candidate version on this worker's device, off the batcher thread
        (the warm-up runs it on several distinct random observations).

        Raises ModelError (or whatever the model's code raises) when it does not load, its
        weights do not match strictly, or an output is not finite. Returns the model and
        warnings (an output identical for every observation). A valid one is kept, so this
        worker swaps to it without loading it again once it is published.
        """
        with self._load_lock:
            self._bind_device()
            model = load_model_dir(model_dir, self.device, name=name, version="candidate")
            served = self._prepare(model)  # the warm-up runs several distinct observations
            self._candidates = {model.digest: served}
            return model, list(served.warnings)

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
        return dict(self._problems)

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

    def _batch_launched(self, batch: list[Request]) -> None:
        metrics.QUEUE_DEPTH.set(self.batcher.depth)
        metrics.INFLIGHT_BATCHES.inc()
        for request in batch:
            metrics.QUEUE_SECONDS.observe(request.queue_s)

    def _executor_for(self, request: Request):
        """The batcher's per-batch lookup: the model's current executor."""
        served = self._served.get(request.model)
        if served is None:
            raise UnknownModel(f"model {request.model!r} was unloaded")
        spec = served.model.input_spec
        if request.spec is not spec and request.spec != spec:  # a new version changed its inputs
            try:
                validate_inputs(request.inputs, spec, allow_missing_optional=True)  # the executor fills them
            except InvalidInput as exc:
                raise InvalidInput(f"model {request.model!r} changed to version {served.model.version}: {exc.detail}")
        return served.executor

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


def _only(outputs: dict[str, np.ndarray], names: frozenset[str]) -> dict[str, np.ndarray]:
    # A hot swap may have changed the outputs since ``names`` was worked out: keep what exists.
    return outputs if names.issuperset(outputs) else {k: v for k, v in outputs.items() if k in names}


def _batch_finished(batch: list[Request]) -> None:
    metrics.INFLIGHT_BATCHES.dec()
    model = str(batch[0].model)
    metrics.BATCH_SIZE.labels(model).observe(len(batch))
    metrics.COMPUTE_SECONDS.labels(model).observe(max(r.compute_s for r in batch))


