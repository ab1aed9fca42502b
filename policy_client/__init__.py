"""The client side of the policy server, one module per job (numpy and requests only).

Import the public names from ``request_tools`` (the HTTP client) and ``robot_loop`` (the
robot loop); the modules here are where they live:

=====================  ==================================================================
``errors``             the error types every client call raises
``observations``       checking observations against a model's input spec, stacking rows
``transport``          one HTTP call: sessions, deadlines, retries, error mapping, decoding
``unix_socket``        HTTP over a Unix domain socket (``unix:///path/to.sock`` URLs)
``client``             ``PolicyClient``: a keep-alive connection to one server
``management``         its model management and outcome calls (updates, canaries, outcomes)
``websocket_client``   ``PolicyClient`` over openpi's WebSocket protocol (``ws://`` URLs)
``chunk_runner``       ``ChunkRunner``: plays action chunks while the next ones are fetched
``chunk_policy``       ``ChunkPolicy``: the callable the runner asks for chunks
``chunk_schedule``     when the runner asks: the delay estimate and the ask point
``episode_pin``        an episode's id and the model version it is pinned to
``request_threads``    the runner's requests in flight, each on a thread of its own
``rtc_inputs``         real-time chunking: the prefix and delay a request carries
``history_windows``    the per-episode windows of inputs a model takes as a history
``runner_stats``       ``RunnerStats``: what a runner did, bounded histories
``loop_clock``         ``LoopClock``: paces a control loop at a fixed rate
=====================  ==================================================================

Importing this package imports none of them.
"""
