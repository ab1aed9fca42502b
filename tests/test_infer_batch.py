"""The client side of vectorized requests and optional inputs: ``PolicyClient.infer_batch``
through a real gunicorn, row-naming errors, and ``check_observation`` with optional inputs."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from request_tools import ObservationSpecError, PolicyClient, PolicyServerError, check_observation, stack_observations
from tests.support.fakes import fake_observation
from tests.support.serving import run_server
from tests.support.tiny_model import write_tiny_model

SPEC = [
    {"name": "state", "dtype": "float32", "shape": [6]},
    {"name": "action_prefix", "dtype": "float32", "shape": [10, 7], "optional": True},
]


def test_check_observation_accepts_a_missing_optional_input():
    state = {"state": np.zeros(6, np.float32)}
    check_observation(state, SPEC)
    check_observation({**state, "action_prefix": np.zeros((10, 7), np.float32)}, SPEC)
    with pytest.raises(ObservationSpecError, match="'action_prefix'.*shape"):
        check_observation({**state, "action_prefix": np.zeros((9, 7), np.float32)}, SPEC)
    with pytest.raises(ObservationSpecError, match="'state'.*missing"):
        check_observation({"action_prefix": np.zeros((10, 7), np.float32)}, SPEC)


def test_stack_observations_names_the_row_that_differs():
    rows = [fake_observation(i) for i in range(3)]
    assert stack_observations(rows)["image"].shape == (3, 8, 8, 3)
    rows[2] = {**rows[2], "state": np.zeros(5, np.float32)}
    with pytest.raises(ObservationSpecError, match="'state'.*row 2 is float32\\[5\\]"):
        stack_observations(rows)
    with pytest.raises(ObservationSpecError, match="'image'.*row 1 lacks it"):
        stack_observations([fake_observation(0), {"state": np.zeros(6, np.float32)}])


@pytest.mark.integration
def test_infer_batch_through_gunicorn_equals_one_call_per_observation(tmp_path):
    model = write_tiny_model(tmp_path / "models" / "tiny", 0.0)
    rng = np.random.default_rng(0)
    save_file({"linear.weight": rng.standard_normal((70, 7)).astype(np.float32),
               "linear.bias": rng.standard_normal(70).astype(np.float32)}, str(model / "model.safetensors"))
    observations = [fake_observation(i) for i in range(7)]
    args = ("--model-path", str(model), "--max-batch-size", "4")
    with run_server(tmp_path, workers=1, args=args) as server, PolicyClient(server.base_url) as client:
        actions = client.infer_batch(observations)["action"]
        assert actions.shape == (7, 10, 7) and actions.dtype == np.float32
        assert client.last_batch_size == 4  # 7 rows over a cap of 4: split into two batches
        for i, obs in enumerate(observations):
            np.testing.assert_allclose(actions[i], client.infer(obs)["action"], rtol=1e-6, atol=1e-5)  # fp32
        with pytest.raises(ObservationSpecError, match="row 3"):  # checked before sending
            client.infer_batch([*observations[:3], {"state": np.zeros(6, np.float32)}])
        unchecked = PolicyClient(server.base_url, check_spec=False)
        with pytest.raises(PolicyServerError) as caught:
            unchecked.infer_batch([{**o, "state": o["state"][:5]} for o in observations])
        assert caught.value.status == 422 and "'state'" in caught.value.detail
