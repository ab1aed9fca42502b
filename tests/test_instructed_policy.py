"""The shipped instructed policy (models/instructed): loads with its text input, follows the
instruction, answers a batch of mixed prompts as it answers each row, and closes the loop
in-process through examples/sim_loop.py with the instruction in every observation."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from examples import sim_loop
from examples.local_policy import forward_one, load_local
from examples.reacher import expert_actions
from examples.reacher_instructed import COLOURS, InstructedReacherEnv, evaluate, with_prompt
from policy_server.errors import InvalidInput, ModelError
from policy_server.launcher import ROOT
from policy_server.model.loader import load_model_dir

MODEL_DIR = os.path.join(ROOT, "models", "instructed")
HELD_OUT = range(2_000_000, 2_000_006)  # seeds neither training nor train_policies' evaluation uses
PROMPT_ENTRY = {"name": "prompt", "dtype": "text", "shape": [], "max_bytes": 128}


@pytest.fixture(scope="module")
def model():
    return load_local(MODEL_DIR)


def test_loads_through_the_model_loader():
    loaded = load_model_dir(MODEL_DIR, "cpu")
    assert loaded.info()["inputs"][2] == PROMPT_ENTRY


def test_declares_state_image_and_a_prompt_and_answers_a_chunk(model):
    info = model.info()
    assert info["name"] == "instructed" and info["inputs"] == [
        {"name": "state", "dtype": "float32", "shape": [6]},
        {"name": "image", "dtype": "uint8", "shape": [480, 640, 3]},
        PROMPT_ENTRY,
    ]
    assert info["outputs"] == [{"name": "action", "dtype": "float32", "shape": [10, 7]}]
    obs = InstructedReacherEnv(0).reset()
    batch = {"state": torch.from_numpy(np.stack([obs["state"]] * 3)),
             "image": torch.from_numpy(np.stack([obs["image"]] * 3)),
             "prompt": ["reach the red target", "go to the blue one", ""]}
    action = model.policy.forward(batch)["action"]
    assert action.dtype == torch.float32 and action.shape == (3, 10, 7) and torch.isfinite(action).all()
    with pytest.raises(ValueError, match="2 prompts for a batch of 3"):
        model.policy.forward({**batch, "prompt": batch["prompt"][:2]})


def test_tokenizer_lowercases_cuts_and_pads_utf8_bytes():
    spec = importlib.util.spec_from_file_location("_test_instructed_policy", os.path.join(MODEL_DIR, "policy.py"))
    policy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(policy)
    ids = policy.tokenize(["Red", "é" * 100, ""])
    assert ids.shape == (3, 128) and ids.dtype == torch.int64
    assert ids[0, :3].tolist() == list(b"red") and (ids[0, 3:] == 256).all()
    assert ids[1].tolist() == list(("é" * 64).encode()) and (ids[2] == 256).all()


def test_two_instructions_on_one_observation_steer_to_their_own_targets(model):
    env = InstructedReacherEnv(4)
    obs = env.reset()
    chunks = {c: forward_one(model, {**obs, "prompt": f"go to the {c} one"})["action"] for c in COLOURS}
    assert not np.allclose(chunks["red"], chunks["blue"], atol=0.1)
    for colour in COLOURS:  # each chunk is nearer the expert's chunk toward its own disc than toward the other
        errors = {c: np.abs(chunks[colour][:, :2] - expert_actions(env.q, env.dq, env.positions[c])[:, :2]).mean()
                  for c in COLOURS}
        assert errors[colour] < errors[COLOURS[1 - COLOURS.index(colour)]], (colour, errors)


def test_a_batch_of_mixed_prompts_answers_what_each_row_answers_alone(model):
    observations = [InstructedReacherEnv(seed).reset() for seed in range(4)]
    prompts = ["reach the red target", "Bring the gripper to the blue one.", "touch red", "héad for the blue disc ✓"]
    batch = {"state": torch.from_numpy(np.stack([o["state"] for o in observations])),
             "image": torch.from_numpy(np.stack([o["image"] for o in observations])), "prompt": prompts}
    together = model.policy.forward(batch)["action"].numpy()
    for i, (obs, prompt) in enumerate(zip(observations, prompts, strict=True)):
        np.testing.assert_allclose(together[i], forward_one(model, {**obs, "prompt": prompt})["action"], atol=1e-5)


def test_the_in_process_call_checks_the_prompt_as_the_server_would(model):
    obs = InstructedReacherEnv(0).reset()
    with pytest.raises(InvalidInput, match="missing input 'prompt'"):
        forward_one(model, {k: v for k, v in obs.items() if k != "prompt"})
    with pytest.raises(InvalidInput, match="input 'prompt': expected text \\(a string\\), got ndarray"):
        forward_one(model, {**obs, "prompt": np.zeros(3)})
    with pytest.raises(InvalidInput, match="130 bytes of text; the model takes at most 128"):
        forward_one(model, {**obs, "prompt": "ü" * 65})


def test_follows_held_out_instructions_and_the_mismatched_ones_while_a_fixed_prompt_reaches_half(model):
    def chunk_fn(obs):
        return forward_one(model, obs)["action"]

    told = evaluate(chunk_fn, HELD_OUT, phrasings="held-out", staleness=2)
    swapped = evaluate(chunk_fn, HELD_OUT, phrasings="held-out", swap=True)
    assert told.success_rate >= 5 / 6 and swapped.success_rate >= 5 / 6, (told, swapped)
    fixed = evaluate(with_prompt(chunk_fn, "reach the red target"), HELD_OUT)
    named_red = []
    for seed in HELD_OUT:
        env = InstructedReacherEnv(seed)
        env.reset()
        named_red.append(env.colour == "red")
    assert not any(r.success for r, red in zip(fixed.results, named_red, strict=True) if not red)


def test_sim_loop_closes_the_loop_in_process_with_the_instruction_drawn_per_episode(tmp_path):
    out = tmp_path / "sim.json"
    result = sim_loop.main(["--models", "instructed", "--episodes", "3", "--seed", str(HELD_OUT[0]), "--skip-server",
                            "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    [report] = result["reports"]  # no server contacted
    assert (report["model"], report["path"], report["episodes"]) == ("instructed", "in-process", 3), report
    assert report["failures"] == 0 and report["chunks"] >= 3 and report["successes"] >= 2, report
    assert sim_loop.takes_text(sim_loop.in_process_policy(MODEL_DIR).model_info())


class RecordingPolicy:
    """A fake served policy that records each request and answers zeros."""

    def __init__(self, info) -> None:
        self.info, self.requests = info, []

    def __call__(self, obs):
        self.requests.append(dict(obs))
        return {"action": np.zeros((10, 7), np.float32)}

    def model_info(self):
        return self.info


def test_every_request_of_an_episode_carries_its_instruction_as_a_str(monkeypatch):
    monkeypatch.setattr(sim_loop.ReacherEnv, "max_steps", 12)
    info = {"inputs": [{"name": "state", "dtype": "float32", "shape": [6]},
                       {"name": "image", "dtype": "uint8", "shape": [480, 640, 3]}, PROMPT_ENTRY],
            "optional_inputs": []}
    fake = RecordingPolicy(info)
    sim_loop.run_episodes(fake, [1, 2], sim_loop.PathReport("fake", "server"), model_info=info)
    prompts = []
    for seed in (1, 2):
        env = InstructedReacherEnv(seed)
        env.reset()
        prompts.append(env.prompt)
    sent = [r["prompt"] for r in fake.requests]
    assert all(isinstance(p, str) for p in sent) and set(sent) == set(prompts), (sent, prompts)
    assert sent[0] == prompts[0] and sent[-1] == prompts[1]
    plain = RecordingPolicy({"inputs": info["inputs"][:2], "optional_inputs": []})
    sim_loop.run_episodes(plain, [1], sim_loop.PathReport("fake", "server"), model_info=plain.info)
    assert "prompt" not in plain.requests[0]  # a model without a text input gets the plain reacher


def test_load_local_refuses_what_the_loader_refuses_for_a_policy_without_text(tmp_path):
    (tmp_path / "policy.py").write_text(
        "class P:\n    input_spec = ()\n    output_spec = ()\n    def forward(self, batch):\n        return batch\n"
        "def load_model(model_dir, device):\n    return P()\n")
    with pytest.raises(ModelError, match="non-empty sequence of TensorSpec"):
        load_local(str(tmp_path))
