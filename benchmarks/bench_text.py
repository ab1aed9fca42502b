"""What a text input costs to serve: the instructed policy with its prompt on the wire, against
the same policy and weights with the prompt fixed inside it (no text input), in one run.

Usage: python benchmarks/bench_text.py [--runs 3] [--duration 6] [--sequential 200] [--clients 16]
                                       [--workers 2] [--json out.json]

Both targets are this server (``server.py``) serving ``models/instructed``; ``without_prompt``
serves a model directory made here whose ``policy.py`` loads the same policy and weights
and hands it the same prompt itself, declaring only the state and image inputs. Each run
measures both, alternating which goes first: one sequential client (p50/p90/p99 ms over
``--sequential`` requests, this project's ``PolicyClient``) and ``--clients`` concurrent
minimal keep-alive HTTP clients for ``--duration`` seconds (req/s, p50/p99). Prints the
medians and the ratios (goal: within 5%), writes JSON. Every server binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.bench_serving import free_port, median_of  # noqa: E402
from benchmarks.serving_load import concurrent, policy_client, raw_http_client, sequential  # noqa: E402
from benchmarks.serving_targets import Target  # noqa: E402
from binary_protocol import dict_to_binary  # noqa: E402

log = logging.getLogger("bench_text")
PROMPT = "reach the red target"
FIXED_POLICY = f'''
"""The instructed policy with its prompt fixed inside (benchmark only: no text input)."""
import importlib.util, os

_spec = importlib.util.spec_from_file_location("_instructed_for_bench", {str(ROOT / "models/instructed/policy.py")!r})
_instructed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_instructed)


class FixedPrompt:
    def __init__(self, policy):
        self.policy = policy
        self.input_spec = tuple(s for s in policy.input_spec if s.name != "prompt")
        self.output_spec = policy.output_spec
        self.encoded_inputs = getattr(policy, "encoded_inputs", ())

    def forward(self, batch):
        return self.policy.forward({{**batch, "prompt": [{PROMPT!r}] * batch["state"].shape[0]}})

    def num_parameters(self):
        return self.policy.num_parameters()


def load_model(model_dir, device):
    return FixedPrompt(_instructed.load_model({str(ROOT / "models/instructed")!r}, device))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "text.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from examples.reacher_instructed import InstructedReacherEnv

    obs = InstructedReacherEnv(seed=0).reset()
    with_prompt = {**obs, "prompt": PROMPT}
    without = {k: v for k, v in obs.items() if k != "prompt"}
    fixed_dir = Path(tempfile.mkdtemp(prefix="bench-text-")) / "fixed"
    fixed_dir.mkdir()
    (fixed_dir / "policy.py").write_text(FIXED_POLICY)

    def server(port: int, model: Path) -> list[str]:
        return [sys.executable, "server.py", "--port", str(port), "--workers", str(args.workers),
                "--threads", str(max(4, args.clients)), "--model-path", str(model),
                "--model-store", tempfile.mkdtemp(prefix="bench-store-")]

    ports = {"with_prompt": free_port(), "without_prompt": free_port()}
    targets = {
        "with_prompt": Target(
            "with_prompt", server(ports["with_prompt"], ROOT / "models" / "instructed"), {},
            lambda p: raw_http_client(p, dict_to_binary(with_prompt)), ports["with_prompt"],
            real_client=lambda p: policy_client(f"http://127.0.0.1:{p}", with_prompt),
        ),
        "without_prompt": Target(
            "without_prompt", server(ports["without_prompt"], fixed_dir), {},
            lambda p: raw_http_client(p, dict_to_binary(without)), ports["without_prompt"],
            real_client=lambda p: policy_client(f"http://127.0.0.1:{p}", without),
        ),
    }
    log_dir = Path(args.json).parent
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        for target in targets.values():
            target.start(log_dir)
        for run in range(args.runs):
            order = list(targets.values()) if run % 2 == 0 else list(reversed(targets.values()))
            for target in order:
                seq = sequential(target.real_client(target.port), args.sequential)
                conc = concurrent(target, args.clients, args.processes, args.duration)
                target.results.append({"sequential": seq, "concurrent": conc})
                log.info("  %s run %d: seq p50 %.2f ms; %d clients %.1f req/s p99 %.1f ms, errors %d",
                         target.name, run + 1, seq["p50_ms"], args.clients, conc["req_per_s"], conc["p99_ms"],
                         conc["errors"])
    finally:
        for target in targets.values():
            target.stop()
    summary = {
        name: {key: median_of(t.results, phase, field) for key, phase, field in (
            ("seq_p50_ms", "sequential", "p50_ms"), ("seq_p99_ms", "sequential", "p99_ms"),
            ("conc_req_per_s", "concurrent", "req_per_s"), ("conc_p99_ms", "concurrent", "p99_ms"))}
        for name, t in targets.items()
    }
    w, wo = summary["with_prompt"], summary["without_prompt"]
    ratios = {
        "seq_p50_with_over_without (goal <= 1.05)": w["seq_p50_ms"] / wo["seq_p50_ms"],
        "req_per_s_with_over_without (goal >= 0.95)": w["conc_req_per_s"] / wo["conc_req_per_s"],
    }
    for name, row in summary.items():
        log.info("%-15s seq p50 %6.2f ms p99 %6.2f ms | %d clients %7.1f req/s p99 %6.1f ms", name,
                 row["seq_p50_ms"], row["seq_p99_ms"], args.clients, row["conc_req_per_s"], row["conc_p99_ms"])
    for name, value in ratios.items():
        log.info("  %-45s %.3f", name, value)
    with open(args.json, "w") as fh:
        json.dump({"config": vars(args), "summary": summary, "ratios": ratios,
                   "runs": {n: t.results for n, t in targets.items()},
                   "median_seq_p50_per_run": {n: [float(np.round(r["sequential"]["p50_ms"], 3)) for r in t.results]
                                              for n, t in targets.items()}}, fh, indent=2)
    log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
