"""A fake batch executor whose batches can be held at a gate, for batcher tests (no torch)."""

from __future__ import annotations

import threading
import time

import numpy as np


class GatedExecutor:
    """Records each batch; a batch whose first input is ``"hold"`` waits until ``release()``."""

    pipelined = False

    def __init__(self, fail_marker: float | None = None) -> None:
        self.batches: list[list[float]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_marker = fail_marker

    def launch(self, requests):
        values = [float(r.inputs["x"].flat[0]) for r in requests]
        self.batches.append(values)
        if values[0] < 0:  # negative first value: hold the batch at the gate
            self.entered.set()
            self.gate.wait(10)
        if self.fail_marker is not None and self.fail_marker in values:
            raise RuntimeError("forward failed")
        return requests

    def finish(self, requests):
        return [{"y": r.inputs["x"] * 2} for r in requests], "v1"

    def release(self):
        self.gate.set()


def obs(value: float, shape=(2,)) -> dict:
    return {"x": np.full(shape, value, dtype=np.float32)}


def later(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds
