"""Close the reacher's control loop over the policy server, and in-process, and compare.

Each episode runs at the task's control rate (20 Hz) in real time: a
``robot_loop.ChunkRunner`` plays the current action chunk and asks the server for the
next one in the background, so the loop never waits on the network. The same episodes
(same seeds) then run with the policy loaded in this process through the same runner, so
the two success rates differ only by the serving path.

    python server.py &                                  # serves models/default
    python examples/sim_loop.py --episodes 50 --models default,transformer

A model the server does not serve yet is loaded there first (``POST /models/<name>/load``,
from ``models/<name>``). Reported per model and path: success rate, achieved control rate
and its worst period, round-trip latency p50/p99 of chunk requests, chunks, starved steps
(no action left), failed requests, the model versions that answered, and seam jerk: the
largest change of the joint command (action dims 0-1, rad/s) between the last action of one
chunk and the first played from the next.

A harder task and a latency sweep::

    python examples/sim_loop.py --models default,history --moving-target \
        --latency-ms 0,100,200,300,400 --jitter-ms 50 --merge replace --episodes 20

``--moving-target`` moves the reacher's target (see ``examples/reacher.py``);
``--latency-ms`` adds that much round-trip delay to every chunk request (plus up to
``--jitter-ms`` more, uniform, seeded) and runs the server path once per latency and per
``--merge`` strategy (``replace``, ``blend``, ``temporal_ensembling``, ``rtc``), printing one
table. Every path hands the runner the model's ``/model_info`` (``model_info=``), so the
runner keeps the history windows a model declares (the loop passes each step's
observation) and, for ``--merge rtc``, sends the real-time chunking inputs to a model that
lists them in ``optional_inputs`` (the transformer).

A model with a text input (``"dtype": "text"`` in ``/model_info``, e.g. ``models/instructed``)
runs on the instructed reacher (``examples/reacher_instructed.py``): each episode draws a
red and a blue disc and an instruction naming one, and every observation handed to the
runner carries it as ``"prompt": "<str>"`` (in-process, the policy gets it as a list of
one str). ``--skip-server`` runs the in-process path only::

    python examples/sim_loop.py --models instructed --episodes 50 --skip-server

A vectorized evaluation: ``--vectorized 64`` runs 64 environments in lockstep, as fast as
the server answers, with one ``PolicyClient.infer_batch`` request per step for every live
environment (``--vectorized-execute`` actions of each chunk played per request); it windows
the history inputs itself (``reacher.ObservationWindow``), since no runner is in that path.

A per-episode canary (``examples/canary_demo.py``): ``--canary 0.5`` publishes a deliberately
worse version of the default policy (``--canary-noise``) as a canary for half of the new
episodes, runs ``--episodes`` episodes through a runner that pins each one and reports its
outcome, prints success per version from the server's counters, then ends the canary
(``--canary-keep`` leaves it running)::

    python examples/sim_loop.py --canary 0.5 --episodes 40 --skip-in-process
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The report, the injected delay and the vectorized evaluation live in their own modules;
# their public names are re-exported here.
from examples.canary_demo import run_canary  # noqa: E402
from examples.delayed_policy import DelayedPolicy  # noqa: E402
from examples.path_report import TABLE_HEADER, PathReport  # noqa: E402
from examples.reacher import ObservationWindow, ReacherEnv  # noqa: E402, F401
from examples.reacher_instructed import InstructedReacherEnv  # noqa: E402
from examples.vectorized_eval import history_windows, run_vectorized  # noqa: E402, F401
from request_tools import PolicyClient, PolicyServerError  # noqa: E402
from robot_loop import ChunkRunner, LoopClock  # noqa: E402

log = logging.getLogger("sim_loop")

SEED_BASE = 1_000_000  # far from the seeds train_policies.py draws its data from


def make_runner(
    policy: Any,
    merge: str,
    model_info: Mapping[str, Any] | None = None,
    request_ahead: int | None = None,
) -> ChunkRunner:
    """A ``robot_loop.ChunkRunner`` at the reacher's rate with overlap strategy ``merge``,
    told the model's declarations (``model_info``: history windows, optional inputs);
    ``request_ahead`` fixes the runner's ask point (None: from the measured delay)."""
    return ChunkRunner(
        policy, rate_hz=ReacherEnv.control_hz, merge=merge, model_info=model_info, request_ahead=request_ahead
    )


def takes_text(model_info: Mapping[str, Any] | None) -> bool:
    """True when ``/model_info`` lists a text input (``"dtype": "text"``, e.g. the instructed policy's prompt)."""
    return any(entry.get("dtype") == "text" for entry in (model_info or {}).get("inputs", ()))


