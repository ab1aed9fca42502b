"""The batch executor: one copy per input into reused staging, outputs safe from reuse; GPU path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from policy_server.contract import TensorSpec
from policy_server.inputs.tensors import sample_inputs
from policy_server.launcher import ROOT
from policy_server.model.loader import describe, load_model_dir
from policy_server.serving.executor import BatchExecutor
from policy_server.serving.served import Served, SpeedOptions, apply_speed_options
from tests.support.fakes import run_in_process

DEFAULT = ROOT + "/models/default"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class EchoPolicy:
    """Returns its input as output: the output tensor IS the staging buffer on CPU."""

    input_spec = (TensorSpec("x", "float32", (3,)),)
    output_spec = (TensorSpec("x", "float32", (3,)),)

    def forward(self, batch):
        return {"x": batch["x"]}


def rows_of(values):
    return [{"x": np.full(3, v, np.float32)} for v in values]


def test_outputs_that_alias_staging_survive_the_next_batch():
    executor = BatchExecutor(describe(EchoPolicy(), name="echo", version="1", device="cpu"), max_batch_size=4)
    first = executor.finish(executor.launch(rows_of([1.0, 2.0])))
    executor.finish(executor.launch(rows_of([7.0, 8.0])))
    assert [row["x"][0] for row in first] == [1.0, 2.0]


def test_staging_is_reused_not_reallocated():
    executor = BatchExecutor(describe(EchoPolicy(), name="echo", version="1", device="cpu"), max_batch_size=4)
    buffer = executor.slots[0].host_in["x"]
    for values in ([1.0], [2.0, 3.0, 4.0]):
        executor.finish(executor.launch(rows_of(values)))
        assert executor.slots[0].host_in["x"] is buffer
    np.testing.assert_array_equal(buffer[:3, 0].numpy(), [2.0, 3.0, 4.0])


def test_wrong_output_shape_is_a_model_error_not_a_broadcast():
    class Wrong(EchoPolicy):
        def forward(self, batch):
            return {"x": batch["x"][:, :1]}

    executor = BatchExecutor(describe(Wrong(), name="w", version="1", device="cpu"), max_batch_size=2)
    with pytest.raises(Exception, match=r"spec says \[1, 3\]"):
        executor.finish(executor.launch(rows_of([1.0])))


@pytest.mark.parametrize("options", [SpeedOptions(channels_last=True), SpeedOptions(quantize_int8=True),
                                     SpeedOptions(autocast="bf16")], ids=["channels_last", "int8", "bf16"])
def test_speed_options_keep_outputs_close_on_cpu(options):
    reference = load_model_dir(DEFAULT, "cpu")
    tuned = load_model_dir(DEFAULT, "cpu")
    apply_speed_options(tuned, options)
    executor = BatchExecutor(tuned, max_batch_size=4, autocast=options.autocast)
    sample = sample_inputs(reference.input_spec, batch=4, seed=9)
    observations = [{k: v[i] for k, v in sample.items()} for i in range(4)]
    want = np.stack([r["action"] for r in run_in_process(reference, observations)])
    rows = executor.finish(executor.launch(observations))
    got = np.stack([r["action"] for r in rows])
    assert got.dtype == np.float32
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert error < (2e-2 if options.autocast != "off" or options.quantize_int8 else 1e-5), error


# -- GPU: run on a machine with CUDA (skipped elsewhere) -------------------------------



@pytest.mark.gpu
@gpu
def test_gpu_staging_is_pinned_and_double_buffered():
    model = load_model_dir(DEFAULT, "cuda:0")
    executor = BatchExecutor(model, max_batch_size=8)
    assert executor.pipelined and len(executor.slots) == 2
    for slot in executor.slots:
        assert all(t.is_pinned() for t in slot.host_in.values())
        assert all(t.is_pinned() for t in slot.host_out.values())


@pytest.mark.gpu
@gpu
def test_gpu_results_equal_cpu_results():
    cpu = load_model_dir(DEFAULT, "cpu")
    cuda = load_model_dir(DEFAULT, "cuda:0")
    sample = sample_inputs(cpu.input_spec, batch=8, seed=4)
    observations = [{k: v[i] for k, v in sample.items()} for i in range(8)]
    want = np.stack([r["action"] for r in run_in_process(cpu, observations)])
    got = np.stack([r["action"] for r in run_in_process(cuda, observations)])
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert error < 1e-3, error  # TF32 convolutions may be on


@pytest.mark.gpu
@gpu
def test_gpu_pipelined_batches_under_concurrent_load_are_each_right():
    """Random data from many threads through the real batcher: catches staging reuse races."""
    from policy_server.serving.batcher import Batcher

    cpu = load_model_dir(DEFAULT, "cpu")
    cuda = load_model_dir(DEFAULT, "cuda:0")
    served = Served(cuda, BatchExecutor(cuda, max_batch_size=8), since=0.0)
    batcher = Batcher(served, max_batch_size=8, queue_size=1024)
    batcher.start()
    rng = np.random.default_rng(0)
    observations = [
        {"state": rng.standard_normal(6).astype(np.float32),
         "image": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)}
        for _ in range(64)
    ]
    want = [r["action"] for r in run_in_process(cpu, observations)]
    failures, batch_sizes = [], []

    def client(offset):
        import time
        for k in range(offset, len(observations), 8):
            request = batcher.submit(observations[k], time.monotonic() + 30)
            got, _ = batcher.wait(request)
            batch_sizes.append(request.batch_size)
            if not np.allclose(got["action"], want[k], rtol=1e-3, atol=1e-3):
                failures.append(k)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    batcher.stop(10)
    assert not failures
    assert max(batch_sizes) > 1


@pytest.mark.gpu
@gpu
def test_gpu_transfer_times_are_reported_per_batch():
    model = load_model_dir(DEFAULT, "cuda:0")
    executor = BatchExecutor(model, max_batch_size=4)
    seen = []
    executor.on_transfer = lambda h2d, d2h: seen.append((h2d, d2h))
    sample = sample_inputs(model.input_spec, batch=4, seed=2)
    for rows in (1, 4, 2):
        executor.finish(executor.launch([{k: v[i] for k, v in sample.items()} for i in range(rows)]))
    assert len(seen) == 3
    # an image row is 0.9 MB: no copy takes zero time, and none takes a second
    assert all(0.0 < h2d < 1.0 and 0.0 < d2h < 1.0 for h2d, d2h in seen), seen


def test_cpu_batches_report_no_transfers():
    executor = BatchExecutor(describe(EchoPolicy(), name="echo", version="1", device="cpu"), max_batch_size=2)
    executor.on_transfer = lambda *times: pytest.fail(f"CPU batch reported transfers {times}")
    executor.finish(executor.launch(rows_of([1.0])))
