"""openpi's WebSocket protocol (openpi, RoboArena, and the clients that speak it).

===========  =====================================================================
``routes``   the upgrade routes (``/``, ``/infer``, ``/models/<name>/infer``), ``/healthz``
``session``  ``OpenpiSession``: one connection, the app side
===========  =====================================================================

The codec is ``openpi_wire`` (top level: our client uses it too). Imports every wing,
``front_door`` included (a session answers through its WebSocket replies).
"""

from policy_server.openpi.routes import openpi_blueprint
from policy_server.openpi.session import OpenpiSession

__all__ = ["OpenpiSession", "openpi_blueprint"]
