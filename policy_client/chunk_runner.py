"""``ChunkRunner``: play action chunks at a fixed rate while the next ones are computed elsewhere.

``runner.act(obs)`` once per control step returns the action to apply now; in the
background the runner asks its :class:`~policy_client.chunk_policy.ChunkPolicy` for the
next chunks (when: :mod:`policy_client.chunk_schedule`), merges the answers into one plan
(:mod:`chunk_merge`), and keeps the model's history windows and real-time chunking inputs
(what the model declares: :mod:`policy_client.model_declarations`). Each episode has an id
and is pinned to the model version of its first answer (:mod:`policy_client.episode_pin`);
requests run on their own threads (:mod:`policy_client.request_threads`). Overview: ``robot_loop``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from policy_client.chunk_merge import Chunk, MergeStrategy, merge_strategy
from policy_client.chunk_policy import ChunkPolicy, ReportsOutcomes, accepts_deadline, accepts_episodes
from policy_client.chunk_schedule import delay_estimate_steps, should_ask
from policy_client.episode_pin import EpisodePin
from policy_client.errors import EpisodeStopped, PolicyClientError, PolicyTimeoutError
from policy_client.model_declarations import ModelDeclarations
from policy_client.request_threads import MAX_THREADS, RequestThreads
from policy_client.rtc_inputs import plan_plays, rtc_inputs
from policy_client.runner_stats import RunnerStats

__all__ = ["BACKOFF_S", "MAX_THREADS", "ChunkRunner"]

log = logging.getLogger(__name__)

BACKOFF_S = 0.05


@dataclass
class _Request:
    step: int
    sent: float
    prefix: np.ndarray | None = None  # rtc: the plan's actions for steps step .. step + prefix_length - 1


class ChunkRunner:
    """Plays action chunks at the loop's rate and fetches the next ones in the background.

    Call :meth:`act` once per control step with that step's observation. A chunk computed
    from step ``s``'s observation is ``[H, *action_shape]``, row ``i`` planned for step
    ``s + i``; rows whose step has passed when it arrives are dropped, and an answer older
    than a chunk already received is dropped (out of order).

    Scheduling (:func:`~policy_client.chunk_schedule.should_ask`): a request goes out when
    the plan, counting the chunks in flight, has about the delay estimate's number of
    actions left, at most one per step and at most ``max_in_flight`` at once, so latency
    past half the horizon keeps several requests in flight (up to about ``0.85 x H``). Each
    request's deadline is the time its chunk stays useful, ``(H - 1) / rate_hz``; a
    ``PolicyClient`` keeps its own retries within it. A failed request is retried after an
    exponential backoff (or the error's ``retry_after_s``), but while the plan still has
    actions no later than a fresh chunk needs to leave; once the plan runs out the
    ``fallback`` action (zeros: stop, for velocity or delta actions) is played and counted.
    Pipelining helps a server that computes requests concurrently (batching, several
    workers); one that computes them one after another only adds queueing for each extra
    request: give it ``max_in_flight=1``.

    Args:
        policy: a :class:`ChunkPolicy` (e.g. a ``PolicyClient``, or an in-process callable).
        rate_hz: the loop's control rate.
        action_key: the output holding the chunk.
        merge: how overlapping chunks make the plan: a name in :data:`MERGE_STRATEGIES`
            or a :class:`MergeStrategy`. ``"rtc"`` sends the plan's not-yet-executed actions
            and the delay when the model declares the real-time chunking inputs.
        request_ahead: a fixed number of planned actions left at which to ask (None: from
            the measured delay d; with real-time chunking on,
            :func:`~policy_client.chunk_schedule.rtc_request_ahead`, earlier, so the prefix
            overlaps the fresh chunk for several rows after d).
        max_in_flight: the most requests out at once that can still bring a useful chunk
            (sent within the last horizon); one more may be out, overdue, while it is hedged
            by a new one, so at most ``max_in_flight + 1`` run at once (None: the chunk's horizon).
        fallback: the action played when no action is planned.
        first_chunk_timeout_s: how long the first :meth:`act` of an episode waits.
        max_backoff_s: cap of the retry backoff after failures.
        model_info: the model's ``/model_info`` dict (default: ``policy.model_info()`` if
            the policy has it, else no history windows and no optional inputs).
        on_version_retired: what an episode does when the version it is pinned to is retired
            (see :mod:`policy_client.episode_pin`): ``"stop"`` (play its chunks to their end,
            then the fallback, and set :attr:`stopped`) or ``"continue"`` (on the current
            version, counted in ``stats.version_switches``). Episodes are pinned when the
            policy takes ``episode_id`` and ``version`` (a ``PolicyClient`` does).

    Not thread-safe: one loop thread calls :meth:`act`.
    """

    def __init__(
        self,
        policy: ChunkPolicy | Any,
        *,
        rate_hz: float,
        action_key: str = "action",
        merge: str | MergeStrategy = "replace",
        request_ahead: int | None = None,
        max_in_flight: int | None = None,
        fallback: np.ndarray | None = None,
        first_chunk_timeout_s: float = 30.0,
        max_backoff_s: float = 2.0,
        model_info: Mapping[str, Any] | None = None,
        on_version_retired: str = "stop",
    ) -> None:
        if rate_hz <= 0:
            raise ValueError("rate_hz must be positive")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.policy = policy
        self.rate_hz = rate_hz
        self.action_key = action_key
        self.merge = merge_strategy(merge)
        self.request_ahead = request_ahead
        self.max_in_flight = max_in_flight
        self.fallback = fallback
        self.first_chunk_timeout_s = first_chunk_timeout_s
        self.max_backoff_s = max_backoff_s
        self.stats = RunnerStats()
        self.instruction: str | None = None  # see set_instruction
        self._decl = ModelDeclarations(policy, model_info, self.merge.sends_prefix)
        self._pin = EpisodePin(on_version_retired, enabled=accepts_episodes(policy))
        self._answers: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = RequestThreads(policy, self._answers, self.stats, action_key, accepts_deadline(policy))
        self._ids = itertools.count()
        self._episode = 0
        self._horizon: int | None = None
        self._action_like: np.ndarray | None = None
        self.reset()

    def __enter__(self) -> ChunkRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- episode and lifetime ---------------------------------------------------------

    def reset(self, instruction: str | None = None, *, episode_id: str | None = None) -> None:
        """Start a new episode: forget the plan and the history windows (answers still in
        flight are discarded when they arrive), and the version pin; a new episode id
        (``episode_id``, else a random one). ``instruction`` replaces the instruction requests
        carry (see :meth:`set_instruction`); None keeps the current one."""
        if instruction is not None:
            self.set_instruction(instruction)
        self._pin.new_episode(episode_id)
        self.stopped: EpisodeStopped | None = None  # why the episode stopped (its version was retired)
        self._episode += 1
        self._step = 0
        self._chunks: list[Chunk] = []
        self._newest_step = -1
        self._started = False
        self._pending: dict[int, _Request] = {}
        self._retry_at = 0.0
        self._backoff_s = BACKOFF_S
        self.last_chunk_step: int | None = None  # observation step of the chunk behind the last action
        self._decl.history.clear()
        if self._decl.failed:
            self._decl.stale()  # read the model's declarations again at the first act

    def close(self) -> None:
        """Stop the request threads (after the requests in flight, if any)."""
        self._threads.close(self.first_chunk_timeout_s)

    @property
    def episode_id(self) -> str:
        """The current episode's id (new at every :meth:`reset`), sent with every request."""
        return self._pin.episode_id

    @property
    def episode_version(self) -> str | None:
        """The model version the current episode is pinned to (its first answer's), or None."""
        return self._pin.version

    def report_outcome(self, success: bool, *, episode_return: float | None = None) -> dict | None:
        """Report how the current episode ended (call before :meth:`reset`) through the
        policy's ``report_outcome`` (a ``PolicyClient``'s: counted per version on the server);
        None when the policy has none or no chunk came. Raises what the policy raises."""
        if not isinstance(self.policy, ReportsOutcomes) or self._pin.version is None:
            log.debug("episode %s: no outcome reported (no report_outcome, or no answer)", self.episode_id)
            return None
        return self.policy.report_outcome(self.episode_id, self._pin.version, success, episode_return=episode_return)

    def set_instruction(self, text: str | None) -> None:
        """The task instruction every request carries from now on, in the model's text input
        (``prompt`` unless the model declares another), for policies that take one (VLAs). An
        observation that has the field itself overrides it, and becomes the instruction.
        None: requests carry none (the server fills the model's default, if it has one)."""
        if text is not None and not isinstance(text, str):
            raise TypeError(f"an instruction is a str, not {type(text).__name__}")
        self.instruction = text

    @property
    def horizon_s(self) -> float | None:
        """Seconds a chunk covers, or None before the first one."""
        return None if self._horizon is None else self._horizon / self.rate_hz

    @property
    def real_time_chunking(self) -> bool:
        """True when requests carry the plan's prefix (merge ``rtc`` and the model declares it)."""
        return self._decl.rtc

    # -- the loop step ----------------------------------------------------------------

    def act(self, obs: Mapping[str, Any]) -> np.ndarray:
        """The action for this control step; ``obs`` is this step's observation (per-step
        values also for inputs the model takes as a history window).

        Raises:
            PolicyTimeoutError: the episode's first chunk did not come within
                ``first_chunk_timeout_s``.
            ObservationSpecError: a history input has the wrong per-step shape.
        """
        t = self._step
        self._step += 1
        if self._decl.due:
            self._read_declarations()
        if self._decl.text_input in obs:  # the observation changes the instruction, from this step on
            self.instruction = obs[self._decl.text_input]
        self._decl.history.observe(obs)
        self._take_answers(t)
        if not self._started:
            self._wait_first_chunk(obs, t)
        action = self.merge.action(t, self._chunks)
        if action is None and self._pin.retired is not None and self.stopped is None:
            self.stopped = self._pin.stopped_at(t)  # the end of the episode's last chunk: stop here
            self.stats.episodes_stopped += 1
            log.warning("%s", self.stopped)
        if action is None:
            self.stats.starved_steps += 1
            action = self.fallback if self.fallback is not None else np.zeros_like(self._action_like)
            self.last_chunk_step = None
        else:
            newest = next(c for c in reversed(self._chunks) if c.covers(t))
            self.last_chunk_step = newest.step
            self.stats.staleness_steps.append(t - newest.step)
        self.stats.steps += 1
        self._chunks = [c for c in self._chunks if c.end > t + 1 or c is self._chunks[-1]]
        self._maybe_ask(obs, t)
        return action

    def delay_estimate_steps(self, *, measured_only: bool = False) -> int:
        """Steps from an observation to its answer, high estimate: the slowest of the last 20
        requests (until 10 are measured, at least half the horizon unless ``measured_only``)."""
        return delay_estimate_steps(self.stats.latencies_s, self.rate_hz, self._horizon, measured_only=measured_only)

    def _plan_end(self) -> int:
        return max((c.end for c in self._chunks), default=0)

    def _maybe_ask(self, obs: Mapping[str, Any], t: int) -> None:
        if time.monotonic() < self._retry_at or self._horizon is None or t <= self._newest_step \
                or not self._pin.asking:
            return
        live = [r for r in self._pending.values() if t < r.step + self._horizon]
        cap = self.max_in_flight or self._horizon
        # A request overdue (sent a horizon ago) no longer counts toward the cap, so it is
        # hedged by a new one; but it still runs, and one overdue beyond the cap is the most.
        busy = self._threads.busy
        if len(live) >= cap or busy > cap or busy >= MAX_THREADS:
            return
        delay = self.delay_estimate_steps()
        self.stats.delay_steps = delay
        if should_ask(
            t, horizon=self._horizon, plan_end=self._plan_end(), live_steps=[r.step for r in live], delay=delay,
            overdue=self.delay_estimate_steps(measured_only=True) + 1, request_ahead=self.request_ahead,
            rtc=self._decl.rtc,
        ):
            self._ask(obs, t, deadline_s=(self._horizon - 1) / self.rate_hz, delay=delay)

    # -- model declarations: history windows and real-time chunking --------------------

    def _read_declarations(self) -> None:
        error = self._decl.read()
        if error is not None:
            self._note_error(f"model_info: {error}")

    def _request_obs(self, obs: Mapping[str, Any], t: int, delay: int) -> dict[str, Any]:
        request = dict(obs)
        if self.instruction is not None:
            request.setdefault(self._decl.text_input, self.instruction)
        self._decl.history.fill(request)
        if self._decl.rtc:
            request.update(rtc_inputs(self.merge, self._chunks, t, self._decl.prefix_shape, delay))
        return request

    # -- requests and answers ---------------------------------------------------------

    def _ask(self, obs: Mapping[str, Any], t: int, *, deadline_s: float, delay: int = 0) -> None:
        request = self._request_obs(obs, t, delay)
        rid = next(self._ids)
        prefix = request["action_prefix"][:int(request["prefix_length"][0])] if self._decl.rtc else None
        self._pending[rid] = _Request(t, time.monotonic(), prefix)
        self.stats.requests += 1
        pinned = self._pin.request_kwargs()  # the episode and its version, as of now
        self._threads.submit((self._episode, rid, t, request, time.monotonic() + deadline_s, pinned))

    def _wait_first_chunk(self, obs: Mapping[str, Any], t: int) -> None:
        give_up = time.monotonic() + self.first_chunk_timeout_s
        while not self._started:
            if not self._pending:
                if self._retry_at >= give_up:
                    break
                time.sleep(max(0.0, self._retry_at - time.monotonic()))
                if self._decl.due:  # e.g. the server was loading at the first read
                    self._read_declarations()
                    self._decl.history.observe(obs)
                self._ask(obs, t, deadline_s=self.first_chunk_timeout_s)
            left = give_up - time.monotonic()
            if left <= 0:
                break
            self._take_answers(t, wait_s=left)
        if not self._started:
            last = self.stats.errors[-1] if self.stats.errors else "no answer"
            raise PolicyTimeoutError(f"no first chunk within {self.first_chunk_timeout_s} s ({last})")

    def _take_answers(self, t: int, wait_s: float | None = None) -> None:
        while True:
            try:
                answer = self._answers.get(timeout=wait_s) if wait_s is not None else self._answers.get_nowait()
            except queue.Empty:
                return
            wait_s = None
            self._take(t, *answer)

    def _take(
        self, t: int, episode: int, rid: int, step: int, result: Any, latency_s: float, version: str | None
    ) -> None:
        if episode != self._episode:
            return
        sent = self._pending.pop(rid, None)
        if isinstance(result, BaseException):
            self._failed(step, result)
            return
        if not self._pin.answered(version):  # another version than the episode's: stop (dropped)
            self._note_error(f"step {step}: answered by version {version}, not the episode's {self._pin.version}")
            return
        self.stats.version_switches = self._pin.switches
        self._backoff_s = BACKOFF_S
        self.stats.latencies_s.append(latency_s)
        actions = np.asarray(result[self.action_key])
        if actions.ndim < 1 or len(actions) == 0:
            self._failed(step, PolicyClientError(f"{self.action_key!r} is not a chunk: shape {list(actions.shape)}"))
            return
        self._horizon = len(actions)
        self._action_like = actions[0]
        if step <= self._newest_step:
            self.stats.out_of_order += 1
            return
        if step + len(actions) <= t:
            self.stats.stale_chunks += 1
            return
        stale = sent is not None and sent.prefix is not None and not plan_plays(
            self.merge, self._chunks, sent.prefix, step, t, len(actions))
        self.stats.stale_prefixes += stale
        self._chunks.append(Chunk(step=step, arrived=t, actions=actions, stale_prefix=stale))
        self._newest_step = step
        self._started = True
        self.stats.chunks += 1
        self.stats.skipped_actions += t - step
        self.stats.delays_steps.append(t - step)
        if version is not None:
            self.stats.versions[version] = self.stats.versions.get(version, 0) + 1

    def _failed(self, step: int, error: BaseException) -> None:
        self.stats.failures += 1
        self._note_error(f"step {step}: {error}")
        if self._pin.failed(error):  # the episode's version was retired: stop, or go on unpinned at once
            self.stats.version_switches = self._pin.switches
            return
        if getattr(error, "status", None) == 422:
            self._decl.stale()  # refused as invalid: read the declarations again before the next request
        delay_s = self._backoff_s
        hint = getattr(error, "retry_after_s", None)
        if isinstance(hint, (int, float)) and hint >= 0:
            delay_s = float(hint)
        # While the plan still has actions, retry no later than a fresh chunk needs to leave
        # (at most one request per step); once it has run out, back off.
        if self._started and self._plan_end() > self._step:
            slack_s = (self._plan_end() - self._step - self.delay_estimate_steps() - 1) / self.rate_hz
            delay_s = min(delay_s, max(0.0, slack_s))
        self._retry_at = time.monotonic() + delay_s
        self._backoff_s = min(self.max_backoff_s, self._backoff_s * 2)
        log.warning("chunk request failed (%s); retrying in %.2f s", error, delay_s)

    def _note_error(self, message: str) -> None:
        self.stats.errors = [*self.stats.errors[-9:], message]
