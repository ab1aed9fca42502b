"""Config precedence (CLI > environment > defaults), parsing, and the refusal of unsafe binds."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from policy_server.config import ServerConfig, is_loopback
from policy_server.errors import ConfigError
from policy_server.launcher import ROOT, build_config


def test_defaults():
    config = ServerConfig()
    assert (config.host, config.port, config.device, config.api_key) == ("127.0.0.1", 50000, "auto", None)
    config.validate()


def test_environment_overrides_defaults_and_cli_overrides_environment():
    env = {"POLICY_SERVER_PORT": "6000", "POLICY_SERVER_WORKERS": "3", "POLICY_SERVER_DEVICE": "cpu"}
    from_env = ServerConfig.from_env(env)
    assert (from_env.port, from_env.workers, from_env.device) == (6000, 3, "cpu")
    merged = ServerConfig.from_sources(["--port", "7000", "--threads", "2"], env)
    assert (merged.port, merged.workers, merged.threads, merged.device) == (7000, 3, 2, "cpu")


@pytest.mark.parametrize("raw, value", [("1", True), ("true", True), ("YES", True), ("0", False), ("off", False)])
def test_boolean_environment_values(raw, value):
    assert ServerConfig.from_env({"POLICY_SERVER_ALLOW_UNAUTHENTICATED": raw}).allow_unauthenticated is value


@pytest.mark.parametrize("env", [{"POLICY_SERVER_PORT": "http"}, {"POLICY_SERVER_ALLOW_UNAUTHENTICATED": "maybe"}])
def test_bad_environment_values_name_the_variable(env):
    with pytest.raises(ConfigError, match=next(iter(env))):
        ServerConfig.from_env(env)


def test_to_env_round_trips():
    config = ServerConfig(port=1234, api_key="k" * 16, allow_unauthenticated=True, workers=2)
    assert ServerConfig.from_env(config.to_env()) == config


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "example.org"])
def test_non_loopback_without_key_is_refused(host):
    assert not is_loopback(host)
    with pytest.raises(ConfigError, match="API key"):
        ServerConfig(host=host).validate()
    ServerConfig(host=host, api_key="a-long-enough-key").validate()
    ServerConfig(host=host, allow_unauthenticated=True).validate()


@pytest.mark.parametrize(
    "fields, match",
    [({"port": 0}, "port"), ({"workers": 0}, "workers"), ({"device": "tpu"}, "device"),
     ({"api_key": "short"}, "api_key"), ({"torch_threads": -1}, "torch_threads"),
     ({"admin_key": "short"}, "admin_key"), ({"store_keep": 0}, "store_keep"), ({"store_poll_ms": 0}, "store_poll_ms"),
     ({"cache_size": -1}, "cache_size"), ({"model_name": "../x"}, "model_name")],
)
def test_invalid_values(fields, match):
    with pytest.raises(ConfigError, match=match):
        ServerConfig(**fields).validate()


def test_torch_threads_share_the_cores():
    assert ServerConfig(workers=4).torch_threads_per_worker(cores=16) == 4
    assert ServerConfig(workers=4).torch_threads_per_worker(cores=2) == 1
    assert ServerConfig(workers=4, torch_threads=3).torch_threads_per_worker(cores=2) == 3


def test_launcher_resolves_model_path_and_checks_it(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = build_config(["--model-path", "models/default"], environ={})
    assert config.model_path == os.path.join(ROOT, "models", "default")
    monkeypatch.chdir(tmp_path)
    config = build_config(
        ["--model-path", os.path.join(ROOT, "models", "default"), "--model-store", "store", "--model-root", "m",
         "--run-dir", "run"], environ={},
    )
    assert (config.model_store, config.model_root, config.run_dir) == (
        str(tmp_path / "store"), str(tmp_path / "m"), str(tmp_path / "run"))
    assert build_config(["--model-path", config.model_path, "--model-store", ""], environ={}).model_store == ""
    with pytest.raises(ConfigError, match="policy.py"):
        build_config(["--model-path", str(tmp_path)], environ={})


def test_cli_refuses_public_bind_without_key_before_starting():
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICY_SERVER_")}
    result = subprocess.run(
        [sys.executable, "server.py", "--host", "0.0.0.0"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to bind 0.0.0.0 without an API key" in result.stderr


def test_cli_help_lists_every_setting():
    result = subprocess.run(
        [sys.executable, "server.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for flag in (
        "--model-path",
        "--device",
        "--host",
        "--port",
        "--workers",
        "--threads",
        "--api-key",
        "--model-store",
        "--model-root",
        "--admin-key",
        "--store-keep",
        "--cache-size",
    ):
        assert flag in result.stdout


def test_batch_size_auto_depends_on_the_device():
    assert ServerConfig().batch_size_for("cpu") == 4
    assert ServerConfig().batch_size_for("cuda:1") == 16
    assert ServerConfig(max_batch_size=7).batch_size_for("cpu") == 7
    with pytest.raises(ConfigError, match="max_batch_size"):
        ServerConfig(max_batch_size=-1).validate()