def make_env(seed: int, model_info: Mapping[str, Any] | None, *, moving_target: bool = False,
             swap: bool = False) -> ReacherEnv:
    """The episode's env for a model: the instructed reacher (two discs, an instruction
    drawn per episode in every phrasing; ``swap``: naming the other disc than usual, the
    mismatched control) for a model with a text input, else the reacher."""
    if not takes_text(model_info):
        return ReacherEnv(seed, moving_target=moving_target)
    if moving_target:
        raise ValueError("the instructed reacher has no moving targets")
    return InstructedReacherEnv(seed, swap=swap)


def run_episodes(
    policy: PolicyClient | Callable[[Mapping[str, Any]], Mapping[str, Any]],
    seeds: list[int],
    report: PathReport,
    *,
    model_info: Mapping[str, Any] | None = None,
) -> PathReport:
    """Run one episode per seed through a chunk runner at the task's control rate, on the
    instructed reacher for a model with a text input (:func:`make_env`), whose observations
    carry the episode's instruction as ``"prompt": str``.

    ``model_info`` (the model's ``/model_info``) goes to the runner: it keeps the history
    windows the model declares (each step's observation is passed as it comes) and sends
    the real-time chunking inputs for ``merge="rtc"`` when the model declares them.

    Jerk: the change of the joint command (dims 0-1) between consecutive played actions;
    a seam where the chunk behind the action changes (``runner.last_chunk_step``), in-chunk
    elsewhere. Steps into or out of a starved step (the fallback played) count as neither.
    """
    start = time.perf_counter()
    periods: list[float] = []
    seams: list[float] = []
    steps: list[float] = []
    with make_runner(policy, report.merge, model_info, report.request_ahead) as runner:
        for seed in seeds:
            env = make_env(seed, model_info, moving_target=report.moving_target, swap=report.swap_instruction)
            obs = env.reset()  # with a "prompt" (str) on the instructed reacher, the same for the episode
            runner.reset()
            clock = LoopClock(env.control_hz)
            previous, previous_chunk = None, None
            while not env.done:
                action = np.asarray(runner.act(obs))
                chunk = runner.last_chunk_step
                if previous is not None and chunk is not None and previous_chunk is not None:
                    change = float(np.max(np.abs(action[:2] - previous[:2])))
                    (seams if chunk != previous_chunk else steps).append(change)
                previous, previous_chunk = action, chunk
                obs = env.step(action).obs
                clock.tick()
            report.episodes += 1
            report.successes += env.success
            report.steps += env.steps
            report.achieved_hz.append(clock.achieved_hz)
            periods.extend(list(clock.periods_s)[1:])  # the first step waits for the episode's first chunk
        stats = runner.stats
        report.rtc = runner.real_time_chunking
    latencies = stats.latencies_s
    report.chunks, report.starved_steps, report.failures = stats.chunks, stats.starved_steps, stats.failures
    report.versions = dict(stats.versions)
    report.max_in_flight = stats.max_in_flight
    if latencies:
        report.latency_ms_p50 = float(np.percentile(latencies, 50) * 1e3)
        report.latency_ms_p99 = float(np.percentile(latencies, 99) * 1e3)
    if periods:
        report.period_ms_p99 = float(np.percentile(periods, 99) * 1e3)
        report.worst_period_ms = float(max(periods) * 1e3)
    if seams:
        report.seam_jerk, report.seam_jerk_mean, report.seams = float(max(seams)), float(np.mean(seams)), len(seams)
    if steps:
        report.step_jerk_max, report.step_jerk_mean = float(max(steps)), float(np.mean(steps))
        report.step_jerk_p99 = float(np.percentile(steps, 99))
    report.wall_s = time.perf_counter() - start
    return report

