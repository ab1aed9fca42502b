"""Load a model directory that follows the contract in :mod:`policy_server.contract`."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from binary_protocol import IMAGE_CODECS
from policy_server.contract import (
    POLICY_DEFAULTS,
    POLICY_FILE,
    POLICY_REQUIRED,
    RTC_INPUTS,
    TensorSpec,
    TextSpec,
    require_model_dir,
)
from policy_server.errors import BadRequest, ModelError
from policy_server.inputs.images import encodable
from policy_server.model import files

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
    encoded_inputs: tuple[str, ...] = ()  # uint8 image inputs that may arrive JPEG/PNG encoded
    openpi_metadata: Mapping[str, Any] = field(default_factory=dict)  # extra keys of openpi's first frame

    def answered_outputs(self, asked: Iterable[str] | None) -> frozenset[str]:
        """The outputs one request gets: every non-optional one plus the optional ones it
        asked for (BadRequest naming any output this model does not have)."""
        names = [s.name for s in self.output_spec]
        asked = set(asked or ())
        unknown = sorted(asked - set(names))
        if unknown:
            raise BadRequest(f"model {self.name!r} has no output {', '.join(map(repr, unknown))}; outputs: {names}")
        return frozenset(n for n in names if n not in self.optional_outputs or n in asked)

    @property
    def optional_inputs(self) -> tuple[str, ...]:
        """Inputs a request may omit (the server fills zeros)."""
        return tuple(s.name for s in self.input_spec if s.optional)

    @property
    def real_time_chunking(self) -> bool:
        """True when the model declares the real-time chunking inputs (:data:`contract.RTC_INPUTS`)."""
        return RTC_INPUTS[0] in {s.name for s in self.input_spec}

    def info(self) -> dict[str, Any]:
        """What ``/model_info`` answers. ``inputs`` entries carry ``optional: true`` and
        ``history: {steps, pad}`` where declared; ``optional_inputs`` lists the optional ones."""
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "device": self.device,
            "num_parameters": self.num_parameters,
            "inputs": [s.to_json() for s in self.input_spec],
            "optional_inputs": list(self.optional_inputs),
            "outputs": [s.to_json() for s in self.output_spec],
            "optional_outputs": list(self.optional_outputs),
            "encoded_inputs": list(self.encoded_inputs),
            "image_codecs": list(IMAGE_CODECS) if self.encoded_inputs else [],
        }


def describe(policy: Any, *, name: str, version: str, device: str, digest: str = "") -> LoadedModel:
    """Check that ``policy`` follows :class:`policy_server.contract.Policy` (ModelError
    otherwise) and collect its facts; optional members take ``contract.POLICY_DEFAULTS``."""
    for attr in POLICY_REQUIRED:
        if not hasattr(policy, attr):
            raise ModelError(f"policy has no {attr}")
    specs = []
    for attr, kinds in (("input_spec", (TensorSpec, TextSpec)), ("output_spec", (TensorSpec,))):
        spec = tuple(getattr(policy, attr))
        if not spec or not all(isinstance(s, kinds) for s in spec):
            names = " or ".join(k.__name__ for k in kinds)
            raise ModelError(f"policy.{attr} must be a non-empty sequence of {names}")
        if len({s.name for s in spec}) != len(spec):
            raise ModelError(f"policy.{attr} repeats a name")
        specs.append(spec)
    _check_inputs(specs[0])
    if any(s.optional or s.history is not None for s in specs[1]):
        raise ModelError("policy.output_spec: optional and history are input declarations")
    optional = tuple(str(n) for n in getattr(policy, "optional_outputs", POLICY_DEFAULTS["optional_outputs"]))
    output_names = {s.name for s in specs[1]}
    if not set(optional) <= output_names or set(optional) == output_names:
        raise ModelError(f"policy.optional_outputs {list(optional)} must name some, not all, of its outputs")
    encoded = tuple(str(n) for n in getattr(policy, "encoded_inputs", POLICY_DEFAULTS["encoded_inputs"]))
    inputs_by_name = {s.name: s for s in specs[0]}
    for n in encoded:
        if n not in inputs_by_name or not encodable(inputs_by_name[n]):
            raise ModelError(f"policy.encoded_inputs: {n!r} is not a uint8 [H, W, 3] or [H, W, 1] input")
    openpi_metadata = _openpi_metadata(getattr(policy, "openpi_metadata", POLICY_DEFAULTS["openpi_metadata"]))
    count = policy.num_parameters() if hasattr(policy, "num_parameters") else POLICY_DEFAULTS["num_parameters"]
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
        encoded_inputs=encoded,
        openpi_metadata=openpi_metadata,
    )


# What the first frame of openpi's WebSocket wire always says (policy_server.openpi.session);
# a model's openpi_metadata adds other keys.
SERVER_METADATA_KEYS = frozenset({
    "server", "model", "version", "inputs", "outputs", "action_key", "action_output", "action_horizon",
    "omitted_outputs",
})


def _openpi_metadata(value: Any) -> dict[str, Any]:
    """A policy's ``openpi_metadata``: a map of str keys that msgpack can carry (ModelError
    otherwise), none of them a key the server writes itself."""
    import openpi_wire

    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ModelError("policy.openpi_metadata must be a mapping with str keys")
    clash = sorted(set(value) & SERVER_METADATA_KEYS)
    if clash:
        raise ModelError(f"policy.openpi_metadata may not set {clash}: the server writes them")
    try:
        openpi_wire.encode(dict(value))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"policy.openpi_metadata cannot travel on openpi's wire: {exc}") from None
    return dict(value)


def _check_inputs(spec: tuple[TensorSpec, ...]) -> None:
    """ModelError unless the optional-input and real-time chunking declarations are coherent."""
    if all(s.optional for s in spec):
        raise ModelError("policy.input_spec needs at least one required (non-optional) input")
    by_name = {s.name: s for s in spec}
    declared = [n for n in RTC_INPUTS if n in by_name]
    if not declared:
        return
    if len(declared) != len(RTC_INPUTS):
        raise ModelError(f"real-time chunking needs all of {list(RTC_INPUTS)}; the policy declares {declared}")
    prefix, length, delay = (by_name[n] for n in RTC_INPUTS)
    if not (prefix.optional and length.optional and delay.optional):
        raise ModelError(f"the real-time chunking inputs {list(RTC_INPUTS)} must be optional")
    if prefix.dtype != "float32" or len(prefix.shape) != 2 or prefix.shape[0] < 1:
        raise ModelError(f"{prefix.name} must be float32[H, DOF], got {prefix.dtype}{list(prefix.shape)}")
    for s in (length, delay):
        if s.dtype != "int32" or s.shape != (1,):
            raise ModelError(f"{s.name} must be int32[1], got {s.dtype}{list(s.shape)}")


def _policy_module(model_dir: str):
    """Import ``model_dir/policy.py`` under a private name derived from the directory's code.

    Versions that differ only in weights (a trainer's pushes) share one module, so pushing
    weights neither re-executes the code nor grows ``sys.modules``.
    """
    entry = os.path.join(require_model_dir(model_dir), POLICY_FILE)
    module_name = f"_served_policy_{files.digest(model_dir, suffix='.py')}"
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
    digest = files.digest(model_dir)
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
