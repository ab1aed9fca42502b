"""A model directory loaded in this process, and one observation through it, text inputs included.

The examples and tests call policies in process the way the server does: loaded through
``policy_server.model_loader.load_model_dir`` (strict weights, the contract's checks) and
handed a batch of one, the tensors as ``[1, *shape]`` and each text input (a
``contract.TextSpec``, e.g. the instructed policy's ``prompt``) as a list of one ``str``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from policy_server.contract import POLICY_FILE, TensorSpec, TextSpec, directory_digest, is_text
from policy_server.errors import ModelError
from policy_server.model_loader import LoadedModel, describe, load_model_dir
from policy_server.tensors import complete_inputs


@functools.cache
def loader_takes_text() -> bool:
    """True when ``model_loader.describe`` accepts a policy that declares a ``TextSpec``."""

    class Probe:
        input_spec = (TensorSpec("x", "float32", (1,)), TextSpec("prompt"))
        output_spec = (TensorSpec("y", "float32", (1,)),)

        def forward(self, batch):
            return batch

    try:
        describe(Probe(), name="probe", version="0", device="cpu")
    except ModelError:
        return False
    return True


def load_local(model_dir: str, device: str = "cpu") -> LoadedModel:
    """``model_dir`` loaded through ``load_model_dir``.

    TEMPORARY (issue 21, part 1 not yet on this branch): while ``model_loader.describe``
    refuses a ``TextSpec`` (:func:`loader_takes_text` False), a policy that declares one is
    loaded by its own ``load_model`` (still strict about its weights) and described by
    :func:`_described`, without the loader's spec checks. Delete the fallback once the
    loader takes text.
    """
    try:
        return load_model_dir(model_dir, device)
    except ModelError:
        if loader_takes_text():
            raise
        model_dir = os.path.abspath(model_dir)
        spec = importlib.util.spec_from_file_location(
            f"_local_policy_{directory_digest(model_dir, suffix='.py')}", os.path.join(model_dir, POLICY_FILE))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        policy = module.load_model(model_dir, device)
        if not any(is_text(s) for s in policy.input_spec):
            raise
    return _described(policy, model_dir, device)


def _described(policy: Any, model_dir: str, device: str) -> LoadedModel:
    """What ``model_loader.describe`` returns for ``policy``, the contract's defaults filled in."""
    digest = directory_digest(model_dir)
    return LoadedModel(
        policy=policy,
        name=getattr(policy, "name", os.path.basename(model_dir)),
        version=getattr(policy, "version", digest),
        device=device,
        num_parameters=int(policy.num_parameters()),
        input_spec=tuple(policy.input_spec),
        output_spec=tuple(policy.output_spec),
        digest=digest,
        optional_outputs=tuple(getattr(policy, "optional_outputs", ())),
        encoded_inputs=tuple(getattr(policy, "encoded_inputs", ())),
    )


def text_of(obs: Mapping[str, Any], spec: TextSpec) -> str:
    """The value of text input ``spec`` in ``obs`` (its default when optional and absent).

    Raises ValueError naming the field: missing when required, not a ``str``, or over
    ``spec.max_bytes`` bytes of UTF-8.
    """
    if spec.name not in obs:
        if spec.optional:
            return spec.default
        raise ValueError(f"missing text input {spec.name!r}")
    text = obs[spec.name]
    if not isinstance(text, str):
        raise ValueError(f"text input {spec.name!r}: expected str, got {type(text).__name__}")
    if len(text.encode("utf-8")) > spec.max_bytes:
        raise ValueError(f"text input {spec.name!r}: over {spec.max_bytes} bytes of UTF-8")
    return text


def split_texts(obs: Mapping[str, Any], input_spec) -> tuple[dict[str, Any], dict[str, str]]:
    """``obs`` as (its tensor inputs, its text inputs by name) for ``input_spec``; every text
    input is checked (:func:`text_of`) and present in the second dict."""
    texts = {s.name: text_of(obs, s) for s in input_spec if is_text(s)}
    return {k: v for k, v in obs.items() if k not in texts}, texts


def forward_one(model: LoadedModel, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One observation through ``model.policy.forward`` as a batch of one, as the server
    hands it: the tensors checked against the spec (``InvalidInput``), omitted optional ones
    filled with zeros, each ``[1, *shape]``; each text input a list of one ``str``
    (ValueError, see :func:`text_of`). Returns the outputs' row 0 as numpy."""
    import torch

    tensors, texts = split_texts(obs, model.input_spec)
    tensors = complete_inputs(tensors, [s for s in model.input_spec if not is_text(s)])
    batch: dict[str, Any] = {k: torch.from_numpy(np.ascontiguousarray(v)[None]) for k, v in tensors.items()}
    batch.update({k: [v] for k, v in texts.items()})
    return {k: v[0].numpy() for k, v in model.policy.forward(batch).items()}
