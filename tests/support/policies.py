"""Model sources and observations for tests against a real server."""

from __future__ import annotations

import numpy as np

from policy_server.contract import TensorSpec
from policy_server.inputs.tensors import sample_inputs

DEFAULT_SPEC = (TensorSpec("state", "float32", (6,)), TensorSpec("image", "uint8", (480, 640, 3)))

# A model directory's policy.py whose forward takes 0.15 s: x float32[4] -> y = 2 x.
SLOW_POLICY = """
import time
from policy_server.contract import TensorSpec


class Slow:
    input_spec = (TensorSpec("x", "float32", (4,)),)
    output_spec = (TensorSpec("y", "float32", (4,)),)

    def forward(self, batch):
        time.sleep(0.15)
        return {"y": batch["x"] * 2}


def load_model(model_dir, device):
    return Slow()
"""


def observation(seed: int) -> dict[str, np.ndarray]:
    """A random observation for the default model: state float32[6], image uint8[480, 640, 3]."""
    sample = sample_inputs(DEFAULT_SPEC, batch=1, seed=seed)
    return {name: value[0] for name, value in sample.items()}
