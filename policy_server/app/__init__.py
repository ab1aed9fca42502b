"""The Flask side of the server: who may call a route, what each request leaves behind, the
admin commands and the model listings.

====================  ===========================================================
``access``            audience groups (``RouteGroup``) and the keys they need
``web``               body reading, deadlines, answer headers, error handlers
``observability``     request ids, metrics, statistics, the access log
                      (``note`` for routes)
``openapi``           the OpenAPI document (``openapi_parts``, ``openapi_oip``,
                      ``openapi_episodes``: its pieces)
``model_admin``       ``ModelAdmin``: updates, rollbacks, canaries, load and unload
``model_catalog``     ``ModelCatalog``: ``/models`` and ``/model_info``
``outcomes``          ``POST /models/<name>/outcomes``
====================  ===========================================================

Imports every wing below it (the foundation to ``serving``); ``server.py`` builds the app
from these pieces.
"""

from policy_server.app.model_admin import ModelAdmin
from policy_server.app.model_catalog import ModelCatalog

__all__ = ["ModelAdmin", "ModelCatalog"]
