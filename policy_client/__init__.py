"""The client of the policy server: what a robot or simulator loop imports (numpy and requests only).

::

    from policy_client import ChunkRunner, LoopClock, PolicyClient

    with PolicyClient("http://127.0.0.1:50000") as client:
        action = client.infer({"state": state, "image": image})["action"]

The public names are imported here; the modules are where they live, one job each:

=====================  ==================================================================
``errors``             the error types every client call raises (all ``PolicyClientError``)
``observations``       checking observations against a model's input spec, stacking rows
``transport``          one HTTP call: sessions, deadlines, retries, error mapping,
                       decoding; ``send_inference_request`` (one call, no client)
``unix_socket``        HTTP over a Unix domain socket (``unix:///path/to.sock`` URLs)
``client``             ``PolicyClient``: a keep-alive connection to one server
``management``         its model management and outcome calls (updates, canaries, outcomes)
``websocket_client``   ``PolicyClient`` over openpi's WebSocket protocol (``ws://`` URLs;
                       imported only then: it needs the ``websocket`` extra)
``image_codecs``       encoded camera images (``PolicyClient(encode=...)``; the codec
                       libraries are imported only when an image is encoded)
``chunk_runner``       ``ChunkRunner``: plays action chunks while the next ones are fetched
``chunk_policy``       ``ChunkPolicy``, what the runner asks for chunks, and the protocols
                       of its optional abilities
``chunk_merge``        how overlapping action chunks make one plan (``MergeStrategy``)
``chunk_schedule``     when the runner asks: the delay estimate and the ask point
``episode_pin``        an episode's id and the model version it is pinned to
``request_threads``    the runner's requests in flight, each on a thread of its own
``rtc_inputs``         real-time chunking: the prefix and delay a request carries
``history_windows``    the per-episode windows of inputs a model takes as a history
``model_declarations`` what the runner reads of the model's declarations
``runner_stats``       ``RunnerStats``: what a runner did, bounded histories
``loop_clock``         ``LoopClock``: paces a control loop at a fixed rate
=====================  ==================================================================

``request_tools`` and ``robot_loop`` (top level) re-export these names for older code.
"""

from policy_client.chunk_merge import (
    MERGE_STRATEGIES,
    BlendMerge,
    Chunk,
    MergeStrategy,
    RealTimeChunking,
    ReplaceMerge,
    TemporalEnsembling,
    merge_strategy,
    rtc_shift,
)
from policy_client.chunk_policy import ChunkPolicy, Clonable, Closable, DeclaresModel, ReportsOutcomes, ReportsVersion
from policy_client.chunk_runner import ChunkRunner
from policy_client.client import PolicyClient
from policy_client.errors import (
    EpisodeStopped,
    ObservationSpecError,
    PolicyClientError,
    PolicyConnectionError,
    PolicyServerError,
    PolicyTimeoutError,
)
from policy_client.loop_clock import LoopClock
from policy_client.observations import check_observation, stack_observations
from policy_client.rtc_inputs import RTC_INPUTS
from policy_client.runner_stats import RunnerStats
from policy_client.transport import send_inference_request

__all__ = [
    "MERGE_STRATEGIES",
    "RTC_INPUTS",
    "BlendMerge",
    "Chunk",
    "ChunkPolicy",
    "ChunkRunner",
    "Clonable",
    "Closable",
    "DeclaresModel",
    "EpisodeStopped",
    "LoopClock",
    "MergeStrategy",
    "ObservationSpecError",
    "PolicyClient",
    "PolicyClientError",
    "PolicyConnectionError",
    "PolicyServerError",
    "PolicyTimeoutError",
    "RealTimeChunking",
    "ReplaceMerge",
    "ReportsOutcomes",
    "ReportsVersion",
    "RunnerStats",
    "TemporalEnsembling",
    "check_observation",
    "merge_strategy",
    "rtc_shift",
    "send_inference_request",
    "stack_observations",
]
