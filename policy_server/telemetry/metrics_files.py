"""The one reader of the workers' Prometheus files (multiprocess mode).

Under gunicorn every worker writes its metric values to mmap files in
``PROMETHEUS_MULTIPROC_DIR``; :func:`collected` reads all of them (dead workers' counters
included) into one registry. ``/metrics`` (:func:`policy_server.telemetry.metrics.exposition`) and the
instance's totals (:mod:`policy_server.telemetry.stats`, also in the gunicorn master, which must not
import :mod:`policy_server.telemetry.metrics`: defining the metrics there would give the master files
of its own) both read through here. Without that variable (one process) it is the default
registry.
"""

from __future__ import annotations

import os

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def collected():
    """A registry holding every worker's metrics (multiprocess), else the default registry."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    if not os.environ.get(MULTIPROC_ENV):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry
