"""Vectorized requests (``X-Batch-Rows: N``): rows count toward the batch cap, split across
batches, answered in order and equal to unbatched; 422s name the field or the row; optional
inputs are filled by the server and share batches with requests that send them."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from binary_protocol import binary_to_dict, dict_to_binary
from policy_server.contract import TensorSpec, rtc_specs
from policy_server.errors import PayloadTooLarge, QueueFull
from policy_server.inputs.tensors import parse_batch_rows
from policy_server.launcher import ROOT
from policy_server.model.loader import load_model_dir
from tests.support.apps import assert_error, make_app, runtime_of
from tests.support.fakes import FakePolicy, expected_action, fake_observation
from tests.support.gated_executor import GatedExecutor, later, obs


def post(client, inputs, rows=None, route="/infer"):
    body = dict_to_binary(inputs)
    headers = {} if rows is None else {"X-Batch-Rows": str(rows)}
    return client.post(route, data=body, content_type="application/octet-stream", headers=headers,
                       environ_overrides={"CONTENT_LENGTH": str(len(body))})


def stacked(observations):
    return {k: np.stack([o[k] for o in observations]) for k in observations[0]}


class RtcFake(FakePolicy):
    """FakePolicy that declares the real-time chunking inputs; ``action = fake + action_prefix``
    plus ``10 * prefix_length + 100 * inference_delay`` on every entry (so defaults show)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.input_spec = (*self.input_spec, *rtc_specs(10, 7))

    def forward(self, batch):
        action = super().forward(batch)["action"]
        extra = 10.0 * batch["prefix_length"].float() + 100.0 * batch["inference_delay"].float()
        return {"action": action + batch["action_prefix"] + extra[:, :, None]}


def rtc_inputs(prefix_value: float, length: int, delay: int) -> dict[str, np.ndarray]:
    return {
        "action_prefix": np.full((10, 7), prefix_value, np.float32),
        "prefix_length": np.array([length], np.int32),
        "inference_delay": np.array([delay], np.int32),
    }


# -- the batcher -------------------------------------------------------------------------


def test_rows_count_toward_the_cap_and_split_across_batches_in_order(make_batcher):
    batcher, executor = make_batcher(max_batch_size=4)
    held = batcher.submit(obs(-1.0), later())  # holds the batcher so the rest queue up
    executor.entered.wait(5)
    single = batcher.submit(obs(1.0), later())
    rows = batcher.submit_rows([obs(float(v)) for v in (10, 11, 12, 13, 14)], later())
    executor.release()
    outputs, version = batcher.wait_rows(rows)
    assert version == "v1"
    assert [float(o["y"][0]) for o in outputs] == [20.0, 22.0, 24.0, 26.0, 28.0]  # in row order
    assert batcher.wait(single)[0]["y"][0] == 2.0 and batcher.wait(held)[0]["y"][0] == -2.0
    # 1 + 5 rows against a cap of 4: the single request and three rows, then the other two
    assert executor.batches[1:] == [[1.0, 10.0, 11.0, 12.0], [13.0, 14.0]]
    assert [r.batch_size for r in rows] == [4, 4, 4, 2, 2]


def test_rows_enter_the_queue_all_or_none(make_batcher):
    batcher, executor = make_batcher(max_batch_size=2, queue_size=4)
    with pytest.raises(PayloadTooLarge, match="5 rows exceed the queue size 4"):
        batcher.submit_rows([obs(1.0)] * 5, later())
    held = batcher.submit(obs(-1.0), later())
    executor.entered.wait(5)
    queued = batcher.submit_rows([obs(2.0)] * 3, later())
    with pytest.raises(QueueFull):
        batcher.submit_rows([obs(3.0)] * 2, later())  # 3 queued + 2 > 4: none of them enters
    assert batcher.depth == 3
    executor.release()
    batcher.wait(held)
    assert len(batcher.wait_rows(queued)[0]) == 3


class TwoVersions(GatedExecutor):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def finish(self, requests):
        self.calls += 1
        return [{"y": r.inputs["x"]} for r in requests], f"v{self.calls}"


def test_rows_answered_by_two_versions_are_refused(make_batcher):
    batcher, _ = make_batcher(TwoVersions(), max_batch_size=2)
    rows = batcher.submit_rows([obs(1.0)] * 3, later())
    with pytest.raises(Exception) as caught:
        batcher.wait_rows(rows)
    assert caught.value.status == 503 and "retry" in caught.value.detail


# -- through the app ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_app():
    policy = load_model_dir(os.path.join(ROOT, "models", "default"), "cpu").policy
    return make_app(policy, max_batch_size=4)


def test_vectorized_request_over_two_batches_equals_unbatched(default_app):
    rng = np.random.default_rng(0)
    observations = [
        {"state": rng.standard_normal(6).astype(np.float32),
         "image": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)} for _ in range(6)
    ]
    runtime = runtime_of(default_app)
    client = default_app.test_client()
    before = runtime.batcher.batches
    response = post(client, stacked(observations), rows=6)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert runtime.batcher.batches - before == 2  # 6 rows, cap 4
    assert response.headers["X-Batch-Rows"] == "6" and response.headers["X-Batch-Size"] == "4"
    actions = binary_to_dict(response.get_data())["action"]
    assert actions.shape == (6, 10, 7) and actions.dtype == np.float32
    for i, one in enumerate(observations):
        alone = binary_to_dict(post(client, one).get_data())["action"]
        np.testing.assert_allclose(actions[i], alone, rtol=0, atol=1e-5)


def test_one_row_request_answers_a_leading_dimension_of_one(client):
    observation = fake_observation(3)
    response = post(client, {k: v[None] for k, v in observation.items()}, rows=1)
    assert response.status_code == 200
    np.testing.assert_array_equal(binary_to_dict(response.get_data())["action"], expected_action(observation)[None])


@pytest.mark.parametrize("header", ["zero", "0", "-3", "+3", "1_0", "\u0663", "3.0", "", "9" * 19])
def test_a_bad_batch_rows_header_is_400(client, header):
    body = dict_to_binary(fake_observation(0))
    response = client.post("/infer", data=body, content_type="application/octet-stream",
                           headers={"X-Batch-Rows": header}, environ_overrides={"CONTENT_LENGTH": str(len(body))})
    assert_error(response, 400, "X-Batch-Rows must be a positive integer")


def test_a_leading_dimension_that_is_not_n_is_422_naming_the_field(client):
    inputs = stacked([fake_observation(i) for i in range(3)])
    inputs["image"] = inputs["image"][:2]
    assert_error(post(client, inputs, rows=3), 422, "'image'", "[3, 8, 8, 3]", "[2, 8, 8, 3]")
    single = fake_observation(0)  # no leading dimension at all
    assert_error(post(client, single, rows=5), 422, "X-Batch-Rows 5", "'state'", "[5, 6]")


def test_a_per_row_problem_is_422_naming_the_row():
    client = make_app(RtcFake()).test_client()
    rows = [{**fake_observation(i), **rtc_inputs(0.0, 4, 2)} for i in range(4)]
    rows[2]["inference_delay"] = np.array([5], np.int32)  # beyond its prefix_length 4
    assert_error(post(client, stacked(rows), rows=4), 422, "row 2", "inference_delay 5")
    rows[2] = {**fake_observation(2), **rtc_inputs(np.nan, 4, 2)}
    assert_error(post(client, stacked(rows), rows=4), 422, "row 2", "'action_prefix' row 2: holds NaN")
    one = {**fake_observation(0), **rtc_inputs(0.0, 11, 0)}
    assert_error(post(client, one), 422, "prefix_length 11 is outside 0..10")


def test_more_rows_than_the_queue_holds_is_413():
    client = make_app(queue_size=4).test_client()
    response = post(client, stacked([fake_observation(i) for i in range(5)]), rows=5)
    assert_error(response, 413, "5 rows exceed the queue size 4")


