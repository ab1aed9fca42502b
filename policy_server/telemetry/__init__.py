"""Telemetry: what the server counts and tells its siblings.

================  ================================================================
``metrics``       the Prometheus metrics and their exposition across workers
``metrics_files`` the one reader of the workers' Prometheus files
``stats``         per-worker request statistics, ``/stats``, ``final_metrics.json``
``worker_status`` ``WorkerStatusBoard``: per-worker JSON documents of one instance
================  ================================================================

Imports only the foundation. Nothing is imported here: ``metrics`` must load in a worker
after gunicorn.conf.py set ``PROMETHEUS_MULTIPROC_DIR``, never as a side effect.
"""
