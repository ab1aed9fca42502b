"""Batcher semantics with a fake executor of controllable latency (CPU only, no torch)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from policy_server.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull
from policy_server.serving.batcher import Batcher
from tests.support.gated_executor import GatedExecutor, later, obs
from tests.support.wait import eventually


def hold(batcher, executor):
    """Occupy the batcher with a batch held at the gate; return its request."""
    request = batcher.submit(obs(-1.0), later())
    assert executor.entered.wait(5)
    return request


def test_lone_request_runs_at_once_without_waiting_for_company(make_batcher):
    batcher, executor = make_batcher(max_batch_size=8)
    request = batcher.submit(obs(3.0), later())
    outputs, version = batcher.wait(request)
    np.testing.assert_array_equal(outputs["y"], np.full(2, 6.0, np.float32))
    assert version == "v1" and request.batch_size == 1
    assert executor.batches == [[3.0]]


def queue_behind_a_held_batch(batcher, executor, values) -> list:
    """Hold the batcher, queue one request per value, release, wait for all; the queued requests."""
    first = hold(batcher, executor)
    queued = [batcher.submit(obs(value), later()) for value in values]
    executor.release()
    for request in [first, *queued]:
        batcher.wait(request)
    return queued


def test_requests_queued_during_a_forward_form_the_next_batch(make_batcher):
    batcher, executor = make_batcher(max_batch_size=8)
    queued = queue_behind_a_held_batch(batcher, executor, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert executor.batches == [[-1.0], [1.0, 2.0, 3.0, 4.0, 5.0]]
    assert all(r.batch_size == 5 for r in queued)


def test_batches_are_capped_at_max_batch_size(make_batcher):
    batcher, executor = make_batcher(max_batch_size=3)
    queue_behind_a_held_batch(batcher, executor, [float(i) for i in range(1, 8)])
    assert [len(b) for b in executor.batches] == [1, 3, 3, 1]
    assert [v for b in executor.batches[1:] for v in b] == [float(i) for i in range(1, 8)]  # arrival order


def test_delay_waits_from_the_first_arrival_to_fill_a_batch(make_batcher):
    batcher, executor = make_batcher(max_batch_size=8, max_delay_s=0.3)
    first = batcher.submit(obs(1.0), later())
    time.sleep(0.1)  # the scenario: the second arrives 0.1 s into the first one's 0.3 s delay
    second = batcher.submit(obs(2.0), later())
    batcher.wait(first)
    batcher.wait(second)
    assert executor.batches == [[1.0, 2.0]]
    assert first.launched - first.enqueued >= 0.3 - 0.01


def test_delay_is_counted_from_arrival_not_from_when_the_batcher_is_free(make_batcher):
    batcher, executor = make_batcher(max_batch_size=8, max_delay_s=0.3)
    held = batcher.submit(obs(-1.0), later())
    assert executor.entered.wait(5)  # the held batch itself waited its 0.3 s
    late = batcher.submit(obs(5.0), later())
    time.sleep(0.4)  # its delay has passed while the batcher was busy
    released = time.monotonic()
    executor.release()
    batcher.wait(held)
    batcher.wait(late)
    assert late.launched - released < 0.25  # ran as soon as the batcher was free, no second wait


def test_delay_ends_early_when_the_batch_is_full(make_batcher):
    batcher, executor = make_batcher(max_batch_size=2, max_delay_s=5.0)
    a = batcher.submit(obs(1.0), later())
    b = batcher.submit(obs(2.0), later())
    batcher.wait(a)
    batcher.wait(b)
    assert a.launched - a.enqueued < 2.5 and executor.batches == [[1.0, 2.0]]


def test_incompatible_requests_never_share_a_batch(make_batcher):
    batcher, executor = make_batcher(max_batch_size=8)
    first = hold(batcher, executor)
    shapes = [(2,), (3,), (2,), (3,), (2,)]
    queued = [batcher.submit(obs(float(i + 1), shape), later()) for i, shape in enumerate(shapes)]
    executor.release()
    for request in [first, *queued]:
        batcher.wait(request)
    assert executor.batches == [[-1.0], [1.0, 3.0, 5.0], [2.0, 4.0]]
    different_dtype = batcher.submit({"x": np.ones(2, np.float64)}, later())
    batcher.wait(different_dtype)
    assert executor.batches[-1] == [1.0]


def test_byte_order_does_not_split_batches(make_batcher):
    batcher, executor = make_batcher(max_batch_size=8)
    first = hold(batcher, executor)
    little = batcher.submit(obs(1.0), later())
    big = batcher.submit({"x": np.full(2, 2.0, ">f4")}, later())
    executor.release()
    for request in (first, little, big):
        batcher.wait(request)
    assert executor.batches[1] == [1.0, 2.0]


def test_expired_requests_get_504_and_are_not_computed(make_batcher):
    batcher, executor = make_batcher(max_batch_size=8)
    first = hold(batcher, executor)
    expiring = batcher.submit(obs(7.0), time.monotonic() + 0.05)
    fresh = batcher.submit(obs(8.0), later())
    time.sleep(0.15)  # the scenario: its 0.05 s deadline passes while the batch is held
    executor.release()
    batcher.wait(first)
    batcher.wait(fresh)
    with pytest.raises(DeadlineExceeded) as info:
        batcher.wait(expiring)
    assert info.value.status == 504
    assert 7.0 not in [v for b in executor.batches for v in b]


def test_an_answer_computed_after_its_deadline_is_504_not_a_late_answer(make_batcher):
    batcher, executor = make_batcher(max_batch_size=8)
    late = batcher.submit(obs(-5.0), time.monotonic() + 0.1)  # held at the gate
    assert executor.entered.wait(5)  # its batch started in time
    time.sleep(0.2)  # the scenario: its 0.1 s deadline passes while its batch computes
    executor.release()
    with pytest.raises(DeadlineExceeded, match="before its batch finished.*late answer was dropped") as info:
        batcher.wait(late)
    assert info.value.status == 504
    assert executor.batches[0] == [-5.0]  # computed, but not answered
    on_time = batcher.submit(obs(6.0), later(1.0))
    assert batcher.wait(on_time)[0]["y"].flat[0] == 12.0


def test_full_queue_answers_503_with_retry_after_at_once(make_batcher):
    batcher, executor = make_batcher(max_batch_size=8, queue_size=2)
    first = hold(batcher, executor)
    accepted = [batcher.submit(obs(1.0), later()), batcher.submit(obs(2.0), later())]
    started = time.monotonic()
    with pytest.raises(QueueFull) as info:
        batcher.submit(obs(3.0), later())
    assert time.monotonic() - started < 0.5
    assert info.value.status == 503 and info.value.headers == {"Retry-After": "1"}
    executor.release()
    for request in [first, *accepted]:
        batcher.wait(request)


def test_a_raising_forward_fails_only_its_batch(make_batcher):
    executor = GatedExecutor(fail_marker=13.0)
    batcher, _ = make_batcher(executor, max_batch_size=8)
    first = hold(batcher, executor)
    doomed = [batcher.submit(obs(13.0), later()), batcher.submit(obs(14.0), later())]
    other_shape = batcher.submit(obs(15.0, (3,)), later())
    executor.release()
    batcher.wait(first)
    for request in doomed:
        with pytest.raises(InferenceFailed):
            batcher.wait(request)
    batcher.wait(other_shape)
    after = batcher.submit(obs(16.0), later())
    outputs, _ = batcher.wait(after)
    assert outputs["y"][0] == 32.0


def test_stop_answers_every_accepted_request_then_refuses(make_batcher):
    batcher, executor = make_batcher(max_batch_size=4)
    first = hold(batcher, executor)
    accepted = [batcher.submit(obs(float(i)), later()) for i in range(1, 11)]
    stopper = threading.Thread(target=batcher.stop, args=(10,))
    stopper.start()
    eventually(lambda: batcher._stopping, 5, "the batcher stopping")
    with pytest.raises(NotReady, match="shutting down"):
        batcher.submit(obs(99.0), later())
    executor.release()
    stopper.join(10)
    assert not stopper.is_alive()
    for i, request in enumerate([first, *accepted]):
        outputs, _ = batcher.wait(request)
        assert outputs["y"][0] == 2 * (-1.0 if i == 0 else float(i))
    assert sum(len(b) for b in executor.batches) == 11


def test_waiting_thread_gives_up_after_deadline_and_grace(monkeypatch, make_batcher):
    monkeypatch.setattr("policy_server.serving.batcher.RESULT_GRACE_S", 0.1)
    batcher, executor = make_batcher(max_batch_size=8)
    held = hold(batcher, executor)
    with pytest.raises(DeadlineExceeded, match="no answer in time"):
        held.deadline = time.monotonic()
        batcher.wait(held)
    assert held.cancelled


class VersionedExecutor:
    """A pipelined executor that answers its own version; finish blocks until released."""

    pipelined = True

    def __init__(self, version: str) -> None:
        self.version = version
        self.launched: list[list[float]] = []

    def launch(self, requests):
        self.launched.append([float(r.inputs["x"].flat[0]) for r in requests])
        return requests

    def finish(self, requests):
        return [{"y": r.inputs["x"]} for r in requests], self.version


def test_executor_swapped_between_batches_never_mixes_versions():
    """executor_for is asked once per batch: a swap while a pipelined batch is in flight
    lets that batch finish on the executor that launched it; the next batch uses the new one."""
    old, new = VersionedExecutor("1"), VersionedExecutor("2")
    current = {"m": old}
    asked = []

    def executor_for(request):
        asked.append(request.model)
        return current[request.model]

    batcher = Batcher(max_batch_size=2, executor_for=executor_for)
    first = [batcher.submit(obs(float(i)), later(), model="m") for i in range(2)]
    batcher.start()
    assert [batcher.wait(r)[1] for r in first] == ["1", "1"]
    current["m"] = new
    second = [batcher.submit(obs(float(i)), later(), model="m") for i in range(2, 4)]
    assert [batcher.wait(r)[1] for r in second] == ["2", "2"]
    batcher.stop(5)
    assert old.launched == [[0.0, 1.0]] and new.launched == [[2.0, 3.0]]
    assert asked == ["m", "m"]


def test_requests_for_different_models_never_share_a_batch(make_batcher):
    batcher, executor = make_batcher(max_batch_size=8)
    held = hold(batcher, executor)
    a = [batcher.submit(obs(1.0), later(), model="a") for _ in range(2)]
    b = batcher.submit(obs(2.0), later(), model="b")
    executor.release()
    for request in [held, *a, b]:
        batcher.wait(request)
    assert executor.batches[1:] == [[1.0, 1.0], [2.0]]
    assert b.batch_size == 1 and a[0].batch_size == 2


def test_a_model_gone_between_submit_and_launch_fails_only_its_batch():
    from policy_server.errors import UnknownModel

    def executor_for(request):
        if request.model == "gone":
            raise UnknownModel("model 'gone' was unloaded")
        return GatedExecutor()

    batcher = Batcher(max_batch_size=4, executor_for=executor_for)
    batcher.start()
    gone = batcher.submit(obs(1.0), later(), model="gone")
    kept = batcher.submit(obs(2.0), later(), model="kept")
    with pytest.raises(UnknownModel):
        batcher.wait(gone)
    assert batcher.wait(kept)[1] == "v1"
    batcher.stop(5)


@pytest.mark.parametrize("hook", ["launched", "finished"])
def test_an_observer_that_raises_never_stops_the_batcher(make_batcher, caplog, hook):
    """A metrics hook that raises is logged; the batch is answered and the thread serves on."""

    class Broken:
        def launched(self, batch):
            if hook == "launched":
                raise RuntimeError("observer broke on launched")

        def finished(self, batch):
            if hook == "finished":
                raise RuntimeError("observer broke on finished")

    batcher, executor = make_batcher(observer=Broken(), max_batch_size=4)
    for value in (1.0, 2.0, 3.0):
        outputs, version = batcher.wait(batcher.submit(obs(value), later()))
        np.testing.assert_array_equal(outputs["y"], np.full(2, 2 * value, np.float32))
        assert version == "v1"
    assert batcher._thread.is_alive()
    assert executor.batches == [[1.0], [2.0], [3.0]]
    assert f"observer broke on {hook}" in caplog.text
