"""Default policy: a small CNN over the camera image and an MLP over the joint state.

Inputs ``state`` float32[6] and ``image`` uint8[480, 640, 3]; output ``action``
float32[10, 7], a chunk of 10 future 7-dof actions. Image normalisation happens inside the
module, so the served and in-process paths cannot preprocess differently.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from policy_server.contract import TensorSpec
from policy_server.torch_policy import ModulePolicy, load_weights_strict

WEIGHTS = "model.safetensors"
CHUNK, DOF = 10, 7
INPUT_SPEC = (
    TensorSpec("state", "float32", (6,)),
    TensorSpec("image", "uint8", (480, 640, 3)),
)
OUTPUT_SPEC = (TensorSpec("action", "float32", (CHUNK, DOF)),)


class CnnMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=8, stride=8),  # 60 x 80
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=4, stride=4),  # 15 x 20
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1),  # 8 x 10
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.state_mlp = nn.Sequential(nn.Linear(6, 64), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, CHUNK * DOF))

    def forward(self, state: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        # The first conv sees pixels scaled to [-1, 1]: conv(w, 2x/255 - 1) equals
        # conv(2w/255, x) with bias b - sum(w), so the scaling is folded into its weights
        # instead of making two more passes over a float copy of every image.
        first = self.encoder[0]
        weight = first.weight * (2.0 / 255.0)
        bias = first.bias - first.weight.sum(dim=(1, 2, 3))
        pixels = image.permute(0, 3, 1, 2).float()  # NHWC memory, i.e. channels_last
        x = F.conv2d(pixels, weight, bias, stride=first.stride, padding=first.padding)
        features = torch.cat([self.encoder[1:](x), self.state_mlp(state)], dim=1)
        return {"action": self.head(features).view(-1, CHUNK, DOF)}


def load_model(model_dir: str, device) -> ModulePolicy:
    module = CnnMlp()
    load_weights_strict(module, os.path.join(model_dir, WEIGHTS))
    return ModulePolicy(module, INPUT_SPEC, OUTPUT_SPEC, device=device, name="default")
