"""The model contract: loading a directory, strict weights, the default policy, warm-up checks."""

from __future__ import annotations

import shutil
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from policy_server.config import ServerConfig
from policy_server.errors import ModelError
from policy_server.inputs.tensors import sample_inputs
from policy_server.launcher import ROOT
from policy_server.model.files import digest as directory_digest
from policy_server.model.loader import load_model_dir
from policy_server.serving.runtime import PolicyRuntime
from tests.support.fakes import FakePolicy, run_in_process

DEFAULT = ROOT + "/models/default"


def test_default_policy_follows_the_contract():
    model = load_model_dir(DEFAULT, "cpu")
    info = model.info()
    assert info["name"] == "default" and info["device"] == "cpu"
    assert info["inputs"] == [
        {"name": "state", "dtype": "float32", "shape": [6]},
        {"name": "image", "dtype": "uint8", "shape": [480, 640, 3]},
    ]
    assert info["outputs"] == [{"name": "action", "dtype": "float32", "shape": [10, 7]}]
    assert 10_000 < info["num_parameters"] < 5_000_000 / 4
    assert info["version"] == directory_digest(DEFAULT)


def test_default_policy_batched_equals_unbatched():
    model = load_model_dir(DEFAULT, "cpu")
    batch = sample_inputs(model.input_spec, batch=4, seed=3)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    together = run_in_process(model, rows)
    for i, row in enumerate(rows):
        alone = run_in_process(model, [row])[0]
        np.testing.assert_allclose(together[i]["action"], alone["action"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(together[0]["action"], together[1]["action"])  # inputs matter


def test_weights_are_safetensors_and_small():
    import os
    files = os.listdir(DEFAULT)
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".bin"))]
    assert os.path.getsize(os.path.join(DEFAULT, "model.safetensors")) < 5 * 1024 * 1024


def copy_default(tmp_path):
    target = tmp_path / "model"
    shutil.copytree(DEFAULT, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_version_digest_changes_with_weights(tmp_path):
    target = copy_default(tmp_path)
    before = directory_digest(str(target))
    assert before == directory_digest(DEFAULT)
    state = load_model_dir(str(target), "cpu").policy.module.state_dict()
    state["head.2.bias"] = state["head.2.bias"] + 1
    save_file({k: v.contiguous() for k, v in state.items()}, str(target / "model.safetensors"))
    assert directory_digest(str(target)) != before


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_strict_weights(tmp_path, change):
    target = copy_default(tmp_path)
    state = load_model_dir(str(target), "cpu").policy.module.state_dict()
    if change == "missing":
        del state["head.0.weight"]
    elif change == "extra":
        state["unexpected"] = torch.zeros(1)
    else:
        state["head.0.weight"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(target / "model.safetensors"))
    with pytest.raises(ModelError, match="head.0.weight|unexpected"):
        load_model_dir(str(target), "cpu")


def test_directory_without_policy_or_load_model(tmp_path):
    with pytest.raises(ModelError, match="no policy.py"):
        load_model_dir(str(tmp_path), "cpu")
    (tmp_path / "policy.py").write_text("x = 1\n")
    with pytest.raises(ModelError, match="load_model"):
        load_model_dir(str(tmp_path), "cpu")


def test_policy_without_specs_is_refused(tmp_path):
    (tmp_path / "policy.py").write_text(textwrap.dedent("""
        class P:
            def forward(self, batch):
                return batch
        def load_model(model_dir, device):
            return P()
    """))
    with pytest.raises(ModelError, match="input_spec"):
        load_model_dir(str(tmp_path), "cpu")


def test_runtime_fails_warm_up_on_non_finite_outputs():
    runtime = PolicyRuntime(ServerConfig(), FakePolicy(output_nan=True))
    runtime.start(block=True)
    assert not runtime.ready
    assert "not finite" in runtime.failure


def test_runtime_reports_missing_model_directory(tmp_path):
    runtime = PolicyRuntime(ServerConfig(model_path=str(tmp_path / "nope"), model_store=str(tmp_path / "store")))
    runtime.start(block=True)
    assert not runtime.ready and "no policy.py" in runtime.failure
