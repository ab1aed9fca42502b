"""The model store on disk, shared by every worker and instance that mounts it (no torch).

===============  ================================================================
``model_store``  ``ModelStore``: staging (the weights check), versions, the pointer
``pointer``      ``Pointer`` and the changes updates make to it (no I/O)
``marks``        the pinned-use mark of the retained version
``leftovers``    what an interrupted write leaves, found and removed
===============  ================================================================

Imports the foundation, ``telemetry`` and ``model``.
"""

from policy_server.store.model_store import ModelStore
from policy_server.store.pointer import Pointer

__all__ = ["ModelStore", "Pointer"]
