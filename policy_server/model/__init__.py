"""Model directories: the files on disk, their weights, and loading the policy they hold.

=================  ============================================================
``files``          read confined (digest, bounded walk, confined copy); durable writes
``weights_check``  safetensors headers and finite values, before any model code runs
``loader``         import a directory's ``policy.py``, check it (``describe``)
=================  ============================================================

Imports the foundation and ``inputs``.
"""

from policy_server.model.loader import LoadedModel, describe, load_model_dir

__all__ = ["LoadedModel", "describe", "load_model_dir"]
