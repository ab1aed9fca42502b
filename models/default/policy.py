"""Default policy: a small CNN with a spatial-softmax keypoint head and an MLP over the joint state.

Inputs ``state`` float32[6] and ``image`` uint8[480, 640, 3]; output ``action``
float32[10, 7], a chunk of 10 future 7-dof actions. Image normalisation happens inside the
module, so the served and in-process paths cannot preprocess differently.

The image goes through an 8x8 stride-8 patch conv (60 x 80 cells) and a 3x3 conv, then a 1x1
conv scores each cell for each of 16 keypoints; a softmax over the cells gives each keypoint's
expected (x, y) in [-1, 1]. Unlike a global average pool, this keeps *where* things are, which
is what a reaching task needs. The weights are trained by behaviour cloning on the reacher
task in ``examples/reacher.py`` (``examples/train_policies.py --model default``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from policy_server.contract import TensorSpec
from policy_server.torch_policy import ModulePolicy, SpatialSoftmax, conv_scaled_pixels, load_weights_strict

WEIGHTS = "model.safetensors"
CHUNK, DOF = 10, 7
INPUT_SPEC = (
    TensorSpec("state", "float32", (6,)),
    TensorSpec("image", "uint8", (480, 640, 3)),
)
OUTPUT_SPEC = (TensorSpec("action", "float32", (CHUNK, DOF)),)

# Fixed scales: state [q1, q2, dq1, dq2, ee_x, ee_y] to about unit range, and the network's
# unit-range output to joint speeds (rad/s).
STATE_CENTRE = (1.6, 0.0, 0.0, 0.0, 0.0, 0.05)
STATE_SCALE = (2.0, 2.0, 3.0, 3.0, 0.2, 0.2)
ACTION_SCALE = 3.0


class CnnMlp(nn.Module):
    def __init__(self, keypoints: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=8, stride=8),  # 60 x 80
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, keypoints, kernel_size=1),  # one score map per keypoint
        )
        self.keypoints = SpatialSoftmax(60, 80)
        self.state_mlp = nn.Sequential(nn.Linear(6, 64), nn.ReLU())
        self.head = nn.Sequential(
            nn.Linear(2 * keypoints + 64, 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, CHUNK * DOF),
        )
        self.register_buffer("state_centre", torch.tensor(STATE_CENTRE), persistent=False)
        self.register_buffer("state_scale", torch.tensor(STATE_SCALE), persistent=False)

    def forward(self, state: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = conv_scaled_pixels(self.encoder[0], image)  # pixels scaled to [-1, 1], folded into the conv
        points = self.keypoints(self.encoder[1:](x))
        state = self.state_mlp((state - self.state_centre) / self.state_scale)
        action = self.head(torch.cat([points, state], dim=1)) * ACTION_SCALE
        return {"action": action.view(-1, CHUNK, DOF)}


def load_model(model_dir: str, device) -> ModulePolicy:
    module = CnnMlp()
    load_weights_strict(module, os.path.join(model_dir, WEIGHTS))
    policy = ModulePolicy(module, INPUT_SPEC, OUTPUT_SPEC, device=device, name="default")
    policy.encoded_inputs = ("image",)  # the camera may arrive JPEG/PNG encoded (opt in, client side)
    return policy