def test_a_vectorized_request_is_cached_whole(client):
    app = make_app(cache_size=8, cache_ttl_s=60)
    client = app.test_client()
    inputs = stacked([fake_observation(i) for i in range(3)])
    first, second = post(client, inputs, rows=3), post(client, inputs, rows=3)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("miss", "hit")
    assert first.get_data() == second.get_data()
    single = post(client, fake_observation(0))  # row 0 alone is another key
    assert single.headers["X-Cache"] == "miss"


# -- optional inputs -----------------------------------------------------------------------


def test_optional_inputs_are_filled_by_the_server_and_share_a_batch():
    app = make_app(RtcFake())
    runtime = runtime_of(app)
    client = app.test_client()
    observation = fake_observation(5)
    plain = binary_to_dict(post(client, observation).get_data())["action"]
    np.testing.assert_array_equal(plain, expected_action(observation))  # zeros: no prefix, no offset
    with_prefix = binary_to_dict(post(client, {**observation, **rtc_inputs(1.0, 3, 1)}).get_data())["action"]
    np.testing.assert_allclose(with_prefix, expected_action(observation) + 1.0 + 30.0 + 100.0)
    # same compatibility key, hence one batch: the filled request looks like the full one
    without = runtime.submit(observation, later())
    full = runtime.submit({**observation, **rtc_inputs(2.0, 5, 2)}, later())
    assert without.key == full.key
    assert runtime.wait(without)[0]["action"][0, 0] == expected_action(observation)[0, 0]
    runtime.wait(full)
    # a vectorized request may omit them too
    rows = post(client, stacked([observation, observation]), rows=2)
    np.testing.assert_array_equal(binary_to_dict(rows.get_data())["action"], np.stack([plain, plain]))


def test_a_model_without_optional_inputs_refuses_them(client):
    response = post(client, {**fake_observation(0), **rtc_inputs(0.0, 0, 0)})
    assert_error(response, 422, "unexpected input 'action_prefix'")


def test_model_info_declares_optional_inputs_and_history():
    info = make_app(RtcFake()).test_client().get("/model_info").get_json()
    assert info["optional_inputs"] == ["action_prefix", "prefix_length", "inference_delay"]
    by_name = {e["name"]: e for e in info["inputs"]}
    assert by_name["action_prefix"] == {"name": "action_prefix", "dtype": "float32", "shape": [10, 7], "optional": True}
    assert by_name["prefix_length"]["optional"] and by_name["inference_delay"]["shape"] == [1]
    assert "optional" not in by_name["state"] and "history" not in by_name["state"]
    plain = make_app().test_client().get("/model_info").get_json()
    assert plain["optional_inputs"] == []

    class Windowed(FakePolicy):
        def __init__(self):
            super().__init__()
            from policy_server.contract import History

            self.input_spec = (TensorSpec("state", "float32", (3, 6), history=History(3, "zeros")),)

        def forward(self, batch):
            return {"action": torch.zeros(len(batch["state"]), 10, 7)}

    info = make_app(Windowed()).test_client().get("/model_info").get_json()
    assert info["inputs"] == [{"name": "state", "dtype": "float32", "shape": [3, 6],
                               "history": {"steps": 3, "pad": "zeros"}}]


def test_parse_batch_rows():
    assert parse_batch_rows(None) is None
    assert parse_batch_rows(" 64 ") == 64


def test_the_executor_fills_an_optional_input_a_queued_request_lacks():
    """A request queued before a hot swap added an optional input still stages."""
    from policy_server.model.loader import describe
    from tests.support.fakes import run_in_process

    model = describe(RtcFake(), name="rtc", version="1", device="cpu")
    observation = fake_observation(8)
    rows = run_in_process(model, [observation, {**observation, **rtc_inputs(1.0, 2, 1)}])
    np.testing.assert_array_equal(rows[0]["action"], expected_action(observation))
    np.testing.assert_allclose(rows[1]["action"], expected_action(observation) + 1.0 + 20.0 + 100.0)
