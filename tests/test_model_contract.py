"""Model declarations: optional inputs, history windows and real-time chunking in the contract
(``describe`` refuses incoherent ones), and the shipped transformer's real-time chunking."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from examples.reacher import ReacherEnv
from policy_client.chunk_merge import rtc_shift
from policy_server.contract import History, TensorSpec, rtc_specs
from policy_server.errors import ModelError
from policy_server.inputs.tensors import complete_inputs, sample_inputs
from policy_server.launcher import ROOT
from policy_server.model.loader import describe, load_model_dir
from policy_server.torch_policy import inpaint_prefix
from policy_server.torch_policy import rtc_shift as torch_rtc_shift
from tests.support.fakes import FAKE_OUTPUTS, FakePolicy

STATE = TensorSpec("state", "float32", (6,))


def policy_with(*inputs: TensorSpec) -> FakePolicy:
    policy = FakePolicy()
    policy.input_spec = inputs
    return policy


def described(*inputs: TensorSpec):
    return describe(policy_with(*inputs), name="p", version="1", device="cpu")


def test_optional_and_history_declarations_reach_model_info():
    model = described(STATE, TensorSpec("image", "uint8", (2, 4, 4, 3), history=History(2)), *rtc_specs(10, 7))
    info = model.info()
    assert info["optional_inputs"] == ["action_prefix", "prefix_length", "inference_delay"]
    assert info["inputs"][1]["history"] == {"steps": 2, "pad": "repeat_first"}
    assert model.real_time_chunking and model.optional_inputs == ("action_prefix", "prefix_length", "inference_delay")
    assert info["outputs"] == [s.to_json() for s in FAKE_OUTPUTS]


@pytest.mark.parametrize("inputs, fragment", [
    ((STATE, rtc_specs(10, 7)[0]), "needs all of"),
    ((STATE, TensorSpec("action_prefix", "float32", (10, 7)), *rtc_specs(10, 7)[1:]), "must be optional"),
    ((STATE, TensorSpec("action_prefix", "float32", (70,), optional=True), *rtc_specs(10, 7)[1:]), "float32[H, DOF]"),
    ((STATE, rtc_specs(10, 7)[0], TensorSpec("prefix_length", "int64", (1,), optional=True), rtc_specs(10, 7)[2]),
     "int32[1]"),
    ((TensorSpec("state", "float32", (6,), optional=True),), "at least one required"),
])
def test_describe_refuses_incoherent_declarations(inputs, fragment):
    with pytest.raises(ModelError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        described(*inputs)


def test_output_specs_cannot_be_optional():
    policy = FakePolicy()
    policy.output_spec = (TensorSpec("action", "float32", (10, 7), optional=True),)
    with pytest.raises(ModelError, match="input declarations"):
        describe(policy, name="p", version="1", device="cpu")


def test_history_shape_and_padding_are_checked():
    with pytest.raises(ValueError, match=r"needs shape \[3, ...\]"):
        TensorSpec("image", "uint8", (2, 4, 4, 3), history=History(3))
    with pytest.raises(ValueError, match="pad must be one of"):
        History(2, "mirror")
    with pytest.raises(ValueError, match=">= 1"):
        History(0)


def test_complete_inputs_fills_zeros_of_the_right_shape():
    spec = (STATE, *rtc_specs(10, 7))
    filled = complete_inputs({"state": np.ones(6, np.float32)}, spec)
    assert filled["action_prefix"].shape == (10, 7) and filled["action_prefix"].dtype == np.float32
    assert filled["prefix_length"].tolist() == [0] and filled["inference_delay"].dtype == np.int32
    rows = complete_inputs({"state": np.ones((3, 6), np.float32)}, spec, rows=3)
    assert rows["action_prefix"].shape == (3, 10, 7) and rows["prefix_length"].shape == (3, 1)
    sample = sample_inputs(spec, batch=20, seed=1)  # warm-up samples pass the row checks
    complete_inputs(sample, spec, rows=20)


# -- the shipped transformer ---------------------------------------------------------------


@pytest.fixture(scope="module")
def transformer():
    return load_model_dir(os.path.join(ROOT, "models", "transformer"), "cpu")


def forward(model, obs, **rtc):
    batch = {k: torch.from_numpy(np.asarray(v)[None]) for k, v in {**obs, **rtc}.items()}
    return model.policy.forward(batch)["action"][0].numpy()


def test_transformer_declares_real_time_chunking(transformer):
    info = transformer.info()
    assert info["optional_inputs"] == ["action_prefix", "prefix_length", "inference_delay"]
    assert {e["name"]: e["shape"] for e in info["inputs"]}["action_prefix"] == [10, 7]


@pytest.mark.parametrize("length, delay", [(7, 3), (10, 1), (4, 4), (5, 0), (2, 1)])
def test_transformer_keeps_the_prefix_for_d_rows_and_continues_smoothly(transformer, length, delay):
    obs = ReacherEnv(11).reset()
    fresh = forward(transformer, obs)
    off = np.array([1.0, -1.0, 0, 0, 0, 0, 0], np.float32)
    prefix = np.zeros((10, 7), np.float32)
    prefix[:length] = fresh[:length] + off  # an old plan, off by 1
    rtc = forward(transformer, obs, action_prefix=prefix, prefix_length=np.array([length], np.int32),
                  inference_delay=np.array([delay], np.int32))
    np.testing.assert_array_equal(rtc[:delay], prefix[:delay])  # exactly the prefix while it plays
    # After it, the fresh chunk shifted by the seam offset at the last committed row k, the
    # shift falling as fast as the fresh chunk's own largest step allows.
    k = max(delay - 1, 0)
    own = np.abs(np.diff(fresh, axis=0)).max()  # the policy's own largest step (all dims)
    np.testing.assert_allclose(rtc[delay:], fresh[delay:] + rtc_shift(fresh, off, k)[delay:], atol=1e-5)
    played = np.abs(np.diff(rtc, axis=0)).max(axis=1)
    assert played[k:].max() <= own + 1e-5, (played, own)  # no step from row k on beyond the policy's own
    # and it shrinks every row after k (the pull of the old plan as short as that allows)
    shift = np.abs(rtc - fresh)[k:, :2]
    assert np.all(np.diff(shift, axis=0) <= 1e-6) and shift[-1].max() < shift[0].max() - 0.3, shift


def test_rtc_shift_keeps_every_played_step_within_the_chunks_own_largest_step():
    """Whatever the gap, after inpainting no played step (from the last committed row on)
    is larger than the fresh chunk's own largest step-to-step change (max over dims, the
    seam-jerk norm); the shift reaches 0 once the chunk's motion leaves room for it; the
    torch and numpy twins agree."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        horizon = int(rng.integers(2, 12))
        chunk = np.cumsum(rng.normal(scale=rng.uniform(0.01, 0.5), size=(horizon, 3)), axis=0).astype(np.float32)
        length = int(rng.integers(1, horizon + 1))
        delay = int(rng.integers(0, length + 1))
        prefix = np.zeros((horizon, 3), np.float32)
        prefix[:length] = rng.normal(scale=rng.uniform(0.0, 3.0), size=(length, 3))
        out = inpaint_prefix(torch.from_numpy(chunk)[None], torch.from_numpy(prefix)[None],
                             torch.tensor([[length]]), torch.tensor([[delay]]))[0].numpy()
        np.testing.assert_array_equal(out[:delay], prefix[:delay])
        k = max(delay - 1, 0)
        np.testing.assert_allclose(out[k], prefix[k], atol=1e-5)  # it starts where the prefix leaves off
        own = np.abs(np.diff(chunk, axis=0)).max()
        assert np.abs(np.diff(out[k:], axis=0)).max(initial=0.0) <= own * (1 + 1e-5) + 1e-6, trial
        offset = (prefix[k] - chunk[k]).astype(np.float64)
        twin = rtc_shift(chunk, offset, k)
        torch_twin = torch_rtc_shift(torch.from_numpy(chunk)[None], torch.from_numpy(offset.astype(np.float32))[None],
                                     torch.tensor([[k]]))[0].numpy()
        np.testing.assert_allclose(torch_twin, twin, atol=1e-5)
        # |shift| shrinks by at least own - |step| per row after the anchor (0 once there is room)
        room = own - np.abs(np.diff(chunk.astype(np.float64), axis=0))[k:]
        assert np.all(np.abs(twin[k + 1:]) <= np.maximum(np.abs(twin[k:-1]) - room, 0.0) + 1e-5), trial
    # a chunk that moves 0.1 per row: a shift against its motion fades by 0.2 a row (the
    # played step -0.1), one along it cannot fade without a step over 0.1 and stays
    even = np.tile(np.arange(5, dtype=np.float64)[:, None] * 0.1, (1, 2))
    np.testing.assert_allclose(rtc_shift(even, np.array([0.3, -0.3]), 0),
                               [[0.3, -0.3], [0.1, -0.3], [0.0, -0.3], [0.0, -0.3], [0.0, -0.3]], atol=1e-12)
    # a dim that stands still while another moves fades at the other's pace
    still = np.stack([np.arange(5) * 0.1, np.zeros(5)], axis=1)
    np.testing.assert_allclose(rtc_shift(still, np.array([0.0, 0.25]), 1)[:, 1], [0.25, 0.25, 0.15, 0.05, 0.0])


