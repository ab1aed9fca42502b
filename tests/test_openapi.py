"""The OpenAPI document: it names every route the app has, and a schema-driven fuzz run
against a real gunicorn server (schemathesis) gets no server error."""

from __future__ import annotations

import re

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from policy_server.app.openapi import openapi_document
from server import create_app
from tests.support.serving import run_server
from tests.support.tiny_model import write_tiny_model

API_KEY, ADMIN_KEY = "fuzz-api-key-0123456789", "fuzz-admin-key-0123456789"
KEYS = {"X-API-Key": API_KEY, "X-Admin-Key": ADMIN_KEY}
VERSION_NOT_SERVED = {"error", "detail", "model", "version", "served_versions"}  # a pin to a version not served


def app_operations() -> set[tuple[str, str]]:
    app = create_app()
    operations = set()
    for rule in app.url_map.iter_rules():  # no static route: every rule is one of ours
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        operations |= {(method, path) for method in rule.methods - {"HEAD", "OPTIONS"}}
    return operations


def test_the_document_describes_exactly_the_apps_routes():
    documented = {
        (method.upper(), path) for path, item in openapi_document()["paths"].items() for method in item
    }
    assert documented == app_operations()


def test_every_operation_documents_its_errors_and_security():
    for path, item in openapi_document()["paths"].items():
        for method, operation in item.items():
            success = "101" if operation.get("x-websocket") else "200"  # an upgrade switches protocols
            assert success in operation["responses"], (method, path)
            assert operation["security"][0] == {} or operation["security"] == [{}], (method, path)
            for code, response in operation["responses"].items():
                if code != success:
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}


def test_the_document_is_served_without_a_key(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.get_json() == openapi_document()


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    root = tmp / "models"
    write_tiny_model(root / "tiny", 1.0)
    args = ("--model-path", str(root / "tiny"), "--model-root", str(root), "--model-name", "default",
            "--api-key", API_KEY, "--admin-key", ADMIN_KEY)
    with run_server(tmp, workers=2, args=args) as server:
        yield server


def fuzz_operation(operation, base_url: str) -> int:
    """Send schemathesis-generated requests for one operation; return how many were sent."""
    sent = []

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def fuzz(case):
        headers = {**KEYS, **(case.headers or {})}
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        sent.append(response.status_code)
        described = f"{case.method} {case.formatted_path} -> {response.status_code} {response.text[:300]}"
        if response.status_code == 504:  # documented: a deadline too short to start compute in
            body = case.body if isinstance(case.body, dict) else {}
            oip_timeout = isinstance(body.get("parameters"), dict) and "timeout" in body["parameters"]
            assert "X-Deadline-Ms" in headers or oip_timeout, described
        else:
            assert response.status_code < 500, described
        if response.status_code >= 400:
            keys = set(response.json())
            pinned = response.status_code == 409 and keys == VERSION_NOT_SERVED
            assert keys == {"error", "detail"} or pinned, described

    fuzz()
    return len(sent)


@pytest.mark.integration
def test_fuzzing_every_route_finds_no_server_error(fuzzed_server):
    schema = schemathesis.openapi.from_url(fuzzed_server.base_url + "/openapi.json")
    counts = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        counts[f"{operation.method.upper()} {operation.path}"] = fuzz_operation(operation, fuzzed_server.base_url)
    # schemathesis leaves out the operation that serves the schema itself
    assert set(counts) == {f"{m} {p}" for m, p in app_operations()} - {"GET /openapi.json"}
    assert all(n >= 1 for n in counts.values()), counts
    assert sum(counts.values()) >= 100, counts
