"""deploy/compose.yaml and deploy/nginx/nginx.conf as text: what they promise and what must
agree with the server (its port, body limits, routes, settings). `make compose-demo` runs
them for real (podman, root)."""

from __future__ import annotations

import re

import pytest
import yaml

from policy_server.config import ServerConfig
from server import create_app
from tests.support.serving import ROOT

COMPOSE = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
NGINX = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
SERVERS = ("policy-a", "policy-b")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def service(name: str) -> dict:
    return COMPOSE["services"][name]


def locations() -> dict[str, str]:
    """Each location's pattern (or @name) and its block's text (one level of nested braces)."""
    block = r"\{((?:[^{}]|\{[^{}]*\})*)\}"
    return {m.group(1): m.group(2) for m in re.finditer(rf"location (?:~ )?(\S+) {block}", NGINX)}


def directive(block: str, name: str) -> str:
    return re.search(rf"^\s*{name} ([^;]+);", block, re.M).group(1)


def size(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", text.lower()).groups()
    return int(number) * _UNITS[unit]


def location_for(path: str, upgrade: bool = False) -> str:
    """The location nginx serves ``path`` from: the first regex that matches, else ``/``; with
    ``upgrade`` (a WebSocket handshake), the named location that one hands upgrades to."""
    found = next((p for p in locations() if p not in ("/", "@websocket") and re.search(p, path)), "/")
    handoff = re.search(r"error_page 418 = (@\w+);\s+if \(\$http_upgrade\) \{\s+return 418;", locations()[found])
    return handoff.group(1) if upgrade and handoff else found


def long_lived(location: str) -> bool:
    """Hour-long read and send timeouts: a WebSocket may stay open."""
    block = locations()[location]
    return all(int(directive(block, d).rstrip("s")) >= 3600 for d in ("proxy_read_timeout", "proxy_send_timeout"))


@pytest.mark.parametrize("name", SERVERS)
def test_both_instances_run_the_image_hardened_on_one_store(name):
    s = service(name)
    assert s["image"] == service(SERVERS[0])["image"]
    assert s["read_only"] is True and s["tmpfs"] == ["/tmp"] and s["cap_drop"] == ["ALL"]
    assert s["security_opt"] == ["no-new-privileges:true"]
    assert not s["user"].startswith("0:") and s["user"].endswith(":0")
    assert "model-store:/data/model-store" in s["volumes"]
    assert int(s["stop_grace_period"].rstrip("s")) > ServerConfig().graceful_timeout_s
    env = s["environment"]
    assert set(env) <= {f"POLICY_SERVER_{f.upper()}" for f in ServerConfig.__dataclass_fields__}
    assert {env["POLICY_SERVER_API_KEY_FILE"], env["POLICY_SERVER_ADMIN_KEY_FILE"]} == {
        f"/run/secrets/{secret}" for secret in s["secrets"]
    }
    assert set(s["secrets"]) <= set(COMPOSE["secrets"])


def test_each_instance_keeps_its_own_logs():
    logs = [next(v for v in service(n)["volumes"] if v.endswith(":/app/logs")) for n in SERVERS]
    assert len(set(logs)) == len(SERVERS)


def test_the_proxy_is_published_on_loopback_only_and_starts_after_the_instances():
    proxy = service("proxy")
    assert all(port.startswith("127.0.0.1:") and port.endswith(":8080") for port in proxy["ports"])
    assert set(proxy["depends_on"]) == set(SERVERS)
    assert proxy["read_only"] is True and proxy["cap_drop"] == ["ALL"]
    assert re.search(r"^\s+listen 8080;", NGINX, re.M)


def test_nginx_sends_to_both_instances_on_the_servers_port():
    upstream = re.search(r"upstream policy_servers \{([^}]*)\}", NGINX).group(1)
    assert re.findall(r"server (\S+?):(\d+)", upstream) == [(n, str(ServerConfig().port)) for n in SERVERS]


def test_body_limits_match_the_server():
    config = ServerConfig()
    assert size(re.search(r"^ {8}client_max_body_size (\w+);", NGINX, re.M).group(1)) == config.max_update_bytes
    for path, limit in (("/infer", config.max_body_bytes), ("/update_model", config.max_update_bytes)):
        assert size(directive(locations()[location_for(path)], "client_max_body_size")) == limit


def test_inference_is_buffered_and_may_go_to_the_other_instance_updates_never_twice():
    inference, update = locations()[location_for("/infer")], locations()[location_for("/update_model")]
    assert directive(inference, "proxy_request_buffering") == "on"
    assert "non_idempotent" in directive(inference, "proxy_next_upstream")
    assert directive(update, "proxy_request_buffering") == "off"
    assert "proxy_next_upstream" not in update  # the server-level rule: connection failures only
    assert "non_idempotent" not in re.search(r"^ {8}proxy_next_upstream ([^;]+);", NGINX, re.M).group(1)
    assert int(directive(update, "proxy_read_timeout").rstrip("s")) > 300  # the longest update wait


def test_websocket_upgrades_pass_with_long_timeouts():
    assert "proxy_http_version 1.1;" in NGINX
    assert "proxy_set_header Upgrade $http_upgrade;" in NGINX
    assert "proxy_set_header Connection $connection_upgrade;" in NGINX
    assert re.search(r"map \$http_upgrade \$connection_upgrade \{\s+default upgrade;", NGINX)
    assert long_lived("/") and long_lived("@websocket")
    for path in ("/", "/infer", "/models/x1/infer"):  # openpi's client dials these
        assert long_lived(location_for(path, upgrade=True)), path
    assert location_for("/infer", upgrade=True) == "@websocket" != location_for("/infer")
    assert location_for("/update_model", upgrade=True) == location_for("/update_model")


def test_every_route_goes_to_the_location_of_its_audience():
    """Inference routes to the retrying location, admin routes to the streaming one, WebSocket
    upgrades to a long-lived one, the rest to /."""
    expected = {"inference": location_for("/infer"), "admin": location_for("/update_model")}
    seen = set()
    for rule in create_app().url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?\w+>", "x1", rule.rule)
        if getattr(rule, "websocket", False):
            assert long_lived(location_for(path, upgrade=True)), (rule.rule, rule.endpoint)
            seen.add("websocket")
            continue
        audience = next((part for part in rule.endpoint.split(".") if part in expected), None)
        assert location_for(path) == expected.get(audience, "/"), (rule.rule, rule.endpoint)
        seen.add(audience)
    assert {"inference", "admin", "websocket", None} <= seen


def test_nginx_writes_only_to_tmp():
    paths = re.findall(r"^\s*(?:pid|\w+_temp_path) (\S+);", NGINX, re.M)
    assert len(paths) == 6 and all(p.startswith("/tmp/") for p in paths)
    assert "error_log stderr" in NGINX and "access_log /dev/stdout;" in NGINX
