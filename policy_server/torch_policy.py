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
