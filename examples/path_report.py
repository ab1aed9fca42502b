"""The sim loop's report: one model over N episodes on one path (server or in-process), and
the latency sweep's markdown table. Re-exported by ``examples/sim_loop.py``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PathReport:
    """One model over N episodes on one path (server or in-process)."""

    model: str
    path: str
    merge: str = "replace"
    latency_ms: float = 0.0  # injected round-trip delay
    jitter_ms: float = 0.0  # plus up to this much, uniform
    moving_target: bool = False
    swap_instruction: bool = False  # the instructed reacher's control: each instruction names the other disc
    episodes: int = 0
    successes: int = 0
    steps: int = 0
    achieved_hz: list[float] = field(default_factory=list)
    period_ms_p99: float = 0.0
    worst_period_ms: float = 0.0
    latency_ms_p50: float = 0.0
    latency_ms_p99: float = 0.0
    chunks: int = 0
    starved_steps: int = 0
    failures: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    seam_jerk: float = 0.0  # largest |change| of the joint command at a chunk boundary (rad/s)
    seam_jerk_mean: float = 0.0
    seams: int = 0  # chunk boundaries measured
    step_jerk_max: float = 0.0  # the same over the other steps (the policy's own change inside a chunk)
    step_jerk_p99: float = 0.0
    step_jerk_mean: float = 0.0
    rtc: bool = False  # requests carried the real-time chunking inputs
    max_in_flight: int = 0  # the most requests the runner had out at once
    request_ahead: int | None = None  # the runner's fixed ask point (None: from the measured delay)
    wall_s: float = 0.0

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    def line(self) -> str:
        hz = np.median(self.achieved_hz) if self.achieved_hz else 0.0
        versions = ",".join(f"v{v}x{n}" for v, n in sorted(self.versions.items())) or "-"
        return (
            f"{self.model:<12} {self.path:<10} {self.merge:<9} +{self.latency_ms:.0f}~{self.jitter_ms:.0f} ms  "
            f"{'(instructions swapped) ' if self.swap_instruction else ''}"
            f"success {self.successes:>3}/{self.episodes:<3} "
            f"({self.success_rate:6.1%})  rate {hz:5.2f} Hz (period p99 {self.period_ms_p99:5.1f} ms, "
            f"worst {self.worst_period_ms:5.1f} ms)  "
            f"latency p50 {self.latency_ms_p50:6.1f} ms p99 {self.latency_ms_p99:6.1f} ms  "
            f"chunks {self.chunks}  starved {self.starved_steps}  seam jerk {self.seam_jerk:.3f}  "
            f"failed {self.failures}  versions {versions}"
        )

    def row(self) -> str:
        """One row of the sweep table (markdown)."""
        merge = self.merge if self.request_ahead is None else f"{self.merge} (ask at {self.request_ahead} left)"
        return (
            f"| {self.model} | {merge} | {self.latency_ms:.0f} | {self.jitter_ms:.0f} | "
            f"{self.success_rate:.0%} | {self.starved_steps} / {self.steps} | {self.seam_jerk:.3f} | "
            f"{self.seam_jerk_mean:.3f} | {self.step_jerk_max:.3f} | {self.step_jerk_mean:.3f} | "
            f"{self.latency_ms_p50:.0f} | {self.max_in_flight} | {self.failures} |"
        )


TABLE_HEADER = (
    "| model | merge | latency ms | jitter ms | success | starved steps | seam jerk max | seam jerk mean "
    "| in-chunk max | in-chunk mean | round trip p50 ms | max in flight | failed |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