def in_process_policy(model_dir: str) -> Callable[[Mapping[str, Any]], dict[str, np.ndarray]]:
    """The policy loaded here (CPU), called one observation at a time (the whole window of a
    history input, as the runner sends it; a text input such as ``prompt`` as a ``str``,
    handed to the policy as a list of one); ``.model_info()`` is what ``/model_info`` would
    answer. Omitted optional inputs get the server's zeros."""
    import torch

    from examples.local_policy import forward_one, load_local

    torch.set_num_threads(1)
    model = load_local(model_dir, "cpu")
    lock = threading.Lock()  # one forward at a time, like one server worker

    def infer(obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        with lock:
            return forward_one(model, obs)

    info = model.info()
    infer.model_info = lambda: info  # type: ignore[attr-defined]
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


def numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:50000")
    parser.add_argument("--models", default="default", help="comma-separated model names")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=SEED_BASE, help="first episode seed")
    parser.add_argument("--swap-instruction", action="store_true",
                        help="instructed reacher: every instruction names the other disc (the mismatched control)")
    parser.add_argument("--model-root", default=os.path.join(ROOT, "models"), help="for the in-process runs")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--skip-server", action="store_true", help="run the in-process path only (no server)")
    parser.add_argument("--moving-target", action="store_true", help="the reacher's target moves")
    parser.add_argument(
        "--latency-ms",
        type=numbers,
        default=None,
        help="comma-separated injected round-trip latencies: one server run per value",
    )
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="plus uniform [0, this) per request")
    parser.add_argument("--merge", default="replace", help="comma-separated merge strategies of the chunk runner")
    parser.add_argument(
        "--request-ahead",
        type=int,
        default=None,
        help="ask for the next chunk with this many planned actions left (default: the measured delay)",
    )
    parser.add_argument("--vectorized", type=int, default=0, help="also run N environments in lockstep (infer_batch)")
    parser.add_argument("--vectorized-execute", type=int, default=1, help="actions played per lockstep request")
    parser.add_argument(
        "--vectorized-rows", type=int, default=0, help="most observations per request (0: all live environments in one)"
    )
    parser.add_argument("--canary", type=float, default=None,
                        help="run a canary demo: a worse default policy for this fraction of new episodes")
    parser.add_argument("--canary-noise", type=float, default=1.2, help="the worse version's weight noise (x std)")
    parser.add_argument("--canary-keep", action="store_true", help="leave the canary running at the end")
    parser.add_argument("--api-key", default=os.environ.get("POLICY_SERVER_API_KEY"))
    parser.add_argument("--admin-key", default=os.environ.get("POLICY_SERVER_ADMIN_KEY"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    seeds = list(range(args.seed, args.seed + args.episodes))
    merges = [m.strip() for m in args.merge.split(",") if m.strip()]
    latencies = args.latency_ms if args.latency_ms is not None else [0.0]
    sweep = args.latency_ms is not None or len(merges) > 1 or args.jitter_ms > 0
    reports: list[PathReport] = []
    attention: dict[str, Any] = {}
    vectorized: dict[str, Any] = {}

    def client_for(name: str) -> PolicyClient:
        return PolicyClient(args.url, api_key=args.api_key, admin_key=args.admin_key, model=name)

    if args.canary is not None:
        with PolicyClient(args.url, api_key=args.api_key, admin_key=args.admin_key, timeout_s=60) as client:
            client.wait_until_ready(timeout_s=120)
            canary = run_canary(client, os.path.join(args.model_root, "default"), seeds, fraction=args.canary,
                                noise=args.canary_noise, keep=args.canary_keep)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"episodes": args.episodes, "canary": canary}, fh, indent=2)
        return {"episodes": args.episodes, "canary": canary}

    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if not args.skip_server:
            with client_for(name) as client:
                client.wait_until_ready(timeout_s=120)
                try:
                    ensure_served(client, name)
                except PolicyServerError as exc:
                    raise SystemExit(f"cannot serve {name}: {exc}") from exc
                attention[name] = show_attention(client, name, seeds[0])
                info = client.model_info(name)
                for merge in merges:
                    for latency in latencies:
                        report = PathReport(
                            name,
                            "server",
                            merge,
                            latency,
                            args.jitter_ms,
                            args.moving_target,
                            args.swap_instruction,
                            request_ahead=args.request_ahead,
                        )
                        if latency or args.jitter_ms:
                            policy: Any = DelayedPolicy(
                                lambda name=name: client_for(name), latency / 1e3, args.jitter_ms / 1e3, seed=args.seed
                            )
                        else:
                            policy = client
                        reports.append(run_episodes(policy, seeds, report, model_info=info))
                        log.info("%s", reports[-1].line())
                if args.vectorized:
                    vectorized[name] = run_vectorized(
                        client,
                        list(range(args.seed, args.seed + args.vectorized)),
                        moving_target=args.moving_target,
                        execute=args.vectorized_execute,
                        max_rows=args.vectorized_rows,
                        make_env=lambda seed, info=info: make_env(seed, info, moving_target=args.moving_target,
                                                                  swap=args.swap_instruction),
                    )
                    log.info("%s vectorized: %s", name, json.dumps(vectorized[name]))
        if not args.skip_in_process:
            local = in_process_policy(os.path.join(args.model_root, name))
            report = PathReport(
                name, "in-process", merges[0], moving_target=args.moving_target,
                swap_instruction=args.swap_instruction, request_ahead=args.request_ahead,
            )
            reports.append(run_episodes(local, seeds, report, model_info=local.model_info()))
            log.info("%s", reports[-1].line())

    if sweep:
        log.info("\n%s\n%s", TABLE_HEADER, "\n".join(r.row() for r in reports if r.path == "server"))
    result = {
        "episodes": args.episodes,
        "seeds": [seeds[0], seeds[-1]],
        "control_hz": ReacherEnv.control_hz,
        "moving_target": args.moving_target,
        "reports": [{**asdict(r), "success_rate": r.success_rate} for r in reports],
        "attention": attention,
        "vectorized": vectorized,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
