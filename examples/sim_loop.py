"""Close the reacher's control loop over the policy server, and in-process, and compare.

Each episode runs at the task's control rate (20 Hz) in real time: a
``request_tools.ChunkRunner`` plays the current action chunk and asks the server for the
next one in the background, so the loop never waits on the network. The same episodes
(same seeds) then run with the policy loaded in this process through the same runner, so
the two success rates differ only by the serving path.

    python server.py &                                  # serves models/default
    python examples/sim_loop.py --episodes 50 --models default,transformer

A model the server does not serve yet is loaded there first (``POST /models/<name>/load``,
from ``models/<name>``). Reported per model and path: success rate, achieved control rate
and its worst period, round-trip latency p50/p99 of chunk requests, chunks, starved steps
(no action left), failed requests, and the model versions that answered.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from examples.reacher import ReacherEnv  # noqa: E402
from request_tools import ChunkRunner, LoopClock, PolicyClient, PolicyServerError  # noqa: E402

log = logging.getLogger("sim_loop")

SEED_BASE = 1_000_000  # far from the seeds train_policies.py draws its data from


@dataclass
class PathReport:
    """One model over N episodes on one path (server or in-process)."""

    model: str
    path: str
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
    wall_s: float = 0.0

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    def line(self) -> str:
        hz = np.median(self.achieved_hz) if self.achieved_hz else 0.0
        versions = ",".join(f"v{v}x{n}" for v, n in sorted(self.versions.items())) or "-"
        return (
            f"{self.model:<12} {self.path:<10} success {self.successes:>3}/{self.episodes:<3} "
            f"({self.success_rate:6.1%})  rate {hz:5.2f} Hz (period p99 {self.period_ms_p99:5.1f} ms, "
            f"worst {self.worst_period_ms:5.1f} ms)  latency p50 {self.latency_ms_p50:6.1f} ms p99 {self.latency_ms_p99:6.1f} ms  "
            f"chunks {self.chunks}  starved {self.starved_steps}  failed {self.failures}  versions {versions}"
        )


def run_episodes(
    policy: PolicyClient | Callable[[Mapping[str, Any]], Mapping[str, Any]],
    seeds: list[int],
    report: PathReport,
) -> PathReport:
    """Run one episode per seed through a ChunkRunner at the task's control rate."""
    start = time.perf_counter()
    periods: list[float] = []
    with ChunkRunner(policy, rate_hz=ReacherEnv.control_hz) as runner:
        for seed in seeds:
            env = ReacherEnv(seed)
            obs = env.reset()
            runner.reset()
            clock = LoopClock(env.control_hz)
            while not env.done:
                obs = env.step(runner.act(obs)).obs
                clock.tick()
            report.episodes += 1
            report.successes += env.success
            report.steps += env.steps
            report.achieved_hz.append(clock.achieved_hz)
            periods.extend(clock.periods_s[1:])  # the first step waits for the episode's first chunk
        stats = runner.stats
    latencies = stats.latencies_s
    report.chunks, report.starved_steps, report.failures = stats.chunks, stats.starved_steps, stats.failures
    report.versions = dict(stats.versions)
    if latencies:
        report.latency_ms_p50 = float(np.percentile(latencies, 50) * 1e3)
        report.latency_ms_p99 = float(np.percentile(latencies, 99) * 1e3)
    if periods:
        report.period_ms_p99 = float(np.percentile(periods, 99) * 1e3)
        report.worst_period_ms = float(max(periods) * 1e3)
    report.wall_s = time.perf_counter() - start
    return report


def in_process_policy(model_dir: str) -> Callable[[Mapping[str, Any]], dict[str, np.ndarray]]:
    """The policy loaded here (CPU), called one observation at a time."""
    import torch

    from policy_server.model_loader import load_model_dir

    torch.set_num_threads(1)
    model = load_model_dir(model_dir, "cpu")

    def infer(obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        batch = {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in obs.items()}
        outputs = model.policy.forward(batch)
        return {k: v[0].numpy() for k, v in outputs.items()}

    return infer


def ensure_served(client: PolicyClient, name: str) -> None:
    """Load ``name`` on the server (from models/<name>) unless it already serves it."""
    serving = {m["name"] for m in client.models() if m.get("state") == "serving"}
    if name not in serving:
        log.info("loading %s on the server", name)
        client.load_model(name, model_path=name, wait_s=120)


def show_attention(client: PolicyClient, name: str, seed: int) -> dict[str, Any] | None:
    """Ask once for the optional attention output, if the model has one; summarise it."""
    info = client.model_info(name)
    if "attention" not in info.get("optional_outputs", []):
        return None
    outputs = client.infer(ReacherEnv(seed).reset(), model=name, outputs=["attention"])
    attention = outputs["attention"]
    summary = {"shape": list(attention.shape), "row_sums": float(attention.sum(axis=-1).mean())}
    log.info("%s attention: shape %s, rows sum to %.3f", name, summary["shape"], summary["row_sums"])
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:50000")
    parser.add_argument("--models", default="default", help="comma-separated model names")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=SEED_BASE, help="first episode seed")
    parser.add_argument("--model-root", default=os.path.join(ROOT, "models"), help="for the in-process runs")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--api-key", default=os.environ.get("POLICY_SERVER_API_KEY"))
    parser.add_argument("--admin-key", default=os.environ.get("POLICY_SERVER_ADMIN_KEY"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    seeds = list(range(args.seed, args.seed + args.episodes))
    reports: list[PathReport] = []
    attention: dict[str, Any] = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        with PolicyClient(args.url, api_key=args.api_key, admin_key=args.admin_key, model=name) as client:
            client.wait_until_ready(timeout_s=120)
            try:
                ensure_served(client, name)
            except PolicyServerError as exc:
                raise SystemExit(f"cannot serve {name}: {exc}") from exc
            attention[name] = show_attention(client, name, seeds[0])
            reports.append(run_episodes(client, seeds, PathReport(name, "server")))
        log.info("%s", reports[-1].line())
        if not args.skip_in_process:
            local = in_process_policy(os.path.join(args.model_root, name))
            reports.append(run_episodes(local, seeds, PathReport(name, "in-process")))
            log.info("%s", reports[-1].line())

    result = {
        "episodes": args.episodes, "seeds": [seeds[0], seeds[-1]], "control_hz": ReacherEnv.control_hz,
        "reports": [{**asdict(r), "success_rate": r.success_rate} for r in reports],
        "attention": attention,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
