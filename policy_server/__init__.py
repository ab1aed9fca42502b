"""The serving machinery behind server.py, in wings by concern.

Each wing is a package with its face in ``__init__``; a wing imports only from the wings
below it (``tests/test_house.py`` checks the arrows and that no import cycle exists):

==================  ==========================================================================
(this package)      the foundation every wing may use: ``errors`` (the error hierarchy),
                    ``contract`` (the model contract), ``config`` (``ServerConfig``),
                    ``key_files``, ``wsgi_keys`` (what the front door and the app share);
                    ``torch_policy`` (helpers for a model's ``policy.py``); the entry points
                    ``launcher`` (``python server.py``) and ``healthcheck``
``telemetry``       metrics, request statistics, the per-worker status board
``inputs``          request inputs: tensors against the spec, encoded images, episode headers
``model``           model directories: files on disk, the weights check, loading a policy
``store``           the model store on disk: versions, the pointer, marks, leftovers
``serving``         one worker: the runtime, batcher, executor, served versions, the store
                    follower, and ``infer_call`` (one inference, whatever the wire)
``app``             the Flask side: access, observability, body reading, OpenAPI, the admin
                    commands and model listings, outcomes
``front_door``      the gunicorn worker class: reading whole requests, admission, TLS,
                    WebSocket framing
``oip``, ``openpi`` the Open Inference Protocol v2 and openpi's WebSocket wire
==================  ==========================================================================

``contract`` and ``torch_policy`` never move: every stored model version imports them.

The gunicorn master imports this package but never torch: a CUDA context or an OpenMP pool in
the master would break the workers it forks (``tests/test_server_boundaries.py`` checks it).
So every module the master or ``server`` imports takes torch only inside functions that run in
a worker. Two modules import torch at the top and are imported only in workers:
``serving.executor`` (by ``serving.served.prepare``) and ``torch_policy`` (by a model's
``policy.py``).
"""
