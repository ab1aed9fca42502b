"""What a ``ChunkRunner`` takes from the model's ``/model_info``: the history windows it keeps
for the model and whether its requests carry the real-time chunking inputs (numpy only)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from policy_client.chunk_policy import DeclaresModel
from policy_client.history_windows import HistoryWindows
from policy_client.rtc_inputs import RTC_INPUTS

__all__ = ["INFO_RETRY_S", "ModelDeclarations"]

log = logging.getLogger(__name__)

INFO_RETRY_S = 0.5  # after a failed read of the declarations, read again at most this often
DEFAULT_TEXT_INPUT = "prompt"  # where an instruction goes when the model declares no text input (openpi's name)


class ModelDeclarations:
    """The model's declarations as a runner uses them.

    ``info`` is the ``/model_info`` dict (None before the first read, ``{}`` when none could
    be read), ``history`` the :class:`HistoryWindows` it declares, ``rtc`` whether requests
    carry the real-time chunking inputs (the merge sends a prefix and the model declares
    :data:`RTC_INPUTS`), ``prefix_shape`` the declared ``action_prefix`` shape, ``text_input``
    the input an instruction goes in (the model's first text input, else ``prompt``).

    A failed read (a server still loading, say) is retried every ``INFO_RETRY_S``;
    :meth:`stale` asks for a read before the next request (a 422: the model may have changed
    its inputs). A read that brings other declarations starts new history windows (padded
    from that step); the same ones keep the windows.

    Args:
        policy: read with ``policy.model_info()`` when it has one.
        given: declarations given up front (never read again), or None.
        sends_prefix: the merge strategy sends a prefix (real-time chunking).
    """

    def __init__(self, policy: Any, given: Mapping[str, Any] | None, sends_prefix: bool) -> None:
        self.policy, self.given, self.sends_prefix = policy, given, sends_prefix
        self.info: Mapping[str, Any] | None = None
        self.failed = False
        self.history = HistoryWindows({})
        self.rtc = False
        self.prefix_shape: tuple[int, ...] | None = None
        self.text_input = DEFAULT_TEXT_INPUT
        self._retry_at = 0.0

    @property
    def due(self) -> bool:
        """Whether to read now: never read, or the last read failed and its retry time came."""
        return self.info is None or (self.failed and time.monotonic() >= self._retry_at)

    def stale(self) -> None:
        """Read again before the next request (unless the declarations were given)."""
        if self.given is None:
            self.failed, self._retry_at = True, 0.0

    def read(self) -> str | None:
        """Read the declarations; returns why they could not be read, or None."""
        info: Mapping[str, Any] = {}
        error = None
        self.failed = False
        if self.given is not None:
            info = self.given
        elif isinstance(self.policy, DeclaresModel):
            try:
                info = self.policy.model_info()
            except Exception as exc:  # noqa: BLE001 - the loop goes on without declarations
                log.warning("could not read the model's declarations (%s); reading again in %.1f s", exc, INFO_RETRY_S)
                error, self.failed, self._retry_at = str(exc), True, time.monotonic() + INFO_RETRY_S
        if info == self.info or (self.failed and self.info is not None):
            return error  # the same declarations, or none read now: keep the windows
        self.info = info
        inputs = {entry["name"]: entry for entry in info.get("inputs", [])}
        self.history = HistoryWindows(inputs)
        self.rtc = bool(self.sends_prefix and set(info.get("optional_inputs", [])).issuperset(RTC_INPUTS))
        if self.sends_prefix and not self.rtc:
            log.info("the model does not declare %s: real-time chunking plays answers as they come", RTC_INPUTS)
        self.prefix_shape = tuple(inputs["action_prefix"]["shape"]) if self.rtc else None
        self.text_input = next((n for n, e in inputs.items() if e.get("dtype") == "text"), DEFAULT_TEXT_INPUT)
        return error
