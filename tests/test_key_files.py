"""Keys from files (POLICY_SERVER_API_KEY_FILE / --api-key-file and the admin pair): what a
mounted Secret gives the server, read once per process and never put back in the environment."""

from __future__ import annotations

import logging
import os

import pytest

from policy_server import key_files
from policy_server.config import ServerConfig
from policy_server.errors import ConfigError
from policy_server.launcher import build_config

KEY = "a-long-inference-key"
ADMIN = "a-long-admin-key-0001"


def key_file(tmp_path, text: str | bytes, mode: int = 0o600, name: str = "api-key"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(mode)
    return str(path)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(key_files, "_warned", set())


@pytest.mark.parametrize("text", [KEY, KEY + "\n", KEY + "\r\n", KEY + "\n\n"])
def test_the_key_is_read_with_trailing_newlines_stripped(tmp_path, text):
    config = ServerConfig.from_env({"POLICY_SERVER_API_KEY_FILE": key_file(tmp_path, text)})
    assert config.api_key == KEY


def test_the_admin_key_file_too(tmp_path):
    path = key_file(tmp_path, ADMIN + "\n", name="admin-key")
    config = ServerConfig.from_sources(["--admin-key-file", path], {})
    assert (config.admin_key, config.admin_key_file, config.api_key) == (ADMIN, path, None)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"api_key_file '.*nowhere' cannot be read: No such file"):
        ServerConfig.from_env({"POLICY_SERVER_API_KEY_FILE": str(tmp_path / "nowhere")})


@pytest.mark.parametrize("text", ["", "\n", "\r\n\n"])
def test_an_empty_file_is_a_clear_error(tmp_path, text):
    with pytest.raises(ConfigError, match="admin_key_file .* is empty"):
        ServerConfig.from_env({"POLICY_SERVER_ADMIN_KEY_FILE": key_file(tmp_path, text)})


@pytest.mark.parametrize(
    "text, match",
    [(KEY + "\nsecond line\n", "more than one line"), (b"\xff\xfe-key-bytes", "not UTF-8"),
     ("k" * (key_files.MAX_KEY_FILE_BYTES + 1), "larger than")],
)
def test_a_file_that_is_not_one_key_is_refused(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        ServerConfig.from_env({"POLICY_SERVER_API_KEY_FILE": key_file(tmp_path, text)})


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        ServerConfig.from_env({"POLICY_SERVER_API_KEY_FILE": str(tmp_path)})


@pytest.mark.parametrize(
    "argv, env",
    [
        ([], {"POLICY_SERVER_API_KEY": KEY, "POLICY_SERVER_API_KEY_FILE": "FILE"}),
        (["--api-key", KEY], {"POLICY_SERVER_API_KEY_FILE": "FILE"}),
        (["--api-key-file", "FILE"], {"POLICY_SERVER_API_KEY": KEY}),
        (["--api-key", KEY, "--api-key-file", "FILE"], {}),
    ],
)
def test_a_key_given_both_ways_is_refused_whatever_the_source(tmp_path, argv, env):
    path = key_file(tmp_path, KEY)
    argv = [path if a == "FILE" else a for a in argv]
    env = {k: path if v == "FILE" else v for k, v in env.items()}
    with pytest.raises(ConfigError, match="api_key and api_key_file are both set.*give the key one way"):
        ServerConfig.from_sources(argv, env)


def test_the_cli_flag_wins_over_the_environment_variable(tmp_path):
    from_env = key_file(tmp_path, "key-from-the-environment", name="env-key")
    from_cli = key_file(tmp_path, "key-from-the-command-line", name="cli-key")
    config = ServerConfig.from_sources(["--api-key-file", from_cli], {"POLICY_SERVER_API_KEY_FILE": from_env})
    assert (config.api_key, config.api_key_file) == ("key-from-the-command-line", from_cli)


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o604, 0o700, 0o666])
def test_permissions_wider_than_0640_are_a_logged_warning(tmp_path, caplog, mode):
    path = key_file(tmp_path, KEY, mode=mode)
    with caplog.at_level(logging.WARNING, logger="policy_server.key_files"):
        assert ServerConfig.from_env({"POLICY_SERVER_API_KEY_FILE": path}).api_key == KEY
        ServerConfig.from_env({"POLICY_SERVER_API_KEY_FILE": path})  # once per file and process
    assert [r.getMessage() for r in caplog.records] == [
        f"api_key_file {path!r} has mode {mode:04o}, wider than 0640: others may read or change the key "
        "(chmod 0640, 0600 or 0440)"
    ]


@pytest.mark.parametrize("mode", [0o640, 0o600, 0o440, 0o400])
def test_permissions_up_to_0640_are_quiet(tmp_path, caplog, mode):
    path = key_file(tmp_path, KEY, mode=mode)
    with caplog.at_level(logging.WARNING, logger="policy_server.key_files"):
        ServerConfig.from_env({"POLICY_SERVER_API_KEY_FILE": path})
    assert caplog.records == []


def test_a_key_from_a_file_travels_to_the_workers_as_its_path(tmp_path):
    path = key_file(tmp_path, KEY + "\n")
    config = ServerConfig.from_sources(["--api-key-file", path, "--admin-key", ADMIN], {})
    env = config.to_env()
    assert env["POLICY_SERVER_API_KEY_FILE"] == path and "POLICY_SERVER_API_KEY" not in env
    assert env["POLICY_SERVER_ADMIN_KEY"] == ADMIN  # a plain key stays a plain variable
    assert KEY not in env.values()
    assert ServerConfig.from_env(env) == config  # what each gunicorn worker reads


def test_the_healthcheck_path_reads_no_key_file(tmp_path):
    config = ServerConfig.from_env({"POLICY_SERVER_API_KEY_FILE": str(tmp_path / "absent")}, read_key_files=False)
    assert config.api_key is None


def test_the_launcher_makes_key_file_paths_absolute(tmp_path, monkeypatch):
    key_file(tmp_path, KEY)
    monkeypatch.chdir(tmp_path)
    model = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "default")
    config = build_config(["--model-path", model, "--host", "0.0.0.0", "--api-key-file", "api-key"], environ={})
    assert config.api_key_file == str(tmp_path / "api-key") and config.api_key == KEY
    config.validate()  # a key from a file counts as a key for a non-loopback bind
