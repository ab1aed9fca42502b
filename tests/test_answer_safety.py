"""The answer's safety: never a non-finite action, never a late one.

Non-finite inputs are refused (422 naming the field) on every wire unless the model declares
the input may carry them; a non-finite output is refused (500 "non-finite output", counted,
logged with model and version) while its batch mates are answered; OIP JSON never carries
NaN tokens. A 2xx whose deadline passed before its status line was written is a 504.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time

import numpy as np
import pytest
import requests
import torch

from binary_protocol import binary_to_dict, dict_to_binary
from policy_server.contract import TensorSpec
from policy_server.errors import NonFiniteOutput
from policy_server.model.loader import describe
from policy_server.oip import codec as oip
from policy_server.serving.batcher import Batcher
from policy_server.serving.served import Served
from policy_server.telemetry import metrics
from tests.support.apps import make_app
from tests.support.fakes import FakePolicy, fake_observation
from tests.support.prometheus import metric
from tests.support.serving import run_server


def post(client, obs, rows=None):
    body = dict_to_binary(obs)
    headers = {"X-Batch-Rows": str(rows)} if rows else {}
    return client.post("/infer", data=body, headers=headers, environ_overrides={"CONTENT_LENGTH": str(len(body))})


def post_oip(client, header: dict, binary: bytes = b""):
    encoded = json.dumps(header).encode()
    headers = {oip.HEADER_LENGTH: str(len(encoded))} if binary else {}
    body = encoded + binary
    return client.post("/v2/models/default/infer", data=body, headers=headers,
                       environ_overrides={"CONTENT_LENGTH": str(len(body))})


@pytest.fixture(scope="module")
def client():
    return make_app().test_client()


# -- inputs -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_input_is_422_naming_it_on_every_wire(client, bad):
    obs = fake_observation()
    obs["state"][3] = bad
    response = post(client, obs)
    assert response.status_code == 422 and "'state'" in response.get_json()["detail"]
    assert "NaN or inf" in response.get_json()["detail"]
    image = {"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 3], "parameters": {"binary_data_size": 192}}
    state_binary = {"name": "state", "datatype": "FP32", "shape": [1, 6], "parameters": {"binary_data_size": 24}}
    response = post_oip(client, {"inputs": [state_binary, image]}, obs["state"].tobytes() + obs["image"].tobytes())
    assert response.status_code == 422 and "'state'" in response.get_json()["detail"]
    state_json = {"name": "state", "datatype": "FP32", "shape": [1, 6], "data": [float(v) for v in obs["state"]]}
    response = post_oip(client, {"inputs": [state_json, {**image, "parameters": {}, "data": [0] * 192}]})
    assert response.status_code == 422 and "'state'" in response.get_json()["detail"]  # NaN tokens parse


def test_a_vectorized_request_names_the_row(client):
    rows = [fake_observation(i) for i in range(4)]
    rows[2]["state"][0] = np.nan
    stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    response = post(client, stacked, rows=4)
    assert response.status_code == 422 and "'state' row 2" in response.get_json()["detail"]


class MissingReadings(FakePolicy):
    """A policy whose state may carry NaN for a missing reading (it reads NaN as 0)."""

    def __init__(self):
        super().__init__()
        self.input_spec = (TensorSpec("state", "float32", (6,), allow_nonfinite=True), self.input_spec[1])

    def forward(self, batch):
        return super().forward({**batch, "state": torch.nan_to_num(batch["state"], nan=0.0, posinf=0.0, neginf=0.0)})


def test_a_declared_input_may_carry_nan_and_model_info_says_so():
    client = make_app(MissingReadings()).test_client()
    obs = fake_observation()
    obs["state"][:] = np.nan
    response = post(client, obs)
    assert response.status_code == 200, response.get_json()
    assert np.isfinite(binary_to_dict(response.data)["action"]).all()
    inputs = {i["name"]: i for i in client.get("/model_info").get_json()["inputs"]}
    assert inputs["state"]["allow_nonfinite"] is True and "allow_nonfinite" not in inputs["image"]


# -- outputs ------------------------------------------------------------------------


def overflowing(seed: int) -> dict[str, np.ndarray]:
    """A finite observation whose answer overflows float32: the fake sums the state."""
    obs = fake_observation(seed)
    obs["state"][:] = 3e38
    return obs


def test_a_non_finite_output_is_refused_counted_and_logged(client, caplog):
    before = metric(metrics.exposition()[0].decode(), "policy_nonfinite_outputs_total", model="default",
                    version="fake-1")
    with caplog.at_level(logging.WARNING, logger="policy_server.serving.served"):
        response = post(client, overflowing(0))
    assert response.status_code == 500
    assert response.get_json()["error"] == "non-finite output" and "'action'" in response.get_json()["detail"]
    assert "model default version fake-1 answered NaN or inf in ['action']" in caplog.text
    after = metric(metrics.exposition()[0].decode(), "policy_nonfinite_outputs_total", model="default",
                   version="fake-1")
    assert after == before + 1
    assert post(client, fake_observation(1)).status_code == 200  # the worker serves on


def test_only_the_rows_with_non_finite_outputs_fail_their_batch_mates_are_answered():
    model = describe(FakePolicy(), name="fake", version="3", device="cpu")
    from policy_server.serving.executor import BatchExecutor

    served = Served(model, BatchExecutor(model, 4), 0.0)
    batcher = Batcher(served, max_batch_size=4)
    observations = [fake_observation(0), overflowing(1), fake_observation(2)]
    requests_ = [batcher.submit(obs, deadline=time.monotonic() + 60) for obs in observations]
    batcher.start()
    try:
        answers = []
        for request in requests_:
            try:
                answers.append(batcher.wait(request)[0]["action"])
            except NonFiniteOutput as exc:
                answers.append(exc)
    finally:
        batcher.stop(5)
    assert {r.batch_size for r in requests_} == {3}  # one batch
    assert isinstance(answers[1], NonFiniteOutput) and "version 3" in answers[1].detail
    assert np.isfinite(answers[0]).all() and np.isfinite(answers[2]).all()


def test_the_oip_encoder_never_writes_nan_tokens():
    with pytest.raises(NonFiniteOutput):
        oip.encode_response("m", "1", {"a": np.array([np.nan], np.float32)}, {"a": False}, None)
    body, _ = oip.encode_response("m", "1", {"a": np.array([1.5], np.float32)}, {"a": False}, None)
    assert b"NaN" not in body and json.loads(body)["outputs"][0]["data"] == [1.5]


# -- late answers, through the front door ------------------------------------------------


def test_no_2xx_is_written_past_its_deadline_under_load(tmp_path):
    """64 clients, each request due 50 ms after its first byte, two workers on 2 cores: many
    cannot make it. Every 200 the access log shows was committed within its 50 ms; the others
    are 504 (dropped before compute, after the batch, or at the door)."""
    deadline_ms = 50
    with run_server(tmp_path, workers=2, args=("--threads", "8")) as server:
        obs = dict_to_binary({"state": np.zeros(6, np.float32), "image": np.zeros((480, 640, 3), np.uint8)})

        def client(_):
            statuses = []
            with requests.Session() as session:
                for _ in range(10):
                    r = session.post(server.base_url + "/infer", data=obs, timeout=30,
                                     headers={"X-Deadline-Ms": str(deadline_ms)})
                    statuses.append(r.status_code)
            return statuses

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            statuses = [s for batch in pool.map(client, range(64)) for s in batch]
        text = requests.get(server.base_url + "/metrics", timeout=10).text
        lines = [json.loads(line[line.index("{"):]) for line in server.log().splitlines()
                 if '"route": "/infer"' in line]
    assert set(statuses) <= {200, 503, 504} and statuses.count(200) > 0, sorted(set(statuses))
    ok = [line["latency_ms"] for line in lines if line["status"] == 200]
    assert len(ok) == statuses.count(200)
    assert max(ok) <= deadline_ms, sorted(ok)[-10:]
    late = metric(text, "policy_late_answers_total", stage="write") + metric(text, "policy_late_answers_total",
                                                                           stage="batch")
    logging.getLogger(__name__).info(
        "%d requests: %d x 200, %d x 504 (%d late answers replaced), 200 latency max %.1f ms",
        len(statuses), statuses.count(200), statuses.count(504), late, max(ok),
    )
