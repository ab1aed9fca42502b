"""Load a model directory that follows the contract in :mod:`policy_server.contract`."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from policy_server.contract import TensorSpec
from policy_server.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A policy with the facts /model_info reports about it."""

    policy: Any
    name: str
    version: str
    device: str
    num_parameters: int
    input_spec: tuple[TensorSpec, ...]
    output_spec: tuple[TensorSpec, ...]

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "device": self.device,
            "num_parameters": self.num_parameters,
            "inputs": [s.to_json() for s in self.input_spec],
            "outputs": [s.to_json() for s in self.output_spec],
        }


def directory_digest(model_dir: str) -> str:
    """A short sha256 over every regular file's relative path and content, in sorted order."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(model_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, model_dir).encode() + b"\0")
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:12]


def describe(policy: Any, *, name: str, version: str, device: str) -> LoadedModel:
    """Check that ``policy`` follows the contract and collect its facts."""
    for attr in ("input_spec", "output_spec", "forward"):
        if not hasattr(policy, attr):
            raise ModelError(f"policy has no {attr}")
    specs = []
    for attr in ("input_spec", "output_spec"):
        spec = tuple(getattr(policy, attr))
        if not spec or not all(isinstance(s, TensorSpec) for s in spec):
            raise ModelError(f"policy.{attr} must be a non-empty sequence of TensorSpec")
        if len({s.name for s in spec}) != len(spec):
            raise ModelError(f"policy.{attr} repeats a name")
        specs.append(spec)
    count = policy.num_parameters() if hasattr(policy, "num_parameters") else 0
    return LoadedModel(
        policy=policy,
        name=str(getattr(policy, "name", name)),
        version=str(getattr(policy, "version", version)),
        device=device,
        num_parameters=int(count),
        input_spec=specs[0],
        output_spec=specs[1],
    )


def load_model_dir(model_dir: str, device: str) -> LoadedModel:
    """Import ``model_dir/policy.py`` under a private module name and call its ``load_model``."""
    model_dir = os.path.abspath(model_dir)
    entry = os.path.join(model_dir, "policy.py")
    if not os.path.isfile(entry):
        raise ModelError(f"{model_dir} has no policy.py")
    version = directory_digest(model_dir)
    module_name = f"_served_policy_{version}"
    spec = importlib.util.spec_from_file_location(module_name, entry)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, "load_model", None)):
            raise ModelError(f"{entry} defines no load_model(model_dir, device)")
        policy = module.load_model(model_dir, device)
    except Exception:
        sys.modules.pop(module_name, None)
        raise
    loaded = describe(policy, name=os.path.basename(model_dir), version=version, device=device)
    log.info("loaded model %s version %s on %s", loaded.name, loaded.version, device)
    return loaded
