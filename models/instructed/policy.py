"""Instructed policy: the default policy's keypoint CNN, steered by a text instruction.

Inputs ``state`` float32[6], ``image`` uint8[480, 640, 3] and ``prompt``, a text input
(UTF-8, at most ``MAX_PROMPT_BYTES`` bytes) such as ``"reach the red target"``; output
``action`` float32[10, 7], a chunk of 10 future 7-dof actions. Trained on the instructed
reacher (``examples/reacher_instructed.py``: a red and a blue disc, the instruction names
one) by ``examples/train_policies.py --model instructed``.

Tokenization is the model's own and needs no file: the prompt is lowercased and encoded as
UTF-8, each byte is a token (vocabulary 256, plus a padding id), cut or padded to
``MAX_PROMPT_BYTES``. The text encoder embeds the bytes (32 dims), runs two 1-D convolutions
of width 3 (so each position sees up to 5 bytes, enough for a word like "blue") and
max-pools over the real positions to a 64-dim instruction feature. The feature conditions
the image encoder by FiLM (Perez et al. 2018, "FiLM: Visual Reasoning with a General
Conditioning Layer"): a per-channel scale and shift of the 32 feature maps that score the
16 spatial-softmax keypoints, so the keypoints can follow the named disc; the MLP head sees
the keypoints, the state and the instruction feature. Every row is encoded on its own
(fixed length, no cross-row state), so a batch answers what each row answers alone.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from policy_server.contract import TensorSpec, TextSpec
from policy_server.torch_policy import ModulePolicy, SpatialSoftmax, conv_scaled_pixels, load_weights_strict

WEIGHTS = "model.safetensors"
CHUNK, DOF = 10, 7
MAX_PROMPT_BYTES = 128
PAD = 256  # the padding token: after the 256 byte values
INPUT_SPEC = (
    TensorSpec("state", "float32", (6,)),
    TensorSpec("image", "uint8", (480, 640, 3)),
    TextSpec("prompt", max_bytes=MAX_PROMPT_BYTES),
)
OUTPUT_SPEC = (TensorSpec("action", "float32", (CHUNK, DOF)),)

# As models/default: state [q1, q2, dq1, dq2, ee_x, ee_y] to about unit range, and the
# network's unit-range output to joint speeds (rad/s).
STATE_CENTRE = (1.6, 0.0, 0.0, 0.0, 0.0, 0.05)
STATE_SCALE = (2.0, 2.0, 3.0, 3.0, 0.2, 0.2)
ACTION_SCALE = 3.0


def tokenize(texts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """B prompts to int64 [B, MAX_PROMPT_BYTES]: the lowercased UTF-8 bytes, cut to the
    length, padded with ``PAD``."""
    ids = np.full((len(texts), MAX_PROMPT_BYTES), PAD, dtype=np.int64)
    for i, text in enumerate(texts):
        data = np.frombuffer(text.lower().encode("utf-8")[:MAX_PROMPT_BYTES], dtype=np.uint8)
        ids[i, : len(data)] = data
    return torch.from_numpy(ids).to(device)


class ByteEncoder(nn.Module):
    """Prompts (a list of B str) to float32 [B, dim]: byte embedding, two width-3 1-D convs,
    a max over the prompt's real bytes (0 for an empty prompt), a linear layer."""

    def __init__(self, dim: int = 64, embed: int = 32, channels: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(PAD + 1, embed, padding_idx=PAD)
        self.convs = nn.Sequential(
            nn.Conv1d(embed, channels, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, padding=1), nn.ReLU(),
        )
        self.out = nn.Linear(channels, dim)

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = tokenize(texts, self.embed.weight.device)
        features = self.convs(self.embed(ids).transpose(1, 2))  # [B, C, L], >= 0
        features = features.masked_fill((ids == PAD)[:, None, :], 0.0)
        return self.out(features.amax(dim=2))


class InstructedCnnMlp(nn.Module):
    def __init__(self, keypoints: int = 16, text_dim: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=8, stride=8),  # 60 x 80
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
        )
        self.text = ByteEncoder(text_dim)
        self.film = nn.Linear(text_dim, 2 * 32)  # per-channel (scale - 1, shift) of the feature maps
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.scores = nn.Conv2d(32, keypoints, kernel_size=1)  # one score map per keypoint
        self.keypoints = SpatialSoftmax(60, 80)
        self.state_mlp = nn.Sequential(nn.Linear(6, 64), nn.ReLU())
        self.head = nn.Sequential(
            nn.Linear(2 * keypoints + 64 + text_dim, 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, CHUNK * DOF),
        )
        self.register_buffer("state_centre", torch.tensor(STATE_CENTRE), persistent=False)
        self.register_buffer("state_scale", torch.tensor(STATE_SCALE), persistent=False)

    def forward(self, state: torch.Tensor, image: torch.Tensor, prompt: list[str]) -> dict[str, torch.Tensor]:
        """state float32 [B, 6], image uint8 [B, 480, 640, 3], prompt B str -> action float32 [B, 10, 7] (rad/s)."""
        if len(prompt) != state.shape[0]:
            raise ValueError(f"{len(prompt)} prompts for a batch of {state.shape[0]}")
        text = self.text(prompt)  # [B, text_dim]
        scale, shift = self.film(text)[:, :, None, None].chunk(2, dim=1)  # [B, 32, 1, 1] each
        x = conv_scaled_pixels(self.encoder[0], image)  # pixels scaled to [-1, 1], folded into the conv
        features = self.encoder[1:](x) * (1.0 + scale) + shift
        points = self.keypoints(self.scores(features))
        state = self.state_mlp((state - self.state_centre) / self.state_scale)
        action = self.head(torch.cat([points, state, text], dim=1)) * ACTION_SCALE
        return {"action": action.view(-1, CHUNK, DOF)}


def load_model(model_dir: str, device) -> ModulePolicy:
    module = InstructedCnnMlp()
    load_weights_strict(module, os.path.join(model_dir, WEIGHTS))
    policy = ModulePolicy(module, INPUT_SPEC, OUTPUT_SPEC, device=device, name="instructed")
    policy.encoded_inputs = ("image",)  # the camera may arrive JPEG/PNG encoded (opt in, client side)
    return policy
