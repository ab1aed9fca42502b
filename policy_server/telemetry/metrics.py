"""Prometheus metrics, summed over every gunicorn worker.

gunicorn.conf.py points ``PROMETHEUS_MULTIPROC_DIR`` at ``<run-dir>/metrics`` in the master
before any worker imports prometheus_client, so each worker's values live in mmap files
there and ``/metrics`` (whichever worker answers) aggregates all of them; the master marks
dead workers so their live gauges disappear. Without that variable (one in-process app)
the default registry is used. Names follow Prometheus conventions: seconds, ``_total``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)

from policy_server.telemetry.metrics_files import collected

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

REQUESTS = Counter("policy_requests_total", "HTTP requests answered, by route and status", ["route", "status"])
REQUEST_SECONDS = Histogram(
    "policy_request_duration_seconds", "Time from reading a request to its answer, by route", ["route"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_SECONDS = Histogram(
    "policy_queue_wait_seconds", "Time a request waited in the queue before its batch started", buckets=LATENCY_BUCKETS
)
COMPUTE_SECONDS = Histogram(
    "policy_batch_compute_seconds", "Time from launching a batch to its outputs on the host", ["model"],
    buckets=LATENCY_BUCKETS,
)
TRANSFER_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
H2D_SECONDS = Histogram(
    "policy_h2d_seconds", "GPU time of a batch's host-to-device input copy (CUDA only)", ["model"],
    buckets=TRANSFER_BUCKETS,
)
D2H_SECONDS = Histogram(
    "policy_d2h_seconds", "GPU time of a batch's device-to-host output copy (CUDA only)", ["model"],
    buckets=TRANSFER_BUCKETS,
)
BATCH_SIZE = Histogram("policy_batch_size", "Requests per executed batch", ["model"], buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge("policy_queue_depth", "Requests queued, over all workers", multiprocess_mode="livesum")
INFLIGHT_BATCHES = Gauge("policy_inflight_batches", "Batches launched and not finished", multiprocess_mode="livesum")
MODEL_VERSION = Gauge(
    "policy_model_version", "Store version each live worker serves, per model", ["model"], multiprocess_mode="liveall"
)
HELD_BYTES = Gauge(
    "policy_model_held_bytes",
    "Bytes of weights each live worker holds per model, every version together (stable, canary candidate, "
    "retained previous)", ["model"], multiprocess_mode="liveall",
)
EPISODE_OUTCOMES = Counter(
    "policy_episode_outcomes_total", "Episode outcomes reported by clients, by model, version and outcome "
    "(success or failure)", ["model", "version", "outcome"],
)
EPISODE_RETURN = Summary(
    "policy_episode_return", "Episode returns reported with outcomes, by model and version (the sum may fall: "
    "returns may be negative)", ["model", "version"],
)
RELOADS = Counter("policy_model_reloads_total", "New versions a worker swapped in", ["model"])
RELOAD_FAILURES = Counter("policy_model_reload_failures_total", "New versions a worker failed to load", ["model"])
UPDATES_REFUSED = Counter("policy_model_updates_refused_total", "Updates that failed validation (nothing published)")
FRONT_DOOR_REFUSALS = Counter(
    "policy_front_door_refusals_total",
    "Requests the front door answered itself (timeouts, protocol errors, limits, overload), by reason and status",
    ["reason", "status"],
)
FRONT_DOOR_CLOSED = Counter(
    "policy_front_door_closed_total",
    "Connections the front door closed between requests, by reason: idle (past keepalive_s), evicted (the "
    "longest idle, to make room when the worker holds worker_connections), tls_handshake_timeout, tls_handshake_failed",
    ["reason"],
)
TLS_CERTIFICATE_RELOADS = Counter(
    "policy_tls_certificate_reloads_total",
    "Changed certificate files seen by a worker: loaded (new handshakes use them) or failed (the previous "
    "certificate still serves)",
    ["outcome"],
)
LATE_ANSWERS = Counter(
    "policy_late_answers_total",
    "Answers ready after their request's deadline and replaced by 504 (never a late action), by stage: batch "
    "(the batch finished past it) or write (past it before the status line was written)",
    ["stage"],
)
NONFINITE_OUTPUTS = Counter(
    "policy_nonfinite_outputs_total",
    "Answers refused because the model computed NaN or inf for them (never served), by model and version",
    ["model", "version"],
)
CACHE_HITS = Counter("policy_cache_hits_total", "Answers served from the response cache")
CACHE_MISSES = Counter("policy_cache_misses_total", "Cache lookups that found nothing fresh")


def exposition() -> tuple[bytes, str]:
    """The text exposition of every worker's metrics (or this process's, outside gunicorn)."""
    return generate_latest(collected()), CONTENT_TYPE_LATEST


def transfer_observer(model: str):
    """``BatchExecutor.on_transfer`` for one model: both copy times into their histograms."""
    h2d, d2h = H2D_SECONDS.labels(model), D2H_SECONDS.labels(model)

    def observe(h2d_s: float, d2h_s: float) -> None:
        h2d.observe(h2d_s)
        d2h.observe(d2h_s)

    return observe


def set_model_version(model: str, version: str) -> None:
    """Numeric store versions only (a fixed test policy's version may be any string)."""
    if version.isdigit():
        MODEL_VERSION.labels(model).set(int(version))


class BatchObserver:
    """The batcher's metrics, as one observer (``Batcher(observer=...)``): queue depth,
    in-flight batches and queue wait when a batch launches; batch size and compute time
    (seconds, per model) once its requests are answered or failed; answers dropped as late. ``depth()`` is the
    queue's length now."""

    def __init__(self, depth: Callable[[], int]) -> None:
        self.depth = depth

    def launched(self, batch: Sequence[Any]) -> None:
        QUEUE_DEPTH.set(self.depth())
        INFLIGHT_BATCHES.inc()
        for request in batch:
            QUEUE_SECONDS.observe(request.queue_s)

    def late(self, batch: Sequence[Any]) -> None:
        LATE_ANSWERS.labels("batch").inc(len(batch))

    def finished(self, batch: Sequence[Any]) -> None:
        INFLIGHT_BATCHES.dec()
        model = str(batch[0].model)
        BATCH_SIZE.labels(model).observe(len(batch))
        COMPUTE_SECONDS.labels(model).observe(max(r.compute_s for r in batch))
