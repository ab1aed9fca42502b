"""Load a model directory that follows the contract in :mod:`policy_server.contract`."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from policy_server import model_files
from policy_server.contract import TensorSpec
from policy_server.errors import BadRequest, ModelError

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
    digest: str = ""  # of the model directory's files, when loaded from one
    optional_outputs: tuple[str, ...] = ()  # computed always, answered only when asked for

    def answered_outputs(self, asked: Iterable[str] | None) -> frozenset[str]:
        """The outputs one request gets: every non-optional one plus the optional ones it
        asked for (BadRequest naming any output this model does not have)."""
        names = [s.name for s in self.output_spec]
        asked = set(asked or ())
        unknown = sorted(asked - set(names))
        if unknown:
            raise BadRequest(f"model {self.name!r} has no output {', '.join(map(repr, unknown))}; outputs: {names}")
        return frozenset(n for n in names if n not in self.optional_outputs or n in asked)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "device": self.device,
            "num_parameters": self.num_parameters,
            "inputs": [s.to_json() for s in self.input_spec],
            "outputs": [s.to_json() for s in self.output_spec],
            "optional_outputs": list(self.optional_outputs),
        }


def directory_digest(model_dir: str, suffix: str = "") -> str:
    """A short sha256 over every regular file's relative path and content, in sorted order
    (only files ending in ``suffix`` when given); read without following a link out of
    ``model_dir`` (see :func:`policy_server.model_files.digest`)."""
    return model_files.digest(model_dir, suffix=suffix)


def describe(policy: Any, *, name: str, version: str, device: str, digest: str = "") -> LoadedModel:
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
    optional = tuple(str(n) for n in getattr(policy, "optional_outputs", ()))
    output_names = {s.name for s in specs[1]}
    if not set(optional) <= output_names or set(optional) == output_names:
        raise ModelError(f"policy.optional_outputs {list(optional)} must name some, not all, of its outputs")
    count = policy.num_parameters() if hasattr(policy, "num_parameters") else 0
    return LoadedModel(
        policy=policy,
        name=str(name if name is not None else getattr(policy, "name", "policy")),
        version=str(version if version is not None else getattr(policy, "version", "0")),
        device=device,
        num_parameters=int(count),
        input_spec=specs[0],
        output_spec=specs[1],
        digest=digest,
        optional_outputs=optional,
    )


def _policy_module(model_dir: str):
    """Import ``model_dir/policy.py`` under a private name derived from the directory's code.

    Versions that differ only in weights (a trainer's pushes) share one module, so pushing
    weights neither re-executes the code nor grows ``sys.modules``.
    """
    entry = os.path.join(model_dir, "policy.py")
    if not os.path.isfile(entry):
        raise ModelError(f"{model_dir} has no policy.py")
    module_name = f"_served_policy_{directory_digest(model_dir, suffix='.py')}"
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(module_name, entry)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, "load_model", None)):
            raise ModelError(f"{entry} defines no load_model(model_dir, device)")
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def load_model_dir(
    model_dir: str, device: str, *, name: str | None = None, version: str | None = None
) -> LoadedModel:
    """Call ``load_model`` from ``model_dir/policy.py``.

    ``name`` defaults to the policy's ``name`` (else the directory's), ``version`` to a digest
    of the directory's files; the model store passes its own name and version number.
    """
    model_dir = os.path.abspath(model_dir)
    digest = directory_digest(model_dir)
    policy = _policy_module(model_dir).load_model(model_dir, device)
    loaded = describe(
        policy,
        name=name if name is not None else getattr(policy, "name", os.path.basename(model_dir)),
        version=version if version is not None else getattr(policy, "version", digest),
        device=device,
        digest=digest,
    )
    log.info("loaded model %s version %s (%s) on %s", loaded.name, loaded.version, digest, device)
    return loaded
