"""``python server.py``: merge CLI, environment and defaults, check them, then exec gunicorn.

The merged config travels to the workers as ``POLICY_SERVER_*`` environment variables, so
the CLI and ``gunicorn -c gunicorn.conf.py`` with variables are one code path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from policy_server.config import ServerConfig
from policy_server.contract import require_model_dir
from policy_server.errors import ConfigError, NotAModelDirectory

log = logging.getLogger("policy_server.launcher")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUNICORN_CONF = os.path.join(ROOT, "gunicorn.conf.py")


def build_config(argv: Sequence[str] | None = None, environ=None) -> ServerConfig:
    """The merged, checked config with absolute paths (workers run from ROOT)."""
    config = ServerConfig.from_sources(argv, environ)
    config = dataclasses.replace(
        config,
        model_path=os.path.abspath(config.model_path),
        model_root=os.path.abspath(config.model_root),
        model_store=os.path.abspath(config.model_store) if config.model_store else "",
        run_dir=os.path.abspath(config.run_dir) if config.run_dir else None,
        log_dir=os.path.abspath(config.log_dir) if config.log_dir else None,
        uds=os.path.abspath(config.uds) if config.uds else None,
        **{name: os.path.abspath(path) for name in ("certfile", "keyfile", "ca_certs", "api_key_file", "admin_key_file")
           if (path := getattr(config, name))},
    )
    config.validate()
    try:
        require_model_dir(config.model_path)
    except NotAModelDirectory as exc:
        raise ConfigError(str(exc)) from None
    return config


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(argv)
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(2)
    env = {**os.environ, **config.to_env()}
    command = [
        sys.executable, "-m", "gunicorn",
        "--config", GUNICORN_CONF,
        "--chdir", ROOT,
    ]
    where = [] if config.uds_only else [f"{'https' if config.tls else 'http'}://{config.host}:{config.port}"]
    where += [f"unix://{config.uds}"] if config.uds else []
    log.info(
        "serving %s on %s with %d workers x %d threads",
        config.model_path, " and ".join(where), config.workers, config.threads,
    )
    os.execve(sys.executable, command, env)
