"""Request inputs, before any model runs: what a request carries and whether it may.

============  ==================================================================
``tensors``   inputs against the spec: validation, optional inputs, rows
``images``    encoded camera images: bounds, header check, decoding
``episodes``  ``X-Model-Version`` and ``X-Episode-Id``, and the canary hash
============  ==================================================================

Imports only the foundation.
"""

from policy_server.inputs.episodes import parse_episode_id, parse_version
from policy_server.inputs.images import decoded_inputs
from policy_server.inputs.tensors import complete_inputs, validate_inputs

__all__ = ["complete_inputs", "decoded_inputs", "parse_episode_id", "parse_version", "validate_inputs"]
