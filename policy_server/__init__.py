"""The serving machinery behind server.py: configuration, model loading, inference, HTTP plumbing.

The gunicorn master imports this package but never torch: a CUDA context or an OpenMP pool in
the master would break the workers it forks (``tests/test_server_boundaries.py`` checks it).
So every module the master or ``server`` imports takes torch only inside functions that run in
a worker (``runtime``, ``serving_model``). Two modules import torch at the top and are imported
only in workers: ``executor`` (by ``serving_model.prepare``) and ``torch_policy`` (by a model's
``policy.py``).
"""
