"""Transformer policy (action-chunking-transformer style) over the camera image and joint state.

Inputs ``state`` float32[6] and ``image`` uint8[480, 640, 3]; outputs ``action``
float32[10, 7], a chunk of 10 future 7-dof actions, and ``attention`` float32[4, 10, 301]:
for each of the 4 heads of the last cross-attention layer, how much each of the 10 action
queries attends to each token. Token 0 is the joint state; tokens 1..300 are the image's
32 x 32-pixel patches in row-major order (15 rows x 20 columns). Each attention row sums to 1.
``attention`` is an optional output: the policy lists it in ``optional_outputs`` and the
server returns it only to requests that ask for it.

Real-time chunking (Black et al. 2025, arXiv 2506.07339): the policy declares the optional
inputs ``action_prefix`` float32[10, 7], ``prefix_length`` int32[1] and ``inference_delay``
int32[1] (``policy_server.contract.rtc_specs``). Given them, the network's fresh chunk is
inpainted with the prefix (``policy_server.torch_policy.inpaint_prefix``): rows [0, d) are
the prefix exactly; later rows are the fresh chunk shifted by the offset between the prefix's
last committed row and the fresh chunk's, the shift falling to 0 as fast as the fresh
chunk's own largest step allows (``torch_policy.rtc_shift``: no played step exceeds it).
A request without them (zeros: prefix_length 0) gets the plain chunk. The network itself
does not take the prefix as an input (no retraining): it is a deterministic
regression policy, so a seam is new information rather than a change of mode, and the
inpainting spreads it over the chunk (docs/robot-loop.md "Real-time chunking").

Architecture: a conv stem (8x8 stride 8, then 4x4 stride 4) turns the image into 300 patch
tokens, a linear layer turns the state into one more token, learned positional embeddings
(initialised to 2-D sine-cosine) are added, one pre-norm encoder layer (self-attention and a
feed-forward) mixes them, and 10 learned action queries go through two decoder layers
(self-attention among the queries, cross-attention to the tokens, feed-forward) to a linear
read-out per query. Attention is written out with torch ops so its weights can be returned.
Trained by behaviour cloning on ``examples/reacher.py`` (``examples/train_policies.py
--model transformer``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from policy_server.contract import TensorSpec, rtc_specs
from policy_server.torch_policy import ModulePolicy, conv_scaled_pixels, inpaint_prefix, load_weights_strict

WEIGHTS = "model.safetensors"
CHUNK, DOF = 10, 7
DIM, HEADS, FFN = 64, 4, 192
GRID = (15, 20)  # image patches, rows x columns
TOKENS = 1 + GRID[0] * GRID[1]
INPUT_SPEC = (
    TensorSpec("state", "float32", (6,)),
    TensorSpec("image", "uint8", (480, 640, 3)),
    *rtc_specs(CHUNK, DOF),  # action_prefix, prefix_length, inference_delay: optional
)
OUTPUT_SPEC = (
    TensorSpec("action", "float32", (CHUNK, DOF)),
    TensorSpec("attention", "float32", (HEADS, CHUNK, TOKENS)),
)
OPTIONAL_OUTPUTS = ("attention",)

STATE_CENTRE = (1.6, 0.0, 0.0, 0.0, 0.0, 0.05)
STATE_SCALE = (2.0, 2.0, 3.0, 3.0, 0.2, 0.2)
ACTION_SCALE = 3.0


class Attention(nn.Module):
    """Multi-head attention that also returns its weights [B, heads, queries, keys]."""

    def __init__(self, dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, d = x.shape
        h = self.heads
        q = self.query(x).view(b, n, h, d // h).transpose(1, 2)  # [B, h, n, d/h]
        k, v = self.key_value(context).view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        if need_weights:
            weights = torch.softmax((q * (d // h) ** -0.5) @ k.transpose(-1, -2), dim=-1)  # [B, h, n, m]
            mixed = weights @ v
        else:  # the fused kernel, when nobody looks at the weights
            weights, mixed = None, F.scaled_dot_product_attention(q, k, v)
        return self.out(mixed.transpose(1, 2).reshape(b, n, d)), weights


def feed_forward(dim: int = DIM, hidden: int = FFN) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attention = Attention()
        self.ffn = feed_forward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        x = x + self.attention(y, y)[0]
        return x + self.ffn(x)


class DecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(DIM)
        self.self_attention = Attention()
        self.cross_norm = nn.LayerNorm(DIM)
        self.cross_attention = Attention()
        self.ffn = feed_forward()

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.self_norm(x)
        x = x + self.self_attention(y, y)[0]
        mixed, weights = self.cross_attention(self.cross_norm(x), memory, need_weights=True)
        x = x + mixed
        return x + self.ffn(x), weights


def sincos_2d(rows: int, columns: int, dim: int) -> torch.Tensor:
    """[rows * columns, dim] fixed 2-D sine-cosine embedding (half the channels per axis)."""
    quarter = dim // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter) / quarter))
    ys, xs = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(columns, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for axis in (xs.flatten(), ys.flatten()):
        angles = axis[:, None] * frequencies[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


class ChunkTransformer(nn.Module):
    def __init__(self, encoder_layers: int = 1, decoder_layers: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=8, stride=8),  # 60 x 80
            nn.ReLU(),
            nn.Conv2d(32, DIM, kernel_size=4, stride=4),  # 15 x 20 patches of 32 x 32 pixels
        )
        self.state_token = nn.Linear(6, DIM)
        self.state_query = nn.Linear(6, DIM)
        self.position = nn.Parameter(torch.cat([torch.zeros(1, DIM), sincos_2d(*GRID, DIM)]) * 0.5)
        self.encoder = nn.ModuleList(EncoderLayer() for _ in range(encoder_layers))
        self.memory_norm = nn.LayerNorm(DIM)
        self.queries = nn.Parameter(torch.randn(CHUNK, DIM) * 0.5)
        self.decoder = nn.ModuleList(DecoderLayer() for _ in range(decoder_layers))
        self.readout = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, DOF))
        self.register_buffer("state_centre", torch.tensor(STATE_CENTRE), persistent=False)
        self.register_buffer("state_scale", torch.tensor(STATE_SCALE), persistent=False)

    def forward(
        self,
        state: torch.Tensor,
        image: torch.Tensor,
        action_prefix: torch.Tensor | None = None,
        prefix_length: torch.Tensor | None = None,
        inference_delay: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        patches = self.stem[1:](conv_scaled_pixels(self.stem[0], image)).flatten(2).transpose(1, 2)
        state = (state - self.state_centre) / self.state_scale
        tokens = torch.cat([self.state_token(state)[:, None, :], patches], dim=1) + self.position
        for layer in self.encoder:
            tokens = layer(tokens)
        memory = self.memory_norm(tokens)
        x = self.queries + self.state_query(state)[:, None, :]  # every query knows the arm
        for layer in self.decoder:
            x, weights = layer(x, memory)
        action = self.readout(x) * ACTION_SCALE
        if action_prefix is not None:
            action = inpaint_prefix(action, action_prefix, prefix_length, inference_delay)
        return {"action": action, "attention": weights}


def load_model(model_dir: str, device) -> ModulePolicy:
    module = ChunkTransformer()
    load_weights_strict(module, os.path.join(model_dir, WEIGHTS))
    policy = ModulePolicy(module, INPUT_SPEC, OUTPUT_SPEC, device=device, name="transformer")
    policy.optional_outputs = OPTIONAL_OUTPUTS
    policy.encoded_inputs = ("image",)  # the camera may arrive JPEG/PNG encoded (opt in, client side)
    return policy
