"""One worker serving its models: from a decoded request to an answer.

==================  ==============================================================
``inference``       ``Call`` and ``infer_call``: one inference, whatever the wire;
                    ``Answer``
``runtime``         ``PolicyRuntime``: start and stop, the served models, ``infer``
``batcher``         the per-worker queue and batching loop
``executor``        ``BatchExecutor``: a batch on the device (imports torch: workers
                    only, never from this face)
``served``          a loaded model made ready on a device (``Served``, ``prepare``)
``model_versions``  the versions of one model a worker holds
``store_follower``  ``StoreFollower``: the watcher thread that follows the store
``response_cache``  the optional LRU + TTL response cache
``allocator``       glibc malloc tuning and ``trim_heap``
==================  ==============================================================

Imports the foundation, ``telemetry``, ``inputs``, ``model`` and ``store``.
"""

from policy_server.serving.inference import Answer, Call, infer_call
from policy_server.serving.runtime import PolicyRuntime

__all__ = ["Answer", "Call", "PolicyRuntime", "infer_call"]
