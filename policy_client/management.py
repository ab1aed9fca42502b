"""The model management calls of a :class:`policy_client.client.PolicyClient`: updates,
rollbacks, canaries, loads and unloads (admin key), and episode outcome reports (API key).

A mixin: ``PolicyClient`` provides ``_call``, ``_headers``, ``timeout_s``, ``model`` and
``model_info``; every call takes its one request path. Management calls are never retried.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from binary_protocol import dict_to_binary

__all__ = ["ModelManagement"]


class ModelManagement:
    """Management and outcome calls, mixed into ``PolicyClient``."""

    _default_name: str | None = None  # the server's default model's name, once read

    def update_model(
        self,
        *,
        model_path: str | None = None,
        weights: Mapping[str, Any] | None = None,
        version: int | None = None,
        model: str | None = None,
        wait_s: float | None = 10.0,
        canary: float | None = None,
    ) -> dict:
        """Publish a new version to every worker and instance sharing the server's store.

        Give exactly one of ``model_path`` (a model directory inside the server's model
        root), ``weights`` (a state dict of arrays for the current architecture, e.g.
        ``{k: v.cpu().numpy() for k, v in module.state_dict().items()}``) or ``version``
        (roll back to a kept version; while a canary runs, promote its candidate).
        ``canary`` F (0 < F < 1) makes the new version (or kept ``version``) a canary
        candidate for that fraction of new episodes instead, the stable version staying; F
        alone changes the running canary's fraction, and 0 ends it (see :meth:`end_canary`).
        The answer names ``canary`` and ``retained``. Returns once every worker of the instance that took
        the call serves it, or after ``wait_s`` seconds (default 10; 0: right after
        publishing, the old fire-and-forget; None: the server's ``--update-wait-s``):
        ``{"version": N, "previous": M, "all_workers": bool, "lagging": [pid, ...],
        "warnings": [...], ...}``. Other instances sharing the store follow within their
        poll interval. A refused update raises PolicyServerError
        (4xx names the reason; 507 when the store is full) and changes nothing. Never retried.
        """
        body: dict[str, Any] = {}
        fields = (("model_path", model_path), ("weights", weights), ("version", version), ("model", model),
                  ("canary", canary))
        for key, value in fields:
            if value is not None:
                body[key] = dict(value) if key == "weights" else value
        if weights is not None:
            return self._manage("/update_model", wait_s, data=dict_to_binary(body),
                                content_type="application/octet-stream")
        return self._manage("/update_model", wait_s, json_body=body)

    def load_model(self, name: str, model_path: str | None = None, wait_s: float | None = 10.0) -> dict:
        """Serve ``name`` on every worker (from ``model_path`` if given, else its current version);
        waits like :meth:`update_model`."""
        return self._manage(f"/models/{name}/load", wait_s, json_body={"model_path": model_path} if model_path else {})

    def unload_model(self, name: str, wait_s: float | None = 10.0) -> dict:
        """Stop serving ``name`` on every worker (its versions stay in the store); waits like
        :meth:`update_model`."""
        return self._manage(f"/models/{name}/unload", wait_s, json_body={})

    def end_canary(self, *, model: str | None = None, wait_s: float | None = 10.0) -> dict:
        """End the running canary: new episodes all get the stable version; the candidate is
        retained for the episodes pinned to it. Waits like :meth:`update_model`."""
        return self.update_model(canary=0.0, model=model, wait_s=wait_s)

    def report_outcome(
        self,
        episode_id: str,
        version: str | int,
        success: bool,
        *,
        episode_return: float | None = None,
        model: str | None = None,
    ) -> dict:
        """Tell the server how an episode ended: counted in
        ``policy_episode_outcomes_total{model, version, outcome}`` (and the return in
        ``policy_episode_return``). ``version`` is the one that ran it (the episode's pin).
        Sent once, never retried (a retry could count it twice).

        Raises:
            PolicyServerError (404: a version the server no longer keeps), PolicyTimeoutError,
            PolicyConnectionError.
        """
        name = model or self.model or self._default_model_name()
        body: dict[str, Any] = {"episode_id": episode_id, "version": str(version), "success": bool(success)}
        if episode_return is not None:
            body["return"] = float(episode_return)
        headers = {**self._headers(), "Content-Type": "application/json"}
        return self._call("POST", f"/models/{name}/outcomes", retries=0, data=json.dumps(body).encode(),
                          headers=headers).json()

    def _default_model_name(self) -> str:
        if self._default_name is None:
            self._default_name = str(self.model_info()["name"])
        return self._default_name

    def _manage(self, route: str, wait_s: float | None, *, json_body: Any = None, data: bytes | None = None,
                content_type: str = "application/json") -> dict:
        longest_wait_s = 300.0  # the server's bound on any wait (None: its default, at most this)
        headers = {**self._headers(admin=True), "Content-Type": content_type}
        if json_body is not None:
            data = json.dumps(json_body).encode()
        return self._call(
            "POST", route,
            timeout_s=self.timeout_s + (longest_wait_s if wait_s is None else wait_s), retries=0, data=data,
            headers=headers, params=None if wait_s is None else {"wait_s": wait_s},  # 0 is sent: "do not wait"
        ).json()
