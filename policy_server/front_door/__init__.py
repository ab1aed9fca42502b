"""The front door: the gunicorn worker class that reads whole requests before a thread sees them.

``worker_class = "policy_server.front_door.FrontDoorWorker"`` (gunicorn.conf.py).

=============  ===================================================================
``worker``     ``FrontDoorWorker``: the hand-off to request threads, the probe lane,
               the late-answer check, shutdown
``admission``  ``Admission``: everything the worker counts to admit a request
``conn``       ``Conn``, one client connection, its states and transitions
``reader``     the poller: accepting, reading heads and bodies within bounds
``http``       HTTP/1.1 pieces: parsing a head, ``AppRoutes``, refusals
``tls``        TLS on the poller, certificate files followed in place
``websocket``  WebSocket connections after an app's 101
=============  ===================================================================

Imports the foundation, and ``app`` (the routes' audiences, observability) inside the worker.
"""

from policy_server.front_door.worker import FrontDoorWorker

__all__ = ["FrontDoorWorker"]
