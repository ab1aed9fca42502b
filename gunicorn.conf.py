"""Gunicorn settings and hooks for the policy server, read from POLICY_SERVER_* variables.

Start with ``python server.py ...`` (which sets the variables) or
``gunicorn -c gunicorn.conf.py`` directly. The master imports neither torch nor the model:
each worker loads its own copy in ``post_worker_init``.
"""

import logging
import os
import shutil
import tempfile

from policy_server.config import ServerConfig

_config = ServerConfig.from_env()
_config.validate()

logging.basicConfig(
    level=_config.log_level.upper(),
    format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
)
# Set in the master before any worker imports torch, so each worker's OpenMP pool is sized
# for its share of the cores (torch.set_num_threads alone leaves OpenMP's default).
os.environ.setdefault("OMP_NUM_THREADS", str(_config.torch_threads_per_worker()))

# Per-instance scratch space (worker status files), inherited by the workers through the
# environment: a fresh directory per start unless configured.
_created_run_dir = _config.run_dir is None
_run_dir = _config.run_dir or tempfile.mkdtemp(prefix="policy-server-")
os.environ["POLICY_SERVER_RUN_DIR"] = _run_dir

wsgi_app = "server:create_app()"
_host = f"[{_config.host}]" if ":" in _config.host else _config.host
bind = [f"{_host}:{_config.port}"]
workers = _config.workers
worker_class = "gthread"  # the sync worker serves one request at a time per process
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
    """Status files left by a previous run in a configured run directory describe dead workers."""
    shutil.rmtree(os.path.join(_run_dir, "workers"), ignore_errors=True)


def on_exit(server):
    if _created_run_dir:
        shutil.rmtree(_run_dir, ignore_errors=True)


def _runtime(worker):
    return getattr(worker.wsgi, "extensions", {}).get("policy_runtime")


def post_worker_init(worker):
    """Start this worker's batcher thread: it loads and warms the model off the request path
    (/ready says when). ``worker.age`` counts spawned workers, so with several GPUs worker i
    gets GPU i % n."""
    runtime = _runtime(worker)
    if runtime is not None:
        runtime.start(worker_index=worker.age - 1, workers=worker.cfg.workers)


def worker_exit(server, worker):
    """Answer every request the batcher accepted before the worker goes."""
    runtime = _runtime(worker)
    if runtime is not None:
        runtime.stop(timeout_s=_config.graceful_timeout_s)
