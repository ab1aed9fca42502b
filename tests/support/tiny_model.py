"""A tiny model directory for model admin tests: every action equals the weights' tag.

``write_tiny_model(path, tag)`` writes ``policy.py`` and ``model.safetensors`` whose
output is ``tag`` everywhere (zero weight, bias = tag), so an answer proves which
version computed it. ``tiny_weights(tag)`` is the matching state dict, for weight pushes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

POLICY = '''
import os
import time

import torch
from torch import nn

from policy_server.contract import TensorSpec
from policy_server.torch_policy import ModulePolicy, load_weights_strict

INPUT_SPEC = (TensorSpec("state", "float32", (6,)), TensorSpec("image", "uint8", (8, 8, 3)))
OUTPUT_SPEC = (TensorSpec("action", "float32", (10, 7)),)


class Tiny(nn.Module):
    def __init__(self, forward_delay_s=0.0):
        super().__init__()
        self.linear = nn.Linear(7, 70)
        self.forward_delay_s = forward_delay_s

    def forward(self, state, image):
        time.sleep(self.forward_delay_s)
        x = torch.cat([state, image.float().mean(dim=(1, 2, 3))[:, None]], dim=1)
        return {"action": self.linear(x).view(-1, 10, 7)}


def load_model(model_dir, device):
    delay = os.path.join(model_dir, "load_delay_s")
    if os.path.exists(delay):
        time.sleep(float(open(delay).read()))
    if os.path.exists(os.path.join(model_dir, "raise_on_load")):
        raise RuntimeError("this model refuses to load")
    forward_delay = os.path.join(model_dir, "forward_delay_s")
    module = Tiny(float(open(forward_delay).read()) if os.path.exists(forward_delay) else 0.0)
    load_weights_strict(module, os.path.join(model_dir, "model.safetensors"))
    return ModulePolicy(module, INPUT_SPEC, OUTPUT_SPEC, device=device)
'''


def tiny_weights(tag: float) -> dict[str, np.ndarray]:
    return {
        "linear.weight": np.zeros((70, 7), np.float32),
        "linear.bias": np.full(70, tag, np.float32),
    }


def write_tiny_model(
    path: Path, tag: float, *, load_delay_s: float = 0.0, raise_on_load: bool = False, forward_delay_s: float = 0.0
) -> Path:
    """``forward_delay_s`` makes every forward pass that much slower (a slow server)."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "policy.py").write_text(POLICY)
    save_file(tiny_weights(tag), str(path / "model.safetensors"))
    if load_delay_s:
        (path / "load_delay_s").write_text(str(load_delay_s))
    if raise_on_load:
        (path / "raise_on_load").write_text("1")
    if forward_delay_s:
        (path / "forward_delay_s").write_text(str(forward_delay_s))
    return path


CANARY_CODE = "open({path!r}, 'w').write('ran')\n"


def write_linked_out_model(model_root: Path, tmp_path: Path, name: str = "evil") -> Path:
    """A tiny model whose ``policy.py`` is a link to a file outside ``model_root``; importing
    that file would write ``tmp_path / "canary"``. Returns the canary's path."""
    canary = tmp_path / "canary"
    outside = tmp_path / "outside_policy.py"
    outside.write_text(CANARY_CODE.format(path=str(canary)) + POLICY)
    model = write_tiny_model(model_root / name, tag=2.0)
    (model / "policy.py").unlink()
    (model / "policy.py").symlink_to(outside)
    return canary
