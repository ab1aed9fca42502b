"""The Open Inference Protocol v2 (KServe, Triton): the ``/v2`` routes.

=================  ===========================================================
``codec``          requests and answers, JSON and binary tensors, strict checks
``json_data``      JSON tensor data converted in bounded steps
``bytes_tensors``  ``BYTES`` tensors: one text per row
``routes``         the ``/v2`` blueprint into the same runtime
=================  ===========================================================

Imports everything below ``front_door``.
"""

from policy_server.oip.routes import oip_blueprint

__all__ = ["oip_blueprint"]
