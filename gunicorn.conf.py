"""Gunicorn settings and hooks for the policy server, read from POLICY_SERVER_* variables.

Start with ``python server.py ...`` (which sets the variables) or
``gunicorn -c gunicorn.conf.py`` directly. The master imports neither torch nor the model:
each worker loads its own copy in ``post_worker_init``.
"""

import logging
import os
import shutil
import sys
import tempfile
import threading

from policy_server.config import ServerConfig

_config = ServerConfig.from_env()
_config.validate()

_LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
logging.basicConfig(level=_config.log_level.upper(), format=_LOG_FORMAT, stream=sys.stdout)
if _config.log_dir:  # also to files: every request line in access.log, warnings and errors in error.log
    os.makedirs(_config.log_dir, exist_ok=True)
    _access = logging.FileHandler(os.path.join(_config.log_dir, "access.log"))
    _access.setFormatter(logging.Formatter(_LOG_FORMAT))
    logging.getLogger("policy_server.access").addHandler(_access)
    _errors = logging.FileHandler(os.path.join(_config.log_dir, "error.log"))
    _errors.setLevel(logging.WARNING)
    _errors.setFormatter(logging.Formatter(_LOG_FORMAT))
    logging.getLogger().addHandler(_errors)
# Set in the master before any worker imports torch, so each worker's OpenMP pool is sized
# for its share of the cores (torch.set_num_threads alone leaves OpenMP's default).
os.environ.setdefault("OMP_NUM_THREADS", str(_config.torch_threads_per_worker()))

# Per-instance scratch space (worker status files), inherited by the workers through the
# environment: a fresh directory per start unless configured.
_created_run_dir = _config.run_dir is None
_run_dir = _config.run_dir or tempfile.mkdtemp(prefix="policy-server-")
os.environ["POLICY_SERVER_RUN_DIR"] = _run_dir
# prometheus_client reads this when a worker first imports it: every worker's metrics go
# to mmap files here and /metrics sums them (policy_server/telemetry/metrics.py).
_metrics_dir = os.path.join(_run_dir, "metrics")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

wsgi_app = "server:create_app()"
_host = f"[{_config.host}]" if ":" in _config.host else _config.host
bind = [] if _config.uds_only else [f"{_host}:{_config.port}"]
if _config.uds:  # a Unix domain socket, as well as or instead of TCP (any worker class)
    bind.append(f"unix:{_config.uds}")
    # gunicorn applies umask around the socket's bind (and its workers' 0600 heartbeat
    # files) only: the socket never exists with more than uds_mode, not even before when_ready
    umask = 0o777 & ~_config.uds_file_mode()
if _config.tls:  # HTTPS on the TCP listeners, with gunicorn's own settings (the front door does the handshake)
    certfile = _config.certfile
    keyfile = _config.keyfile
    ca_certs = _config.ca_certs
    cert_reqs = _config.cert_reqs_flag()
workers = _config.workers
# gthread, with whole requests read by the poller before a thread sees them (docs/front-door.md)
worker_class = "policy_server.front_door.FrontDoorWorker"
threads = _config.threads
timeout = _config.timeout_s
graceful_timeout = _config.graceful_timeout_s
keepalive = _config.keepalive_s
loglevel = _config.log_level
errorlog = "-"
control_socket_disable = True  # gunicorn 27's runtime admin socket: unused surface, and a fixed path
max_requests = 0  # recycling a worker reloads the model: seconds of p99
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"


def on_starting(server):
    """Files left by a previous run in a configured run directory describe dead workers."""
    for kind in ("workers", "stats", "metrics"):
        shutil.rmtree(os.path.join(_run_dir, kind), ignore_errors=True)
    os.makedirs(_metrics_dir)


def when_ready(server):
    """The Unix socket's file mode, once gunicorn has bound it (before any worker serves)."""
    if _config.uds:
        os.chmod(_config.uds, _config.uds_file_mode())
        server.log.info("unix socket %s mode %s", _config.uds, _config.uds_mode)


def ssl_context(conf, default_ssl_context_factory):
    """gunicorn's context (certfile, keyfile, ca_certs, cert_reqs), refusing TLS older than
    ``tls_min_version`` (gunicorn has no setting of its own for that)."""
    context = default_ssl_context_factory()
    context.minimum_version = _config.tls_minimum_version()
    return context


def child_exit(server, worker):
    """A dead worker's live gauges (queue depth, in-flight batches, versions) stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """After every worker drained: the instance's final numbers, then the scratch space goes."""
    from policy_server.telemetry.stats import write_final_metrics

    try:
        path = write_final_metrics(_run_dir, _config.log_dir or "logs")
        server.log.info("final metrics written to %s", path)
    except OSError as exc:
        server.log.error("writing final metrics failed: %s", exc)
    if _created_run_dir:
        shutil.rmtree(_run_dir, ignore_errors=True)


def _runtime(worker):
    return getattr(worker.wsgi, "extensions", {}).get("policy_runtime")


def post_worker_init(worker):
    """Load and warm this worker's model before it accepts a single connection: a cold
    worker never takes traffic its siblings could serve. A heartbeat thread keeps the
    master's worker timeout from firing while it loads. ``worker.age`` counts spawned
    workers, so with several GPUs worker i gets GPU i % n."""
    if _config.malloc_tuning:
        from policy_server.serving.allocator import tune_malloc

        tune_malloc()
    runtime = _runtime(worker)
    if runtime is None:
        return
    loaded = threading.Event()

    def heartbeat():
        while not loaded.wait(1.0):
            worker.notify()

    # A worker that never notified is never timed out by this gunicorn (its heartbeat file
    # starts at wall-clock time, the arbiter compares monotonic time): notify now, so the
    # timeout applies from here and the heartbeat below is what keeps a long load alive.
    worker.notify()
    threading.Thread(target=heartbeat, name="load-heartbeat", daemon=True).start()
    try:
        runtime.start(worker_index=worker.age - 1, workers=worker.cfg.workers, block=True)
    finally:
        loaded.set()


def worker_exit(server, worker):
    """Answer every request the batcher accepted before the worker goes."""
    runtime = _runtime(worker)
    if runtime is not None:
        runtime.stop(timeout_s=_config.graceful_timeout_s)