def test_transformer_without_a_prefix_is_the_plain_chunk(transformer):
    obs = ReacherEnv(12).reset()
    zeros = dict(action_prefix=np.zeros((10, 7), np.float32), prefix_length=np.array([0], np.int32),
                 inference_delay=np.array([0], np.int32))
    np.testing.assert_array_equal(forward(transformer, obs, **zeros), forward(transformer, obs))


# -- the shipped history model -------------------------------------------------------------


def test_history_model_declares_a_two_frame_window_padded_with_the_first_frame():
    model = load_model_dir(os.path.join(ROOT, "models", "history"), "cpu")
    info = model.info()
    assert info["name"] == "history" and info["optional_inputs"] == []
    assert info["inputs"] == [
        {"name": "state", "dtype": "float32", "shape": [6]},
        {"name": "image", "dtype": "uint8", "shape": [2, 480, 640, 3], "history": {"steps": 2, "pad": "repeat_first"}},
    ]
    env = ReacherEnv(5, moving_target=True)
    first = env.reset()
    padded = {"state": first["state"], "image": np.stack([first["image"], first["image"]])}
    action = forward(model, padded)
    assert action.shape == (10, 7) and np.isfinite(action).all()
    # it reads the motion between its frames: the same newest frame after another one differs
    moved = env.step(np.zeros(7, np.float32)).obs
    still = forward(model, {"state": moved["state"], "image": np.stack([moved["image"], moved["image"]])})
    moving = forward(model, {"state": moved["state"], "image": np.stack([first["image"], moved["image"]])})
    assert np.abs(still - moving).max() > 1e-3


def test_the_benchmarks_numpy_mirror_of_the_rtc_inpainting_matches_the_servers():
    """``benchmarks/bench_chunking.py`` stays torch-free with its own copy of the inpainting;
    its stand-in sweep only says something about the server if the two agree."""
    path = os.path.join(ROOT, "benchmarks", "bench_chunking.py")
    spec = importlib.util.spec_from_file_location("bench_chunking", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    for length, delay in [(7, 3), (10, 1), (4, 4), (5, 0), (0, 0), (2, 1), (10, 10)]:
        chunk = rng.normal(size=(10, 2)).astype(np.float32)
        prefix = np.zeros((10, 2), np.float32)
        prefix[:length] = rng.normal(size=(length, 2))
        served = inpaint_prefix(
            torch.from_numpy(chunk)[None],
            torch.from_numpy(prefix)[None],
            torch.tensor([[length]]),
            torch.tensor([[delay]]),
        )[0].numpy()
        mirrored = bench.inpaint_prefix(chunk.astype(np.float64), prefix, length, delay)
        np.testing.assert_allclose(mirrored, served, atol=1e-6)