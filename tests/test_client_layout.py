"""The client's boundaries, checked in fresh interpreters: a robot installs numpy and
requests, and importing the client loads none of the server's libraries; every client module is packaged and copied into
the image; every PolicyClient call takes the one request path (module sizes: test_house.py)."""

from __future__ import annotations

import configparser
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import policy_client
from binary_protocol import dict_to_binary
from policy_client import transport
from request_tools import PolicyClient

ROOT = Path(__file__).resolve().parent.parent
SETUP = configparser.ConfigParser()
SETUP.read(ROOT / "setup.cfg")
ROOT_MODULES = SETUP["options"]["py_modules"].split()
PACKAGE_MODULES = sorted(f"policy_client.{m.name}" for m in pkgutil.iter_modules(policy_client.__path__))
CLIENT_MODULES = [*ROOT_MODULES, "policy_client", *PACKAGE_MODULES]
# The server's libraries, and the image codecs (loaded only when an image is encoded).
NOT_ON_A_ROBOT = ("torch", "flask", "werkzeug", "jinja2", "gunicorn", "safetensors", "prometheus_client",
                  "policy_server", "simplejpeg", "PIL")

# Prints the top-level names of the modules an import added, in a fresh interpreter.
PROBE = """
import json, sys
before = set(sys.modules)
{code}
added = {{name.partition(".")[0] for name in set(sys.modules) - before}}
print(json.dumps(sorted(added - set(sys.stdlib_module_names))))
"""


def added_modules(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=60)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_client_modules_are_found():
    assert {"binary_protocol", "request_tools", "robot_loop"} <= set(ROOT_MODULES)
    assert {"policy_client.client", "policy_client.transport", "policy_client.chunk_runner",
            "policy_client.chunk_merge", "policy_client.image_codecs"} <= set(PACKAGE_MODULES)


@pytest.mark.parametrize("module", CLIENT_MODULES)
def test_importing_a_client_module_loads_no_server_library(module):
    added = added_modules(f"import {module}")
    assert module.partition(".")[0] in added  # the probe sees what the import loads
    assert not added & set(NOT_ON_A_ROBOT), f"{module} loads {sorted(added & set(NOT_ON_A_ROBOT))}"


def test_image_codecs_load_only_when_an_image_is_encoded():
    setup = ("from policy_client.image_codecs import parse_codec; from request_tools import PolicyClient; "
             "PolicyClient('http://127.0.0.1:9', encode={'image': 'jpeg:80'}); parse_codec('png')")
    assert not added_modules(setup) & {"simplejpeg", "PIL"}
    encode = ("import numpy as np; from policy_client.image_codecs import encode_array; "
              "encode_array(np.zeros((4, 4, 3), np.uint8), 'jpeg')")
    assert "simplejpeg" in added_modules(encode)


def test_every_client_module_is_packaged_and_copied_into_the_image():
    found = {p.stem for p in ROOT.glob("*.py")} - {"server", "gunicorn.conf", "locustfile", "setup"}
    assert found == set(ROOT_MODULES)  # a new top-level module is listed in setup.cfg
    include = SETUP["options.packages.find"]["include"]
    assert "policy_client" in include and "policy_client.*" in include
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = {word for line in re.findall(r"^COPY (.+)$", dockerfile, re.M) for word in line.split()}
    for name in [f"{m}.py" for m in ROOT_MODULES] + ["policy_client"]:
        assert name in copied, f"the Dockerfile does not copy {name}"


# -- one request path -------------------------------------------------------------------


class FakeResponse:
    status_code = 200
    headers = {"X-Model-Version": "v3"}
    url = "http://127.0.0.1:9/"
    content = dict_to_binary({"action": np.zeros((2, 10, 7), np.float32)})

    def json(self):
        return {"inputs": [], "models": [], "version": 2}


def test_every_client_call_takes_the_one_request_path(monkeypatch):
    """Inference, vectorized inference, model management, listing and probes all go through
    ``transport.request`` once each, on the client's session, with the client's settings
    (management: never retried, its timeout stretched by the wait)."""
    calls = []

    def fake_request(session, method, url, *, timeout_s, retries, **kwargs):
        calls.append((session, method, url.removeprefix("http://127.0.0.1:9"), timeout_s, retries))
        return FakeResponse()

    monkeypatch.setattr(transport, "request", fake_request)
    obs = {"state": np.zeros(6, np.float32)}
    with PolicyClient("http://127.0.0.1:9", timeout_s=4, retries=2, check_spec=False, model="m") as client:
        client.infer(obs)
        assert client.last_model_version == "v3"
        client.infer_batch([obs, obs])
        client.model_info()
        client.models()
        client.update_model(version=1, wait_s=1)
        client.load_model("x", wait_s=1)
        client.unload_model("x", wait_s=1)
        assert client.health() and client.ready()
        session = client._session
    assert calls == [
        (session, "POST", "/models/m/infer", 4, 2),
        (session, "POST", "/models/m/infer", 4, 2),
        (session, "GET", "/models/m", 4, 2),
        (session, "GET", "/models", 4, 2),
        (session, "POST", "/update_model", 5, 0),
        (session, "POST", "/models/x/load", 5, 0),
        (session, "POST", "/models/x/unload", 5, 0),
        (session, "GET", "/health", 4, 2),
        (session, "GET", "/ready", 4, 2),
    ]


def test_send_inference_request_takes_the_same_path(monkeypatch):
    import request_tools

    calls = []

    def fake_request(session, method, url, *, timeout_s, retries, **kwargs):
        calls.append((method, url, timeout_s, retries, kwargs["headers"]["X-API-Key"]))
        return FakeResponse()

    monkeypatch.setattr(transport, "request", fake_request)
    out = request_tools.send_inference_request({"state": np.zeros(6, np.float32)}, "http://127.0.0.1:9/infer",
                                               timeout_s=3, retries=1, api_key="k" * 10)
    assert out["action"].shape == (2, 10, 7)
    assert calls == [("POST", "http://127.0.0.1:9/infer", 3, 1, "k" * 10)]


def test_the_package_is_the_face_and_the_old_modules_re_export_it():
    import request_tools
    import robot_loop

    for name in policy_client.__all__:
        assert getattr(policy_client, name) is not None, name
    for face in (request_tools, robot_loop):
        for name in face.__all__:
            assert getattr(face, name) is getattr(policy_client, name), f"{face.__name__}.{name}"
    # the WebSocket client (and its libraries) load only for a ws:// URL
    added = added_modules("import policy_client")
    assert not added & {"websockets", "msgpack"}, added
