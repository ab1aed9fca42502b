"""A fake policy with a small, checkable forward, controllable latency and failures."""

from __future__ import annotations

import threading

import numpy as np
import torch

from policy_server.contract import TensorSpec

FAKE_INPUTS = (TensorSpec("state", "float32", (6,)), TensorSpec("image", "uint8", (8, 8, 3)))
FAKE_OUTPUTS = (TensorSpec("action", "float32", (10, 7)),)


def fake_observation(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "state": rng.standard_normal(6).astype(np.float32),
        "image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
    }


def expected_action(obs: dict[str, np.ndarray]) -> np.ndarray:
    """What FakePolicy answers for one observation: depends on every input value."""
    base = obs["state"].astype(np.float64).sum() + obs["image"].astype(np.float64).mean()
    return (base + np.arange(70, dtype=np.float64).reshape(10, 7)).astype(np.float32)


class FakePolicy:
    """``action = sum(state) + mean(image) + arange(70)``; ``gate`` blocks forward until set."""

    name = "fake"
    version = "fake-1"

    def __init__(self, *, fail: bool = False, delay_s: float = 0.0, gate: threading.Event | None = None,
                 output_nan: bool = False) -> None:
        self.input_spec = FAKE_INPUTS
        self.output_spec = FAKE_OUTPUTS
        self.fail = fail
        self.delay_s = delay_s
        self.gate = gate
        self.output_nan = output_nan
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait()
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        if self.fail:
            raise RuntimeError("secret internal failure detail")
        base = batch["state"].double().sum(1) + batch["image"].double().mean((1, 2, 3))
        action = base[:, None, None] + torch.arange(70, dtype=torch.float64).view(1, 10, 7)
        if self.output_nan:
            action = action * float("nan")
        return {"action": action.float()}

    def num_parameters(self) -> int:
        return 0


def run_in_process(model, observations):
    """Outputs of ``model`` (a LoadedModel) for ``observations``, as one in-process batch."""
    from policy_server.serving.executor import BatchExecutor

    executor = BatchExecutor(model, max_batch_size=len(observations))
    return executor.finish(executor.launch(observations))
