"""History policy: the default CNN's keypoints over the last two camera frames, for moving targets.

Inputs ``state`` float32[6] and ``image`` uint8[2, 480, 640, 3]: a history window of the last
two frames (row 1 the newest), padded at an episode's start by repeating its first frame, as
``/model_info`` declares (``"history": {"steps": 2, "pad": "repeat_first"}``). Output
``action`` float32[10, 7], a chunk of 10 future 7-dof actions.

With a moving target (``examples/reacher.py``, ``moving_target=True``) where the target is
is not enough: the policy must see where it goes, which needs two frames. Each frame goes
through one shared encoder (the default policy's: an 8x8 stride-8 patch conv, a 3x3 conv, a
1x1 conv to 16 keypoint score maps and a spatial softmax); the newest frame's keypoints, their
change since the previous frame (scaled by 10, so a step's motion is about unit size) and an
MLP over the joint state feed an MLP head. Trained by behaviour cloning with DAgger on the
moving-target reacher (``examples/train_policies.py --model history``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from policy_server.contract import History, TensorSpec
from policy_server.torch_policy import ModulePolicy, SpatialSoftmax, conv_scaled_pixels, load_weights_strict

WEIGHTS = "model.safetensors"
CHUNK, DOF, FRAMES = 10, 7, 2
INPUT_SPEC = (
    TensorSpec("state", "float32", (6,)),
    TensorSpec("image", "uint8", (FRAMES, 480, 640, 3), history=History(FRAMES, "repeat_first")),
)
OUTPUT_SPEC = (TensorSpec("action", "float32", (CHUNK, DOF)),)

STATE_CENTRE = (1.6, 0.0, 0.0, 0.0, 0.0, 0.05)
STATE_SCALE = (2.0, 2.0, 3.0, 3.0, 0.2, 0.2)
ACTION_SCALE = 3.0
MOTION_SCALE = 10.0


class HistoryCnnMlp(nn.Module):
    def __init__(self, keypoints: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=8, stride=8),  # 60 x 80
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, keypoints, kernel_size=1),
        )
        self.keypoints = SpatialSoftmax(60, 80)
        self.state_mlp = nn.Sequential(nn.Linear(6, 64), nn.ReLU())
        self.head = nn.Sequential(
            nn.Linear(4 * keypoints + 64, 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, CHUNK * DOF),
        )
        self.register_buffer("state_centre", torch.tensor(STATE_CENTRE), persistent=False)
        self.register_buffer("state_scale", torch.tensor(STATE_SCALE), persistent=False)

    def forward(self, state: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t = image.shape[:2]
        frames = image.reshape(b * t, *image.shape[2:])
        points = self.keypoints(self.encoder[1:](conv_scaled_pixels(self.encoder[0], frames))).view(b, t, -1)
        newest, motion = points[:, -1], (points[:, -1] - points[:, -2]) * MOTION_SCALE
        state = self.state_mlp((state - self.state_centre) / self.state_scale)
        action = self.head(torch.cat([newest, motion, state], dim=1)) * ACTION_SCALE
        return {"action": action.view(-1, CHUNK, DOF)}


def load_model(model_dir: str, device) -> ModulePolicy:
    module = HistoryCnnMlp()
    load_weights_strict(module, os.path.join(model_dir, WEIGHTS))
    return ModulePolicy(module, INPUT_SPEC, OUTPUT_SPEC, device=device, name="history")
