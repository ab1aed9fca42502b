"""Dynamic batching in one worker: request threads enqueue, one batcher thread runs batches.

Semantics (rationale and measurements: docs/batching.md):

- A lone request never waits for company: with ``max_delay_s == 0`` the batcher takes
  everything already queued (up to ``max_batch_size``) and runs at once, so batches form
  from what arrived while the previous batch ran. With ``max_delay_s > 0`` it waits up to
  that long, counted from the first request's arrival, to fill a batch.
- Only compatible requests (same keys, dtypes and per-sample shapes) share a batch; the
  others keep their place in the queue.
- Bounded queue: full -> :class:`QueueFull` (503 with Retry-After) at once.
- A vectorized request (N observations, ``X-Batch-Rows: N``) enters as N row requests at
  once (:meth:`Batcher.submit_rows`, all or none): each row takes one place in the queue and
  one in a batch, so N rows count N toward ``max_batch_size`` and a request of more rows
  than that (or sharing batches with others) is split across batches; :meth:`Batcher.wait_rows`
  answers the rows in order.
- Each request has a deadline; one that passed before compute is answered
  :class:`DeadlineExceeded` (504) and is not computed, and one whose batch finished after
  it is answered 504 too (the late outputs are dropped): never a late answer.
- A batch whose execution raises fails only its own requests (500); the batcher lives on.
- :meth:`Batcher.stop` refuses new work, answers everything already accepted, then ends.

The device work is the ``executor``'s: ``launch(requests)`` starts a batch and returns a
handle, ``finish(handle)`` returns one output dict per request plus the model version (a
:class:`ServingError` in place of a dict fails that request alone). In
the server that is a :class:`policy_server.serving.served.Served` entry: it hands the
requests' input dicts to its :class:`policy_server.serving.executor.BatchExecutor` and names its
model's version.
With ``executor_for``, the executor is looked up per batch (by its first request's
``model`` and ``pinned`` version): a hot reload replaces it between two batches, and a batch
is launched and finished by one executor, so it never mixes model versions.
An ``observer`` (metrics: :class:`policy_server.telemetry.metrics.BatchObserver`) sees each batch as
it launches and once it is answered; an observer that raises is logged and never stops the
batcher thread.
An executor with ``pipelined = True`` (CUDA) gets the next batch launched before the
previous one is finished, so its host-to-device copy overlaps the running forward.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from policy_server.errors import (
    DeadlineExceeded,
    InferenceFailed,
    NotReady,
    PayloadTooLarge,
    QueueFull,
    ServingError,
)

log = logging.getLogger(__name__)

# How long a request thread waits past its deadline for a batch that already started.
RESULT_GRACE_S = 30.0


class Executor(Protocol):
    pipelined: bool

    def launch(self, requests: list[Request]) -> Any: ...

    def finish(self, handle: Any) -> tuple[list[dict[str, np.ndarray]], str]: ...


class Observer(Protocol):
    def launched(self, batch: list[Request]) -> None: ...

    def finished(self, batch: list[Request]) -> None: ...


def compatibility_key(inputs: Mapping[str, Any], model: Any = None, pinned: str | None = None) -> tuple:
    """Requests with equal keys can be stacked into one batch (byte order is converted). A text
    input counts by its name only: requests with different texts share a batch. Requests for
    different models, or pinned to different versions, never share one."""
    return (model, pinned, *sorted(
        (name, a.dtype.newbyteorder("=").str, a.shape) if isinstance(a, np.ndarray) else (name, "text", ())
        for name, a in inputs.items()
    ))


class Request:
    """One queued observation and, once answered, its outputs or error and timings."""

    __slots__ = (
        "inputs", "model", "pinned", "spec", "key", "deadline", "enqueued", "launched", "finished", "batch_size",
        "outputs", "version", "error", "cancelled", "_done",
    )

    def __init__(
        self, inputs: Mapping[str, np.ndarray], deadline: float, now: float, model: Any = None, spec: Any = None,
        pinned: str | None = None,
    ) -> None:
        self.inputs = inputs
        self.model = model  # which model serves it (None: the batcher's one executor)
        self.pinned = pinned  # the version that must compute it (None: the model's stable one at its batch)
        self.spec = spec  # the input spec it was validated against
        self.key = compatibility_key(inputs, model, pinned)
        self.deadline = deadline
        self.enqueued = now
        self.launched = 0.0  # when its batch was launched (0: not yet)
        self.finished = 0.0
        self.batch_size = 0
        self.outputs: dict[str, np.ndarray] | None = None
        self.version: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._done = threading.Event()

    def resolve(self, outputs=None, version=None, error=None) -> None:
        self.outputs, self.version, self.error = outputs, version, error
        self.finished = time.monotonic()
        self._done.set()

    @property
    def queue_s(self) -> float:
        return max(0.0, (self.launched or self.finished) - self.enqueued)

    @property
    def compute_s(self) -> float:
        return max(0.0, self.finished - self.launched) if self.launched else 0.0


class Batcher:
    """A bounded request queue and the loop that turns it into batches."""

    def __init__(
        self,
        executor: Executor | None = None,
        *,
        max_batch_size: int = 16,
        max_delay_s: float = 0.0,
        queue_size: int = 256,
        observer: Observer | None = None,
        executor_for: Callable[[Request], Executor] | None = None,
    ) -> None:
        self.executor = executor
        self.executor_for = executor_for
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self.observer = observer  # each batch before its launch, and once its requests are answered or failed
        self._queue: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.requests = 0

    # -- request threads ------------------------------------------------------------

    def submit(
        self, inputs: Mapping[str, np.ndarray], deadline: float, model: Any = None, spec: Any = None,
        pinned: str | None = None,
    ) -> Request:
        """Queue one observation; QueueFull at once when the queue is full."""
        request = Request(inputs, deadline, time.monotonic(), model, spec, pinned)
        with self._cond:
            if self._stopping:
                raise NotReady("server is shutting down")
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"{len(self._queue)} requests queued", headers={"Retry-After": "1"})
            self._queue.append(request)
            self._cond.notify()
        return request

    def submit_rows(
        self, rows: list[Mapping[str, np.ndarray]], deadline: float, model: Any = None, spec: Any = None,
        pinned: str | None = None,
    ) -> list[Request]:
        """Queue the N observations of one vectorized request, all or none, in order.

        Raises PayloadTooLarge (413) when N exceeds the queue size, QueueFull when the queue
        has no room for all N now, NotReady while stopping.
        """
        if len(rows) > self.queue_size:
            raise PayloadTooLarge(f"{len(rows)} rows exceed the queue size {self.queue_size}")
        now = time.monotonic()
        requests = [Request(inputs, deadline, now, model, spec, pinned) for inputs in rows]
        with self._cond:
            if self._stopping:
                raise NotReady("server is shutting down")
            if len(self._queue) + len(requests) > self.queue_size:
                raise QueueFull(
                    f"{len(self._queue)} requests queued, no room for {len(requests)} rows",
                    headers={"Retry-After": "1"},
                )
            self._queue.extend(requests)
            self._cond.notify()
        return requests

    def wait_rows(self, requests: list[Request]) -> tuple[list[dict[str, np.ndarray]], str]:
        """Block until every row is answered; their outputs in order and the model version.

        The first row's error is raised (the other rows are cancelled). Rows answered by two
        versions (a hot swap between two of its batches) raise NotReady (503, retry at once):
        one answer never mixes versions.
        """
        outputs, versions = [], set()
        try:
            for request in requests:
                out, version = self.wait(request)
                outputs.append(out)
                versions.add(version)
        except BaseException:
            for request in requests:
                request.cancelled = True
            raise
        if len(versions) > 1:
            raise NotReady(
                f"the model changed while the rows were computed (versions {sorted(map(str, versions))}); retry",
                headers={"Retry-After": "0"},
            )
        return outputs, versions.pop()

    def wait(self, request: Request) -> tuple[dict[str, np.ndarray], str]:
        """Block until ``request`` is answered; return its outputs and model version.

        Raises the request's error, or DeadlineExceeded when its deadline passed before it
        was answered (queued too long, or computed too late).
        """
        timeout = max(0.0, request.deadline - time.monotonic()) + RESULT_GRACE_S
        if not request._done.wait(timeout):
            request.cancelled = True
            raise DeadlineExceeded("no answer in time")
        if request.error is not None:
            # A fresh copy: the stored one may be shared by a whole batch, and raising an
            # exception that the request holds makes a reference cycle (exception, traceback,
            # this frame, the request) that keeps the request's inputs alive until the cyclic
            # collector runs, which an idle worker may not do for a long time.
            raise request.error.copy()
        if request.finished > request.deadline:  # computed, but too late to act on: never a late answer
            self._observe("late", [request])
            raise DeadlineExceeded(
                f"deadline passed {1e3 * (request.finished - request.deadline):.1f} ms before its batch finished "
                f"(computing took {1e3 * request.compute_s:.1f} ms); the late answer was dropped"
            )
        return request.outputs, request.version

    # -- the batcher thread ---------------------------------------------------------

    def start(self, name: str = "batcher") -> None:
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Refuse new requests, answer every queued one, end the loop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def run(self) -> None:
        """Serve batches until stopped and drained."""
        inflight: tuple[Executor, Any, list[Request]] | None = None
        while True:
            batch = self._collect(block=inflight is None)
            launched = None
            if batch:
                launched = self._launch(batch)
            if inflight is not None:
                self._finish(*inflight)
                inflight = None
            if launched is not None:
                if launched[0].pipelined:
                    inflight = launched
                else:
                    self._finish(*launched)
            if batch is None and inflight is None:
                return
            # Hold nothing of a finished batch while idle: its executor may be a model version
            # that is being unloaded, whose memory must go back now, not at the next batch.
            batch = launched = None

    def _collect(self, block: bool) -> list[Request] | None:
        """The next batch: [] when nothing is ready (non-blocking), None when stopped and empty."""
        with self._cond:
            while block and not self._queue and not self._stopping:
                self._cond.wait()
            self._drop_expired()
            if not self._queue:
                return None if self._stopping else []
            if self.max_delay_s > 0 and block and not self._stopping:
                first_arrival = self._queue[0].enqueued
                while self._count_compatible() < self.max_batch_size and not self._stopping:
                    remaining = first_arrival + self.max_delay_s - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                self._drop_expired()
                if not self._queue:
                    return []
            return self._take_compatible()

    def _count_compatible(self) -> int:
        key = self._queue[0].key
        return sum(1 for r in self._queue if r.key == key)

    def _take_compatible(self) -> list[Request]:
        key = self._queue[0].key
        batch, rest = [], collections.deque()
        while self._queue:
            request = self._queue.popleft()
            if request.key == key and len(batch) < self.max_batch_size:
                batch.append(request)
            else:
                rest.append(request)
        self._queue = rest
        return batch

    def _drop_expired(self) -> None:
        now = time.monotonic()
        if not any(r.deadline <= now or r.cancelled for r in self._queue):
            return
        keep = collections.deque()
        for request in self._queue:
            if request.cancelled:
                continue
            if request.deadline <= now:
                request.resolve(error=DeadlineExceeded("deadline passed while queued; not computed"))
            else:
                keep.append(request)
        self._queue = keep

    def _launch(self, batch: list[Request]):
        now = time.monotonic()
        for request in batch:
            request.launched = now
            request.batch_size = len(batch)
        self._observe("launched", batch)
        try:
            executor = self.executor if self.executor_for is None else self.executor_for(batch[0])
            return executor, executor.launch(batch), batch
        except Exception as exc:  # noqa: BLE001 (fails only this batch; _fail logs it)
            self._fail(batch, exc)
            self._finished(batch)
            return None

    def _finish(self, executor: Executor, handle: Any, batch: list[Request]) -> None:
        try:
            outputs, version = executor.finish(handle)
        except Exception as exc:  # noqa: BLE001 (fails only this batch; _fail logs it)
            self._fail(batch, exc)
        else:
            for request, output in zip(batch, outputs, strict=False):
                if isinstance(output, ServingError):  # this row's own failure (e.g. a non-finite output)
                    request.resolve(error=output)
                else:
                    request.resolve(outputs=output, version=version)
            self.batches += 1
            self.requests += len(batch)
        self._finished(batch)

    def _finished(self, batch: list[Request]) -> None:
        self._observe("finished", batch)

    def _observe(self, event: str, batch: list[Request]) -> None:
        hook = getattr(self.observer, event, None)  # an observer may leave out "late"
        if hook is not None:
            try:
                hook(batch)
            except Exception:  # an observer never stops the batcher
                log.exception("the batch observer failed on %s", event)

    @property
    def depth(self) -> int:
        """Requests queued now."""
        return len(self._queue)

    def _fail(self, batch: list[Request], exc: Exception) -> None:
        if isinstance(exc, ServingError):
            error: ServingError = exc
        else:
            log.error("batch of %d failed", len(batch), exc_info=exc)
            error = InferenceFailed()
        for request in batch:
            request.resolve(error=error)
