"""A model directory loaded in this process, and one observation through it, text inputs included.

The examples and tests call policies in process the way the server does: loaded through
``policy_server.model.loader.load_model_dir`` (strict weights, the contract's checks), the
observation checked and completed by the server's own ``policy_server.inputs.tensors.complete_inputs``
(422-style ``InvalidInput`` naming the field, text inputs included), and handed a batch of one:
the tensors as ``[1, *shape]`` and each text input (a ``contract.TextSpec``, e.g. the
instructed policy's ``prompt``) as a list of one ``str``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from policy_server.contract import is_text
from policy_server.inputs.tensors import complete_inputs
from policy_server.model.loader import LoadedModel, load_model_dir


def load_local(model_dir: str, device: str = "cpu") -> LoadedModel:
    """``model_dir`` loaded through ``load_model_dir`` (ModelError as the server raises it)."""
    return load_model_dir(model_dir, device)


def forward_one(model: LoadedModel, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One observation through ``model.policy.forward`` as a batch of one, as the server
    hands it: checked against the spec (``InvalidInput`` naming the field), omitted optional
    inputs filled, each tensor ``[1, *shape]``, each text a list of one ``str``. Returns the
    outputs' row 0 as numpy."""
    import torch

    texts = {s.name for s in model.input_spec if is_text(s)}
    complete = complete_inputs(obs, model.input_spec)
    batch: dict[str, Any] = {
        k: [v] if k in texts else torch.from_numpy(np.ascontiguousarray(v)[None]) for k, v in complete.items()
    }
    return {k: v[0].numpy() for k, v in model.policy.forward(batch).items()}
