"""The robot loop: play action chunks at a fixed rate while the next ones are computed elsewhere.

:class:`ChunkRunner` makes a control loop over the network feel local. ``runner.act(obs)``
once per control step returns the action to apply now and never waits on the network once
an episode's first chunk is in. In the background it sends observations early enough, with
as many requests in flight as the measured latency needs, that a fresh action chunk
arrives before the plan runs out; every answer is stamped with the step of its
observation, so its rows land on the steps they were planned for. Overlapping chunks are
merged by a pluggable :class:`MergeStrategy`: ``replace``, ``blend``,
``temporal_ensembling`` (ACT) or ``rtc`` (real-time chunking). Inputs the model declares as
history windows are kept per episode and sent whole; the server stays stateless.

The runner talks to a :class:`ChunkPolicy`: any callable ``policy(obs, *, deadline_s=None)``
returning a dict with the chunk (``request_tools.PolicyClient`` is one, and so is a plain
in-process function ``policy(obs)``). Imports only numpy, the standard library and
``request_tools``' error types.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from request_tools import ObservationSpecError, PolicyClientError, PolicyTimeoutError
from chunk_merge import (  # noqa: F401 - re-exported
    MERGE_STRATEGIES,
    BlendMerge,
    Chunk,
    MergeStrategy,
    RealTimeChunking,
    ReplaceMerge,
    TemporalEnsembling,
    merge_strategy,
)

__all__ = [
    "MERGE_STRATEGIES",
    "RTC_INPUTS",
    "BlendMerge",
    "Chunk",
    "ChunkPolicy",
    "ChunkRunner",
    "LoopClock",
    "MergeStrategy",
    "RealTimeChunking",
    "ReplaceMerge",
    "RunnerStats",
    "TemporalEnsembling",
    "merge_strategy",
]

log = logging.getLogger(__name__)

# The optional inputs of a policy that supports real-time chunking (arXiv 2506.07339).
RTC_INPUTS = ("action_prefix", "prefix_length", "inference_delay")
HISTORY_PADS = ("repeat_first", "zeros")
BACKOFF_S = 0.05
HISTORY_LEN = 1000  # samples kept of each per-request / per-step history in RunnerStats
LATENCY_WINDOW = 20  # requests the delay estimate looks back over
WARMUP_REQUESTS = 10  # until this many latencies are known, the delay is assumed long
MAX_THREADS = 32


@runtime_checkable
class ChunkPolicy(Protocol):
    """What a :class:`ChunkRunner` needs: ``policy(obs, *, deadline_s=None) -> {"action": [H, ...]}``.

    ``deadline_s`` bounds the call (the runner passes the time its answer stays useful); a
    callable without that keyword is called as ``policy(obs)``. Optional, found by name:
    ``model_info()`` (a ``/model_info`` dict: ``inputs`` with ``history`` windows,
    ``optional_inputs``), ``clone()`` (an equivalent policy for another request thread,
    used when more than one request is in flight; without it the same object is called
    from several threads) and ``last_model_version`` (read after each call).
    """

    def __call__(self, obs: Mapping[str, Any], *, deadline_s: float | None = None) -> Mapping[str, Any]: ...


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else 0.0


@dataclass
class RunnerStats:
    """What a :class:`ChunkRunner` did. Histories keep the last ``HISTORY_LEN`` samples."""

    steps: int = 0  # actions handed out by act()
    requests: int = 0  # chunk requests sent
    chunks: int = 0  # chunks received and merged into the plan
    failures: int = 0  # requests that failed (error, timeout, deadline): the runner retried
    starved_steps: int = 0  # steps with no planned action: the fallback was played
    stale_chunks: int = 0  # chunks that arrived after their last action's step: dropped
    out_of_order: int = 0  # answers older than a chunk already received: dropped
    skipped_actions: int = 0  # leading rows of received chunks whose step had passed
    stale_prefixes: int = 0  # rtc answers whose prefix was no longer the plan: anchored to it
    in_flight: int = 0  # requests out now
    max_in_flight: int = 0  # the most requests out at once
    delay_steps: int = 0  # the delay the runner plans with now: steps from observation to answer (high estimate)
    latencies_s: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))  # successful requests
    delays_steps: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))  # measured, per answer
    staleness_steps: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))  # per played action
    versions: dict[str, int] = field(default_factory=dict)  # model version -> chunks received
    errors: list[str] = field(default_factory=list)  # the last few failure messages

    def to_dict(self) -> dict[str, Any]:
        """Counts, latency p50/p99 (ms) and delay/staleness summaries (steps), JSON-ready."""
        out: dict[str, Any] = {k: getattr(self, k) for k in (
            "steps", "requests", "chunks", "failures", "starved_steps", "stale_chunks", "out_of_order",
            "skipped_actions", "stale_prefixes", "in_flight", "max_in_flight", "delay_steps")}
        out["latency_ms_p50"] = _percentile(self.latencies_s, 50) * 1e3
        out["latency_ms_p99"] = _percentile(self.latencies_s, 99) * 1e3
        out["delay_steps_p50"] = _percentile(self.delays_steps, 50)
        out["delay_steps_max"] = max(self.delays_steps, default=0)
        out["staleness_steps_p50"] = _percentile(self.staleness_steps, 50)
        out["staleness_steps_max"] = max(self.staleness_steps, default=0)
        out["versions"] = dict(self.versions)
        out["errors"] = list(self.errors)
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)


@dataclass
class _Request:
    step: int
    sent: float
    prefix: np.ndarray | None = None  # rtc: the plan's actions for steps step .. step + prefix_length - 1


def _accepts_deadline(policy: Any) -> bool:
    try:
        params = inspect.signature(policy).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "deadline_s" or p.kind is p.VAR_KEYWORD for p in params)


def rtc_request_ahead(delay: int, horizon: int) -> int:
    """Planned actions left at which a real-time chunking runner asks (steps; ``delay`` d and
    ``horizon`` H in steps): ``d + max(2, (H - d) // 2)``, capped at ``H - d``, never below d.

    Asking only when about d actions are left sends a prefix of about d + 1 rows, so the
    server has one row after the delay to blend over and the seam is nearly a plain replace.
    Asking earlier is the paper's execution horizon s (Black et al. 2025, arXiv 2506.07339,
    section 4: replan every s steps with d <= s <= H - d): asking with ``ahead`` left is
    s = H - ahead, so the cap at H - d keeps s >= d (about one request in flight, no more
    requests per step than before), and from d >= H / 2 on there is no such s and the
    runner asks at d left, as it does without real-time chunking.
    """
    return max(delay, min(delay + max(2, (horizon - delay) // 2), horizon - delay))


class ChunkRunner:
    """Plays action chunks at the loop's rate and fetches the next ones in the background.

    Call :meth:`act` once per control step with that step's observation. A chunk computed
    from step ``s``'s observation is ``[H, *action_shape]``, row ``i`` planned for step
    ``s + i``; rows whose step has passed when it arrives are dropped, and an answer older
    than a chunk already received is dropped (out of order).

    Scheduling: with ``d`` the delay estimate in steps (the slowest of the last 20
    requests; until 10 are measured, at least half the horizon), a request goes out when
    the plan, counting the chunks still in flight, has ``d`` or fewer actions left after
    this step: at most one per step and at most ``max_in_flight`` at once, and while
    ``2 * d < H`` only one (its answer comes in time to ask again). So latency past
    half the horizon keeps several requests in flight (a new one about every ``H - d``
    steps), up to about ``0.85 x H``. A request in flight stops counting once it is overdue
    (older than one step more than any recent answer took), so a late answer is hedged by
    another request. Each
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
            the measured delay d; with real-time chunking on, :func:`rtc_request_ahead`, earlier,
            so the prefix overlaps the fresh chunk for several rows after d).
        max_in_flight: the most requests out at once (None: the chunk's horizon).
        fallback: the action played when no action is planned.
        first_chunk_timeout_s: how long the first :meth:`act` of an episode waits.
        max_backoff_s: cap of the retry backoff after failures.
        model_info: the model's ``/model_info`` dict (default: ``policy.model_info()`` if
            the policy has it, else no history windows and no optional inputs).

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
        self._given_info = model_info
        self._info: Mapping[str, Any] | None = None
        self._info_failed = False
        self._rtc = False
        self._windows: dict[str, tuple[int, str, tuple[int, ...], deque]] = {}
        self._accepts_deadline = _accepts_deadline(policy)
        self._answers: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pool_lock = threading.Lock()
        self._busy = 0
        self._workers: list[threading.Thread] = []
        self._clones: list[Any] = []
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

    def reset(self) -> None:
        """Start a new episode: forget the plan and the history windows (answers still in
        flight are discarded when they arrive)."""
        self._episode += 1
        self._step = 0
        self._chunks: list[Chunk] = []
        self._newest_step = -1
        self._started = False
        self._pending: dict[int, _Request] = {}
        self._retry_at = 0.0
        self._backoff_s = BACKOFF_S
        self.last_chunk_step: int | None = None  # observation step of the chunk behind the last action
        for _, _, _, window in self._windows.values():
            window.clear()
        if self._info_failed:
            self._info = None  # read the model's declarations again at the first act

    def close(self) -> None:
        """Stop the request threads (after the requests in flight, if any)."""
        for _ in self._workers:
            self._jobs.put(None)
        give_up = time.monotonic() + self.first_chunk_timeout_s
        for worker in self._workers:
            worker.join(timeout=max(0.0, give_up - time.monotonic()))
        for clone in self._clones:
            if callable(getattr(clone, "close", None)):
                clone.close()
        self._workers, self._clones = [], []

    @property
    def horizon_s(self) -> float | None:
        """Seconds a chunk covers, or None before the first one."""
        return None if self._horizon is None else self._horizon / self.rate_hz

    @property
    def real_time_chunking(self) -> bool:
        """True when requests carry the plan's prefix (merge ``rtc`` and the model declares it)."""
        return self._rtc

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
        if self._info is None:
            self._read_model_info()
        self._observe(obs)
        self._take_answers(t)
        if not self._started:
            self._wait_first_chunk(obs, t)
        action = self.merge.action(t, self._chunks)
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
        recent = list(self.stats.latencies_s)[-LATENCY_WINDOW:]
        measured = math.ceil(max(recent, default=0.0) * self.rate_hz - 1e-9)
        if len(recent) < WARMUP_REQUESTS and self._horizon is not None and not measured_only:
            # The tail is unknown yet: plan as if answers took at least half the horizon.
            return max(measured, self._horizon // 2)
        return measured

    def _plan_end(self) -> int:
        return max((c.end for c in self._chunks), default=0)

    def _maybe_ask(self, obs: Mapping[str, Any], t: int) -> None:
        if time.monotonic() < self._retry_at or self._horizon is None or t <= self._newest_step:
            return
        live = [r for r in self._pending.values() if t < r.step + self._horizon]
        cap = self.max_in_flight or self._horizon
        if len(live) >= cap or self._busy >= MAX_THREADS:
            return
        delay = self.delay_estimate_steps()
        self.stats.delay_steps = delay
        # A request counts towards the plan until it is overdue; then another one hedges it.
        overdue = self.delay_estimate_steps(measured_only=True) + 1
        expected = [r.step + self._horizon for r in live if t - r.step <= overdue]
        if expected and self.request_ahead is None and 2 * delay < self._horizon:
            return  # the answer in flight arrives in time to ask again: one request is enough
        covered = max([self._plan_end(), *expected])
        if self.request_ahead is not None:
            ahead = self.request_ahead
        elif self._rtc:
            ahead = rtc_request_ahead(delay, self._horizon)
        else:
            ahead = delay
        if covered - (t + 1) <= ahead:
            self._ask(obs, t, deadline_s=(self._horizon - 1) / self.rate_hz, delay=delay)

    # -- model declarations: history windows and real-time chunking --------------------

    def _read_model_info(self) -> None:
        info: Mapping[str, Any] = {}
        self._info_failed = False
        if self._given_info is not None:
            info = self._given_info
        elif callable(getattr(self.policy, "model_info", None)):
            try:
                info = self.policy.model_info()
            except Exception as exc:  # noqa: BLE001 - the loop goes on without declarations
                log.warning("could not read the model's declarations (%s); reading again next episode", exc)
                self._note_error(f"model_info: {exc}")
                self._info_failed = True
        self._info = info
        inputs = {entry["name"]: entry for entry in info.get("inputs", [])}
        self._windows = {}
        for name, entry in inputs.items():
            history = entry.get("history")
            if history:
                pad = history.get("pad", "repeat_first")
                if pad not in HISTORY_PADS:
                    raise ValueError(f"input {name!r}: unknown history pad {pad!r}")
                self._windows[name] = (int(history["steps"]), pad, tuple(entry["shape"][1:]), deque())
        declared = set(info.get("optional_inputs", []))
        self._rtc = bool(self.merge.sends_prefix and declared.issuperset(RTC_INPUTS))
        if self.merge.sends_prefix and not self._rtc:
            log.info("the model does not declare %s: real-time chunking plays answers as they come", RTC_INPUTS)
        self._prefix_shape = tuple(inputs["action_prefix"]["shape"]) if self._rtc else None

    def _observe(self, obs: Mapping[str, Any]) -> None:
        for name, (steps, _, shape, window) in self._windows.items():
            if name not in obs:
                raise ObservationSpecError(name, "missing; the model takes a window of it, pass each step's value")
            value = np.array(obs[name])  # a copy: the caller may reuse its buffer
            if value.shape != shape:
                raise ObservationSpecError(
                    name, f"shape {list(value.shape)}, expected one step {list(shape)} (the runner keeps the window)")
            window.append(value)
            if len(window) > steps:
                window.popleft()

    def _request_obs(self, obs: Mapping[str, Any], t: int, delay: int) -> dict[str, Any]:
        request = dict(obs)
        for name, (steps, pad, _, window) in self._windows.items():
            rows = list(window)
            filler = rows[0] if pad == "repeat_first" else np.zeros_like(rows[0])
            request[name] = np.stack([filler] * (steps - len(rows)) + rows)
        if self._rtc:
            horizon, *action_shape = self._prefix_shape
            prefix = np.zeros((horizon, *action_shape), np.float32)
            length = 0
            for i in range(horizon):
                action = self.merge.action(t + i, self._chunks)
                if action is None:
                    break
                prefix[i], length = action, i + 1
            request["action_prefix"] = prefix
            request["prefix_length"] = np.array([length], np.int32)
            # Row 0 (this step's action) is played already: at least one row is committed.
            request["inference_delay"] = np.array([min(max(delay, 1), length)], np.int32)
        return request

    # -- requests and answers ---------------------------------------------------------

    def _ask(self, obs: Mapping[str, Any], t: int, *, deadline_s: float, delay: int = 0) -> None:
        request = self._request_obs(obs, t, delay)
        rid = next(self._ids)
        prefix = request["action_prefix"][:int(request["prefix_length"][0])] if self._rtc else None
        self._pending[rid] = _Request(t, time.monotonic(), prefix)
        self.stats.requests += 1
        with self._pool_lock:
            self._busy += 1
            if self._busy > len(self._workers) and len(self._workers) < MAX_THREADS:
                policy = self.policy
                if self._workers and callable(getattr(self.policy, "clone", None)):
                    policy = self.policy.clone()
                    self._clones.append(policy)
                worker = threading.Thread(target=self._serve, args=(policy,), name="chunk-runner", daemon=True)
                self._workers.append(worker)
                worker.start()
            self.stats.in_flight = self._busy
            self.stats.max_in_flight = max(self.stats.max_in_flight, self._busy)
        self._jobs.put((self._episode, rid, t, request, deadline_s, time.monotonic() + deadline_s))

    def _serve(self, policy: Any) -> None:
        while (job := self._jobs.get()) is not None:
            episode, rid, step, obs, deadline_s, deadline = job
            start = time.monotonic()
            version = None
            try:
                if start >= deadline:
                    raise PolicyTimeoutError("deadline passed while the request waited for a thread")
                left_s = deadline - start
                result: Any = policy(obs, deadline_s=left_s) if self._accepts_deadline else policy(obs)
                version = getattr(policy, "last_model_version", None)
                if not isinstance(result, Mapping) or self.action_key not in result:
                    raise PolicyClientError(f"policy output has no {self.action_key!r}")
            except Exception as exc:  # noqa: BLE001 - the loop goes on; the failure is reported
                result = exc
            latency_s = time.monotonic() - start
            with self._pool_lock:
                self._busy -= 1
                self.stats.in_flight = self._busy
            self._answers.put((episode, rid, step, result, latency_s, version))

    def _wait_first_chunk(self, obs: Mapping[str, Any], t: int) -> None:
        give_up = time.monotonic() + self.first_chunk_timeout_s
        while not self._started:
            if not self._pending:
                if self._retry_at >= give_up:
                    break
                time.sleep(max(0.0, self._retry_at - time.monotonic()))
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

    def _take(self, t: int, episode: int, rid: int, step: int, result: Any, latency_s: float, version: str | None) -> None:
        if episode != self._episode:
            return
        sent = self._pending.pop(rid, None)
        if isinstance(result, BaseException):
            self._failed(step, result)
            return
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
        stale = sent is not None and sent.prefix is not None and not self._plan_is(sent.prefix, step, t, len(actions))
        self.stats.stale_prefixes += stale
        self._chunks.append(Chunk(step=step, arrived=t, actions=actions, stale_prefix=stale))
        self._newest_step = step
        self._started = True
        self.stats.chunks += 1
        self.stats.skipped_actions += t - step
        self.stats.delays_steps.append(t - step)
        if version is not None:
            self.stats.versions[version] = self.stats.versions.get(version, 0) + 1

    def _plan_is(self, prefix: np.ndarray, step: int, t: int, horizon: int) -> bool:
        """Whether the plan still plays ``prefix`` (rows for steps ``step ..``) from the step
        before ``t`` on, over the answer's steps: no other answer changed it since it was
        sent, and the prefix reaches the last played step (with several requests in flight
        it may end before: the rows the answer chose then were played from other answers)."""
        for s in range(max(t - 1, step), step + horizon):
            action = self.merge.action(s, self._chunks)
            if s - step >= len(prefix):
                return action is None
            if action is None or not np.allclose(prefix[s - step], action, rtol=1e-6, atol=1e-6):
                return False
        return True

    def _failed(self, step: int, error: BaseException) -> None:
        self.stats.failures += 1
        self._note_error(f"step {step}: {error}")
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


class LoopClock:
    """Paces a control loop at ``rate_hz`` (absolute schedule, so sleep jitter does not
    accumulate) and records how it kept up: ``tick()`` once per step, after the step's work."""

    def __init__(self, rate_hz: float) -> None:
        self.period_s = 1.0 / rate_hz
        self.start = self._next = time.perf_counter()
        self.ticks = 0
        self.overruns = 0  # steps whose work took longer than the period
        self.periods_s: list[float] = []
        self._last = self.start

    def tick(self) -> None:
        self.ticks += 1
        self._next += self.period_s
        now = time.perf_counter()
        if now > self._next:
            self.overruns += 1
            self._next = now  # late: start the next period now rather than sprint to catch up
        else:
            time.sleep(self._next - now)
        now = time.perf_counter()
        self.periods_s.append(now - self._last)
        self._last = now

    @property
    def achieved_hz(self) -> float:
        elapsed = self._last - self.start
        return self.ticks / elapsed if elapsed > 0 else 0.0
