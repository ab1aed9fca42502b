"""Request ids, the access log, /metrics and /stats: in-process, then across 4 gunicorn workers."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import requests

from binary_protocol import dict_to_binary
from policy_server.telemetry.stats import RequestStats, StatsReporter, summarize
from request_tools import PolicyClient
from tests.support.apps import make_app
from tests.support.fakes import fake_observation
from tests.support.prometheus import metric
from tests.support.serving import run_server
from tests.support.tiny_model import write_tiny_model
from tests.support.wait import eventually

BINARY = {"Content-Type": "application/octet-stream"}


def post(client, obs=None, headers=None):
    return client.post("/infer", data=dict_to_binary(obs or fake_observation(0)), headers={**BINARY, **(headers or {})})


def test_request_id_is_echoed_when_sane_and_made_otherwise(client):
    assert post(client, headers={"X-Request-Id": "robot-7.step:42"}).headers["X-Request-Id"] == "robot-7.step:42"
    for bad in ("has space", "x" * 129, "semi;colon"):
        made = post(client, headers={"X-Request-Id": bad}).headers["X-Request-Id"]
        assert made != bad and re.fullmatch(r"[0-9a-f]{32}", made)
    assert re.fullmatch(r"[0-9a-f]{32}", client.get("/health").headers["X-Request-Id"])


def test_one_structured_access_line_per_request(client, caplog):
    caplog.set_level(logging.INFO, logger="policy_server.access")
    post(client, headers={"X-Request-Id": "req-1"})
    post(client, obs={"state": fake_observation(0)["state"]}, headers={"X-Request-Id": "req-2"})
    client.get("/health")  # probes log at DEBUG only
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "policy_server.access"]
    assert [(line["request_id"], line["route"], line["status"]) for line in lines] == [
        ("req-1", "/infer", 200),
        ("req-2", "/infer", 422),
    ]
    assert lines[0]["batch_size"] == 1 and lines[0]["version"] == "fake-1" and lines[0]["model"] == "default"
    assert lines[0]["latency_ms"] > 0


def test_metrics_count_requests_and_batches(client):
    before = client.get("/metrics").get_data(as_text=True)
    for i in range(3):
        post(client, obs=fake_observation(i))
    post(client, obs={"state": fake_observation(0)["state"]})
    after = client.get("/metrics").get_data(as_text=True)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("policy_requests_total", route="/infer", status="200") == 3
    assert delta("policy_requests_total", route="/infer", status="422") == 1
    assert delta("policy_request_duration_seconds_count", route="/infer") == 4
    assert delta("policy_batch_size_count", model="default") == 3
    assert delta("policy_queue_wait_seconds_count") == 3
    assert metric(after, "policy_inflight_batches") == 0 and metric(after, "policy_queue_depth") == 0


def test_metrics_are_open_but_stats_need_the_key():
    app = make_app(api_key="k" * 16)
    client = app.test_client()
    assert client.get("/metrics").status_code == 200
    assert client.get("/stats").status_code == 401
    assert client.get("/stats", headers={"X-API-Key": "k" * 16}).status_code == 200


def test_stats_fields_are_present_and_consistent(client):
    for i in range(5):
        post(client, obs=fake_observation(i))
    post(client, obs={"state": fake_observation(0)["state"]})
    stats = client.get("/stats").get_json()
    assert (stats["workers"], stats["total_requests"], stats["failed_requests"]) == (1, 6, 1)
    assert stats["success_rate"] == pytest.approx(5 / 6)
    lat = stats["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["avg"] <= lat["max"]
    assert stats["stages_ms"]["queue"]["p50"] >= 0 and stats["stages_ms"]["compute"]["p50"] > 0
    assert stats["stages_ms"]["compute"]["max"] <= lat["max"]
    assert stats["throughput_rps"] == pytest.approx(0.6)  # 6 requests in the last 10 s
    assert stats["memory_mb"] > 10 and stats["cpu_percent"] >= 0


def test_summarize_merges_workers_and_windows_throughput():
    a, b = RequestStats(), RequestStats()
    for latency in (0.001, 0.002, 0.003):
        a.record(latency, True, 0.0001, 0.0005)
    b.record(0.010, True)
    b.record(0.5, False)
    snaps = [a.snapshot(), b.snapshot()]
    now = max(r[0] for s in snaps for r in s["recent"])
    merged = summarize(snaps, now=now)
    assert (merged["workers"], merged["total_requests"], merged["failed_requests"]) == (2, 5, 1)
    assert merged["latency_ms"]["max"] == 10.0 and merged["latency_ms"]["min"] == 1.0  # failures left out
    assert merged["throughput_rps"] == 0.5
    assert summarize(snaps, now=now + 11)["throughput_rps"] == 0.0
    assert summarize([])["success_rate"] is None and summarize([])["latency_ms"]["p50"] is None


@pytest.mark.integration
def test_a_worker_is_counted_in_stats_from_its_start_not_its_first_interval(tmp_path):
    """A worker's first snapshot is published when its reporter starts (before it logs
    ready), so /stats counts an idle worker at once; /stats once said 3 of 4 workers."""
    reporter = StatsReporter(RequestStats(), str(tmp_path), interval_s=3600)
    try:
        reporter.start()
        assert list(reporter.board.read()) == [os.getpid()]
        assert summarize(list(reporter.board.read().values()))["workers"] == 1
    finally:
        reporter.stop()


def test_metrics_and_stats_add_up_over_four_workers(tmp_path):
    root = tmp_path / "models"
    write_tiny_model(root / "tiny", tag=0.0)
    sent = 48
    with run_server(
        tmp_path, workers=4, args=("--model-path", str(root / "tiny"), "--model-root", str(root))
    ) as server:
        for i in range(sent):
            with PolicyClient(server.base_url) as client:  # a new connection each time: spread over workers
                client.infer(fake_observation(i))
        text = requests.get(server.base_url + "/metrics", timeout=10).text
        assert metric(text, "policy_requests_total", route="/infer", status="200") == sent
        assert metric(text, "policy_batch_size_count", model="default") == sent
        assert len(re.findall(r'^policy_model_version\{model="default",pid="\d+"\} 1.0$', text, re.M)) == 4

        def every_window_published() -> dict | None:  # siblings publish their statistics every second
            stats = requests.get(server.base_url + "/stats", timeout=10).json()
            return stats if stats["window_requests"] == sent and stats["workers"] == 4 else None

        stats = eventually(every_window_published, 10, f"/stats windows adding up to {sent}", every_s=0.2,
                           context=lambda: requests.get(server.base_url + "/stats", timeout=10).json())
        assert (stats["workers"], stats["total_requests"], stats["failed_requests"]) == (4, sent, 0)
        assert stats["window_requests"] == sent
