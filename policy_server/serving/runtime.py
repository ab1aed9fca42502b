"""The models inside one worker: start and stop, the device, the served models, serving.

Torch is imported here only when :meth:`PolicyRuntime.start` runs, which gunicorn does in
``post_worker_init``: never in the master, so forked workers get clean CUDA and OpenMP.

Threads in a worker:

- the *batcher thread* loads and warms the models at start, then runs every forward;
- the *store watcher* (:mod:`policy_server.serving.store_follower`) follows the model store: it
  loads and warms a new version on its own thread (requests keep being served by the old
  one), then :meth:`PolicyRuntime.install` swaps the reference the batcher looks up per
  batch. A batch is launched and finished by one served entry, so no batch mixes versions
  and no request waits on a load;
- the *stats reporter* (:class:`policy_server.telemetry.stats.StatsReporter`) shares this worker's
  request statistics with its siblings;
- request threads validate, queue and wait (see :mod:`policy_server.serving.batcher`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from policy_server.config import ServerConfig
from policy_server.errors import InvalidInput, ModelError, NotReady, UnknownModel, VersionNotServed
from policy_server.inputs.tensors import complete_inputs, split_rows, validate_inputs
from policy_server.model.files import Limits
from policy_server.model.loader import LoadedModel, describe, load_model_dir
from policy_server.serving.batcher import Batcher, Request
from policy_server.serving.inference import Answer, answered_only
from policy_server.serving.model_versions import ModelVersions, Target
from policy_server.serving.response_cache import ResponseCache, input_digest
from policy_server.serving.served import Served, prepare, resolve_device
from policy_server.serving.store_follower import StoreFollower
from policy_server.store.model_store import ModelStore
from policy_server.telemetry import metrics
from policy_server.telemetry.stats import RequestStats, StatsReporter
from policy_server.telemetry.worker_status import WorkerStatusBoard

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
        self.board = WorkerStatusBoard(config.run_dir)  # what each worker of this instance serves
        self.follower = StoreFollower(
            self.store, self, self.board, config.store_poll_ms / 1000.0, config.retain_previous_s
        ) if self.store else None
        self.stats = RequestStats()
        self.reporter = StatsReporter(self.stats, config.run_dir)
        self.cache = ResponseCache(config.cache_size, config.cache_ttl_s)
        self.device = "cpu"
        self._torch_ready = False  # set up in this worker (_setup_torch)
        self._models: dict[str, ModelVersions] = {}  # replaced whole on every change, never mutated
        self._retained_use: dict[str, tuple[str, float]] = {}  # model -> retained version, its last pinned use
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

    # -- start and stop -------------------------------------------------------------

    def start(self, *, block: bool = False, worker_index: int = 0, workers: int = 1) -> None:
        """Start the batcher thread (once): load, warm up, serve. ``block`` waits until ready or failed.

        ``workers`` is how many workers this instance runs (an update waits for all of them).
        """
        self.board.expected = workers
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
        return self.default_name in self._models

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
                self.install(self.default_name, self._warm(model))
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
        self.reporter.start()  # its first snapshot before "ready": /stats counts every ready worker
        if self._failure is None:
            self._log_ready()
        self._serving = True
        self._settled.set()
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
            ", ".join(f"{name} version {v.stable.model.version}" for name, v in sorted(self._models.items())),
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

    def _warm(self, model: LoadedModel) -> Served:
        return prepare(model, self.config, self.batcher.max_batch_size)

    def warm_version(self, model_dir: str, name: str, version: str) -> Served:
        """Load a model directory on this worker's device and warm it up (not yet served).
        Raises ModelError, or whatever the model's code raises."""
        return self._warm(load_model_dir(model_dir, self.device, name=name, version=version))

    # -- the served models ----------------------------------------------------------

    def install(self, name: str, served: Served | None) -> None:
        """Swap (or remove) one model, as its only version: the batcher picks it up at its next batch."""
        self.install_versions(name, None if served is None else ModelVersions(served))

    def install_versions(self, name: str, versions: ModelVersions | None) -> None:
        """Swap (or remove) every version of one model at once: stable, candidate, retained."""
        models = dict(self._models)
        if versions is None:
            models.pop(name, None)
        else:
            models[name] = versions
        self._models = models
        if versions is not None and name == self.default_name and self._failure is not None:
            self._failure = None  # a worker whose first load failed serves now
            self._log_ready()
        metrics.set_model_version(name, versions.stable.model.version if versions else "0")
        metrics.HELD_BYTES.labels(name).set(versions.held_bytes if versions else 0)
        self.cache.drop_model(name, keep_versions=versions.versions if versions else ())
        self.board.update(models={  # for the siblings (an update's wait) and /models
            model: {"version": v.stable.model.version, "since": v.stable.since,
                   "candidate": v.candidate.model.version if v.candidate else None,
                   "retained": v.retained.model.version if v.retained else None, "held_bytes": v.held_bytes}
            for model, v in models.items()
        })

    def held(self, name: str) -> ModelVersions | None:
        """Every version of ``name`` this worker holds, or None."""
        return self._models.get(name)

    def retained_use(self, name: str, version: str) -> float:
        """Wall-clock time of the last request pinned to ``version`` of ``name`` as its retained
        version here (0: none)."""
        used = self._retained_use.get(name)
        return used[1] if used is not None and used[0] == version else 0.0

    # -- serving --------------------------------------------------------------------

    def served(self, name: str | None = None) -> Served:
        """A served model's stable version (default model: the default one); NotReady or UnknownModel otherwise."""
        return self._versions(name).stable

    def _versions(self, name: str | None) -> ModelVersions:
        name = name or self.default_name
        versions = self._models.get(name)
        if versions is not None:
            return versions
        if name == self.default_name:
            raise NotReady("model failed to load; see the server log" if self._failure else "model is loading")
        raise UnknownModel(f"model {name!r} is not loaded")

    def resolve(self, name: str | None = None, version: str | None = None, episode: str | None = None) -> Target:
        """What computes a request for model ``name``: the pinned ``version`` exactly, else the
        canary's candidate for ``episode``'s share, else the stable version. NotReady or
        UnknownModel for the model; VersionNotServed (409) for a version not served here,
        NotReady (503, retry) for one the store names that this worker is still loading."""
        versions = self._versions(name)
        name = versions.stable.model.name
        if version is None:
            return versions.assign(name, episode)
        served = versions.get(version)
        if served is None:
            if self.follower is not None and self.follower.expects(name, version):
                raise NotReady(f"model {name!r} version {version} is loading on this worker; retry",
                               headers={"Retry-After": "1"})
            raise VersionNotServed(
                f"model {name!r} does not serve version {version} (it serves {', '.join(versions.versions)}): "
                "the version was retired, or never existed; nothing was computed",
                fields={"model": name, "version": version, "served_versions": versions.versions},
            )
        if served is versions.retained:
            self._retained_use[name] = (version, time.time())
        return Target(served, version)

    @property
    def model(self) -> LoadedModel:
        """The default model; NotReady (503) while loading or after a failed load."""
        return self.served().model

    def served_models(self) -> dict[str, Served]:
        """Each served model's stable version."""
        return {name: versions.stable for name, versions in self._models.items()}

    def submit(self, inputs: Mapping[str, Any], deadline: float, name: str | None = None) -> Request:
        """Validate and queue an observation (InvalidInput, QueueFull, NotReady); ``wait`` for its answer.

        Omitted optional inputs are filled with the model's defaults before queueing, so the
        request shares a batch with requests that send them.
        """
        name = name or self.default_name
        spec = self.served(name).model.input_spec
        return self._enqueue(complete_inputs(inputs, spec), None, deadline, name, spec)[0]

    def _enqueue(self, inputs: Mapping[str, Any], rows: int | None, deadline: float, name: str, spec,
                 pinned: str | None = None) -> list[Request]:
        """Queue complete inputs: one request, or one per row of a vectorized request (all or none)."""
        if rows is None:
            requests = [self.batcher.submit(inputs, deadline, model=name, spec=spec, pinned=pinned)]
        else:
            requests = self.batcher.submit_rows(split_rows(inputs, rows), deadline, model=name, spec=spec,
                                                pinned=pinned)
        metrics.QUEUE_DEPTH.set(self.batcher.depth)
        return requests

    def wait(self, request: Request) -> tuple[dict[str, np.ndarray], str]:
        return self.batcher.wait(request)

    def _executor_for(self, request: Request) -> Served:
        """The batcher's per-batch lookup: the model's served entry (its executor and version):
        the stable one, or the version the request is pinned to."""
        versions = self._models.get(request.model)
        if versions is None:
            raise UnknownModel(f"model {request.model!r} was unloaded")
        served = versions.stable if request.pinned is None else versions.get(request.pinned)
        if served is None:
            raise VersionNotServed(f"model {request.model!r} version {request.pinned} was retired while the "
                                   "request was queued; nothing was computed",
                                   fields={"model": request.model, "version": request.pinned,
                                           "served_versions": versions.versions})
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
        target: Target | None = None,
    ) -> Answer:
        """One request's answer: from the cache when on and fresh, else queued, batched and
        computed. ``outputs`` asks for optional outputs (e.g. attention) besides the usual ones.

        ``rows`` N makes it a vectorized request: every input is ``[N, *shape]``, its rows are
        batched like N requests (split across batches as the cap needs) and every output is
        answered ``[N, *shape]`` in row order. ``target`` is what :meth:`resolve` answered
        (default: the stable version); a pinned request that a swap left on another version
        while it was queued is NotReady (503, retry at once).
        """
        served, pin = target or self.resolve(name)
        answered = served.model.answered_outputs(outputs)
        inputs = complete_inputs(inputs, served.model.input_spec, rows)
        key = input_digest(inputs) if self.cache.enabled else None
        if key is not None:
            hit = self.cache.get(served.model.name, served.model.version, key)
            if hit is not None:
                metrics.CACHE_HITS.inc()
                return Answer(answered_only(hit, answered), served.model.version, cache="hit", rows=rows)
            metrics.CACHE_MISSES.inc()
        versions = self._models.get(served.model.name)
        lane = None if versions is not None and served is versions.stable else pin  # share the stable's batches
        requests = self._enqueue(inputs, rows, deadline, served.model.name, served.model.input_spec, lane)
        per_row, version = self.batcher.wait_rows(requests)
        if pin is not None and version != pin:
            raise NotReady(f"model {served.model.name!r} changed from version {pin} to {version} while this "
                           "request was queued; retry", headers={"Retry-After": "0"})
        results = per_row[0] if rows is None else {k: np.stack([row[k] for row in per_row]) for k in per_row[0]}
        if key is not None:
            self.cache.put(served.model.name, version, key, results)
        return Answer(
            answered_only(results, answered), version, max(r.batch_size for r in requests),
            max(r.queue_s for r in requests), max(r.compute_s for r in requests),
            cache="miss" if key is not None else None, rows=rows,
        )
