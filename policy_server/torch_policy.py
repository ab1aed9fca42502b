"""Helpers for policy.py files: wrap a torch module as a policy, load safetensors strictly.

Imported only inside workers (by a model's policy.py), so it may import torch at the top.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from policy_server.contract import TensorSpec
from policy_server.errors import ModelError


class ModulePolicy:
    """A policy around an ``nn.Module`` whose ``forward(**inputs)`` returns a dict of tensors."""

    def __init__(
        self,
        module: torch.nn.Module,
        input_spec: Sequence[TensorSpec],
        output_spec: Sequence[TensorSpec],
        *,
        device: torch.device | str,
        name: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.input_spec = tuple(input_spec)
        self.output_spec = tuple(output_spec)
        if name is not None:
            self.name = name

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return self.module(**batch)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


class SpatialSoftmax(torch.nn.Module):
    """[B, K, H, W] scores to [B, 2K] expected (x, y) per channel, in [-1, 1] image coordinates
    (the spatial softmax keypoint layer of Levine et al. 2016, "End-to-End Training of Deep
    Visuomotor Policies"). Its one parameter is the softmax temperature (log scale)."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.flatten(), ys.flatten()], dim=1), persistent=False)
        self.log_temperature = torch.nn.Parameter(torch.zeros(()))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(scores.flatten(2) / self.log_temperature.exp(), dim=-1)  # [B, K, HW]
        return (weights @ self.grid).flatten(1)  # [B, K * 2]


def conv_scaled_pixels(conv: torch.nn.Conv2d, image: torch.Tensor) -> torch.Tensor:
    """``conv`` applied to uint8 NHWC ``image`` scaled to [-1, 1], without a scaled copy.

    conv(w, 2x/255 - 1) equals conv(2w/255, x) with bias b - sum(w), so the scaling is
    folded into the weights instead of making two more passes over a float copy of every
    image. Equal to scaling first only for ``padding=0`` (padded zeros are not rescaled).
    """
    weight = conv.weight * (2.0 / 255.0)
    bias = conv.bias - conv.weight.sum(dim=(1, 2, 3))
    pixels = image.permute(0, 3, 1, 2).float()  # NHWC memory, i.e. channels_last
    return F.conv2d(pixels, weight, bias, stride=conv.stride, padding=conv.padding)


def load_weights_strict(module: torch.nn.Module, path: str) -> None:
    """Load a safetensors file into ``module``: every key present, no extra keys, same shapes."""
    state = load_file(path, device="cpu")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelError(f"{path}: missing keys {missing}, unexpected keys {extra}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape or tensor.dtype != expected[key].dtype:
            raise ModelError(
                f"{path}: {key} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"model expects {tuple(expected[key].shape)} {expected[key].dtype}"
            )
    module.load_state_dict(state, strict=True)


def rtc_weights(horizon: int, prefix_length: torch.Tensor, inference_delay: torch.Tensor) -> torch.Tensor:
    """Real-time chunking's soft mask [B, horizon] float32 over a chunk's rows (after Black et
    al. 2025, "Real-Time Execution of Action Chunking Flow Policies", arXiv 2506.07339, eq. 5).

    With n = ``prefix_length`` and d = ``inference_delay`` (int tensors [B, 1]): weight 1 for
    rows i < d (they play before the new chunk can arrive, so they must equal the prefix),
    ``(n - i) / (n - d)`` for d <= i < n (a linear ramp from 1 at row d to 0 at row n), and
    0 from row n on. The paper's eq. 5 uses ``c * (e^c - 1) / (e - 1)`` with
    ``c = (n - i) / (n - d + 1)``: that leaves row d a weight below 1 (0.19 when n = d + 1,
    an 81% jump to the fresh chunk right where it starts playing), and even with row d at 1
    its exponential drops half the gap in the first step after it. The linear ramp spreads
    the gap evenly, 1 / (n - d) of it per step, the smallest largest step (measured:
    DEVELOPMENT.md "Robot loop v2"). Numpy mirror, for torch-free code:
    ``benchmarks/bench_chunking.py`` ``rtc_weights``.
    """
    i = torch.arange(horizon, device=prefix_length.device, dtype=torch.float32)[None, :]
    n = prefix_length.to(torch.float32)
    d = inference_delay.to(torch.float32)
    c = ((n - i) / (n - d).clamp_min(1.0)).clamp(0.0, 1.0)
    return torch.where(i < d, torch.ones_like(c), torch.where(i < n, c, torch.zeros_like(c)))


def inpaint_prefix(
    action: torch.Tensor, prefix: torch.Tensor, prefix_length: torch.Tensor, inference_delay: torch.Tensor
) -> torch.Tensor:
    """A fresh chunk ``action`` [B, H, D] continuing the client's ``prefix`` [B, H, D]: rows
    [0, d) are the prefix exactly, rows [d, n) blend prefix into the fresh chunk with
    :func:`rtc_weights`, rows from n on are the fresh chunk. ``prefix_length`` 0 (the server's
    default when the request omits the inputs) returns ``action`` unchanged."""
    weights = rtc_weights(action.shape[1], prefix_length, inference_delay).to(action.dtype)[..., None]
    blended = weights * prefix + (1.0 - weights) * action
    return torch.where(weights == 1.0, prefix, blended)
