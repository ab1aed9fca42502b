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


def rtc_shift(action: torch.Tensor, offset: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """The shift real-time chunking adds to each row of a fresh chunk: [B, H, D], ``action``'s
    dtype, for ``action`` [B, H, D], the seam ``offset`` [B, D] and the anchor row ``anchor``
    (int tensor [B, 1]). Rows up to the anchor keep the whole offset; after it the shift falls
    towards 0 as fast as the chunk's own motion allows: with ``L`` the chunk's largest
    step-to-step change (max over rows and dims of ``|action[i] - action[i - 1]|``, the
    seam-jerk norm of ``examples/sim_loop.py``), each row's shift is the value nearest 0 that
    keeps the played step ``|action[i] + shift[i] - action[i - 1] - shift[i - 1]|`` within
    ``L`` in every dim. So no played step exceeds the policy's own largest step (by
    construction) and the old plan's pull ends as soon as that allows (a lag in a closed loop
    chasing a moving target; docs/robot-loop.md "Real-time chunking"). A chunk that does not
    move (L = 0) keeps the whole offset. Numpy twin: ``policy_client.chunk_merge.rtc_shift``.
    """
    steps = action.diff(dim=1)  # [B, H - 1, D]
    limit = steps.abs().amax(dim=(1, 2))[:, None] if steps.shape[1] else torch.zeros_like(offset[:, :1])
    shift, rows = offset.to(action.dtype), []
    for i in range(action.shape[1]):
        if i > 0:
            moved = shift - steps[:, i - 1]
            faded = torch.minimum(torch.maximum(torch.zeros_like(moved), moved - limit), moved + limit)
            shift = torch.where(anchor < i, faded, shift)
        rows.append(shift)
    return torch.stack(rows, dim=1)


def inpaint_prefix(
    action: torch.Tensor, prefix: torch.Tensor, prefix_length: torch.Tensor, inference_delay: torch.Tensor
) -> torch.Tensor:
    """A fresh chunk ``action`` [B, H, D] continuing the client's ``prefix`` [B, H, D]: rows
    [0, d) are the prefix exactly; every later row i is the fresh chunk shifted by
    :func:`rtc_shift` of the offset ``prefix[k] - action[k]``, k = max(d - 1, 0) the last
    committed row, so the chunk starts where the prefix leaves off, no step is larger than the
    fresh chunk's own largest step, and the shift is gone as soon as that allows (after
    Black et al. 2025, "Real-Time Execution of Action Chunking Flow Policies", arXiv
    2506.07339, whose soft mask decays the prefix's pull over the chunk). Prefix rows past k
    are not used (they are the old plan's guess, which the fresh chunk replaces).
    ``prefix_length`` 0 (the server's default when the request omits the inputs) returns
    ``action`` unchanged. Numpy mirror: ``benchmarks/bench_chunking.py`` ``inpaint_prefix``."""
    horizon = action.shape[1]
    k = (inference_delay.long() - 1).clamp(0, horizon - 1)  # [B, 1]
    index = k[:, :, None].expand(-1, 1, action.shape[2])
    offset = (torch.gather(prefix, 1, index) - torch.gather(action, 1, index))[:, 0]  # [B, D]
    rows = torch.arange(horizon, device=action.device)[None, :, None]
    committed = (rows < inference_delay.long()[:, :, None]) & (prefix_length[:, :, None] > 0)
    inpainted = torch.where(committed, prefix, action + rtc_shift(action, offset, k))
    return torch.where(prefix_length[:, :, None] > 0, inpainted, action)
