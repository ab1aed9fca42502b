"""``/stats`` and ``final_metrics.json``: a JSON summary of recent requests across every worker of the instance.

Each worker keeps a bounded window of its recent requests and totals (:class:`RequestStats`)
and writes a snapshot to the instance's run directory every second (and once more when
it exits); :func:`summarize` merges the snapshots: latency average/percentiles/min/max,
throughput over the last 10 s, CPU and memory, totals and success rate, and the queue and
compute stages.
"""

from __future__ import annotations

import collections
import logging
import os
import resource
import threading
import time
from typing import Any

import numpy as np

from policy_server.telemetry.metrics_files import MULTIPROC_ENV, collected
from policy_server.telemetry.worker_status import WorkerStatusBoard

log = logging.getLogger(__name__)

WINDOW = 2048  # recent requests kept per worker
THROUGHPUT_WINDOW_S = 10.0
REPORT_INTERVAL_S = 1.0


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RequestStats:
    """This worker's recent requests and totals (thread-safe)."""

    def __init__(self) -> None:
        self._recent: collections.deque[tuple[float, float, bool, float, float]] = collections.deque(maxlen=WINDOW)
        self._lock = threading.Lock()
        self.total = 0
        self.failed = 0
        self._cpu_mark = (time.monotonic(), time.process_time())
        self.cpu_percent = 0.0

    def record(self, latency_s: float, ok: bool, queue_s: float = 0.0, compute_s: float = 0.0) -> None:
        with self._lock:
            self._recent.append((time.time(), latency_s, ok, queue_s, compute_s))
            self.total += 1
            self.failed += not ok

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view; also updates this process's CPU % since the previous snapshot."""
        wall, cpu = time.monotonic(), time.process_time()
        if wall - self._cpu_mark[0] > 0.2:
            self.cpu_percent = 100.0 * (cpu - self._cpu_mark[1]) / (wall - self._cpu_mark[0])
            self._cpu_mark = (wall, cpu)
        with self._lock:
            recent = [[round(t, 4), round(lat, 6), ok, round(q, 6), round(c, 6)] for t, lat, ok, q, c in self._recent]
            total, failed = self.total, self.failed
        return {
            "pid": os.getpid(), "time": time.time(), "total": total, "failed": failed, "recent": recent,
            "cpu_percent": round(self.cpu_percent, 2), "rss_mb": round(_rss_mb(), 1),
        }


class StatsReporter:
    """Shares one worker's :class:`RequestStats` with its siblings: a snapshot into the run
    directory's ``stats`` board every ``interval_s`` (a thread), and a last one at :meth:`stop`
    (kept after the worker exits, for ``final_metrics.json``)."""

    def __init__(self, stats: RequestStats, run_dir: str | None, interval_s: float = REPORT_INTERVAL_S) -> None:
        self.stats = stats
        self.board = WorkerStatusBoard(run_dir, "stats", prune_dead=False)
        self.interval_s = interval_s
        self._stopping = threading.Event()

    def start(self) -> None:
        """Publish a first snapshot now, then one every ``interval_s`` (a thread)."""
        self._publish()
        threading.Thread(target=self._report, name="policy-stats", daemon=True).start()

    def stop(self) -> None:
        """End the thread and publish the final numbers."""
        self._stopping.set()
        self.board.publish(self.stats.snapshot())

    def _report(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self._publish()

    def _publish(self) -> None:
        try:
            self.board.publish(self.stats.snapshot())
        except OSError:
            log.exception("writing request statistics failed")


def _spread(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"avg": None, "p50": None, "p95": None, "p99": None, "min": None, "max": None}
    ms = np.asarray(values_s) * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "avg": round(float(ms.mean()), 3), "p50": round(float(p50), 3), "p95": round(float(p95), 3),
        "p99": round(float(p99), 3), "min": round(float(ms.min()), 3), "max": round(float(ms.max()), 3),
    }


def summarize(snapshots: list[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    """Merge worker snapshots into the /stats answer (latencies in milliseconds)."""
    now = time.time() if now is None else now
    recent = [r for s in snapshots for r in s["recent"]]
    ok = [r for r in recent if r[2]]
    total = sum(s["total"] for s in snapshots)
    failed = sum(s["failed"] for s in snapshots)
    last = [r for r in recent if r[0] >= now - THROUGHPUT_WINDOW_S]
    return {
        "workers": len(snapshots),
        "total_requests": total,
        "failed_requests": failed,
        "success_rate": round((total - failed) / total, 6) if total else None,
        "throughput_rps": round(len(last) / THROUGHPUT_WINDOW_S, 3),
        "latency_ms": _spread([r[1] for r in ok]),
        "stages_ms": {"queue": _spread([r[3] for r in ok]), "compute": _spread([r[4] for r in ok])},
        "window_requests": len(recent),
        "cpu_percent": round(sum(s["cpu_percent"] for s in snapshots), 2),
        "memory_mb": round(sum(s["rss_mb"] for s in snapshots), 1),
    }


# What the totals count: the rules of the inference audience (policy_server.app.access) and the
# route labels of openpi's WebSocket messages (policy_server.openpi.routes), named
# here because the gunicorn master, which writes final_metrics.json, builds no app;
# tests/test_access.py checks this set against the app's routes.
INFERENCE_ROUTES = frozenset({
    "/infer", "/models/<name>/infer",
    "/v2/models/<name>/infer", "/v2/models/<name>/versions/<version>/infer",  # Open Inference Protocol
    "ws:/", "ws:/infer", "ws:/models/<name>/infer",  # openpi's messages, under their upgrade's rule
})


def instance_summary(snapshots: list[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    """:func:`summarize`, with the totals taken from ``policy_requests_total`` when the
    instance runs under gunicorn: counted by every worker that ever served, dead ones
    included (their counter files stay), so they never go backwards and agree with
    ``/metrics``. Every status counts; status >= 400 (499 included) is failed."""
    summary = summarize(snapshots, now)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        total = failed = 0
        for key, n in _request_counts().items():
            route, status = key.rsplit(" ", 1)
            if route in INFERENCE_ROUTES:
                total += n
                failed += n if int(status) >= 400 else 0
        summary.update(
            total_requests=total, failed_requests=failed,
            success_rate=round((total - failed) / total, 6) if total else None,
        )
    return summary


def write_final_metrics(run_dir: str, log_dir: str) -> str:
    """Write ``<log_dir>/final_metrics.json``: the summary over every worker that ever served
    (dead ones included) and the request counts by route and status. Returns the path."""
    import json

    snapshots = list(WorkerStatusBoard(run_dir, "stats", prune_dead=False).read(include_dead=True).values())
    summary = instance_summary(snapshots)
    summary["requests_by_route_status"] = _request_counts()
    summary["written_at"] = time.time()
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, "final_metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=2)
    os.replace(tmp, path)
    return path


def _request_counts() -> dict[str, int]:
    """``policy_requests_total`` summed over every worker, as ``{"route status": n}``."""
    if not os.environ.get(MULTIPROC_ENV):
        return {}
    counts = {}
    for family in collected().collect():
        if family.name == "policy_requests":
            for sample in family.samples:
                if sample.name == "policy_requests_total":
                    counts[f"{sample.labels['route']} {sample.labels['status']}"] = int(sample.value)
    return counts
