"""Compressed camera images end to end: bytes, encode/decode time, latency and closed-loop success.

One server (``--workers 1``, default policy, which declares ``encoded_inputs = ("image",)``).
For each encoding (raw, ``jpeg:90``, ``jpeg:75``, ``png``), over reacher observations from
different seeds, sequentially through ``PolicyClient(encode=...)``:

- request body bytes (the wire-format body actually sent);
- client encode time (``image_codecs.encode_observation``);
- server decode time (the ``decode`` stage of ``Server-Timing``: wire format plus image decode);
- end-to-end latency of ``infer`` (p50/p90);
- the largest action difference against the raw answer for the same observation.

Then the sim loop (``examples/sim_loop.run_episodes``: ``ChunkRunner`` at 20 Hz, the
reacher's success criterion) for raw and ``jpeg:90`` on the same seeds, over the server and
in-process (no network: only the JPEG round trip differs, so a busy machine's latency does
not blur the image-quality effect).

    .venv/bin/python benchmarks/bench_images.py --n 100 --episodes 30
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.local_server import local_server  # noqa: E402
from benchmarks.timing import write_json  # noqa: E402
from binary_protocol import dict_to_binary  # noqa: E402
from examples.reacher import ReacherEnv  # noqa: E402
from examples.sim_loop import SEED_BASE, PathReport, run_episodes  # noqa: E402
from policy_client.image_codecs import encode_observation  # noqa: E402
from request_tools import PolicyClient  # noqa: E402

ENCODINGS = ("raw", "jpeg:90", "jpeg:75", "png")


log = logging.getLogger("bench_images")

def server_decode_ms(timing: str | None) -> float:
    for part in (timing or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name == "decode":
            return float(dur)
    return float("nan")


def per_request(url: str, n: int) -> list[dict]:
    observations = [ReacherEnv(seed=s).reset() for s in range(min(n, 50))]
    with PolicyClient(url) as raw:
        reference = [raw.infer(o)["action"] for o in observations]
    rows = []
    for encoding in ENCODINGS:
        encode = {} if encoding == "raw" else {"image": encoding}
        sizes, encode_ms, decode_ms, latency_ms, diffs = [], [], [], [], []
        with PolicyClient(url, encode=encode) as client:
            for i in range(n + 5):
                obs = observations[i % len(observations)]
                t0 = time.perf_counter()
                body = dict_to_binary(encode_observation(obs, encode)) if encode else dict_to_binary(dict(obs))
                t1 = time.perf_counter()
                start = time.perf_counter()
                action = client.infer(obs)["action"]
                elapsed = time.perf_counter() - start
                if i < 5:
                    continue  # warm-up
                sizes.append(len(body))
                encode_ms.append((t1 - t0) * 1e3)
                decode_ms.append(server_decode_ms(client.last_server_timing))
                latency_ms.append(elapsed * 1e3)
                diffs.append(float(np.abs(action - reference[i % len(observations)]).max()))
        row = {
            "encoding": encoding, "bytes_p50": int(np.median(sizes)),
            "client_encode_ms_p50": float(np.median(encode_ms)),
            "server_decode_ms_p50": float(np.median(decode_ms)),
            "latency_ms_p50": float(np.median(latency_ms)), "latency_ms_p90": float(np.percentile(latency_ms, 90)),
            "max_action_diff": max(diffs),
        }
        rows.append(row)
        log.info(f"{encoding:8} {row['bytes_p50']:9d} B  encode {row['client_encode_ms_p50']:6.2f} ms  "
              f"server decode {row['server_decode_ms_p50']:6.2f} ms  latency p50 {row['latency_ms_p50']:7.2f} "
              f"p90 {row['latency_ms_p90']:7.2f} ms  max |action - raw| {row['max_action_diff']:.4f}")
    return rows


def closed_loop(url: str, episodes: int, seed: int) -> list[dict]:
    seeds = list(range(seed, seed + episodes))
    out = []
    for encoding in ("raw", "jpeg:90"):
        encode = {} if encoding == "raw" else {"image": encoding}
        with PolicyClient(url, encode=encode) as client:
            report = run_episodes(client, seeds, PathReport("default", f"server {encoding}"))
        out.append({"encoding": encoding, "episodes": episodes, "success_rate": report.success_rate,
                    "line": report.line()})
        log.info(f"sim loop {encoding:8} success {report.success_rate:.2f} over {episodes} episodes | {report.line()}")
    return out


def closed_loop_in_process(episodes: int, seed: int) -> list[dict]:
    """The same episodes in-process (no network, no queue): only the JPEG round trip differs."""
    from examples.sim_loop import in_process_policy
    from policy_server.contract import TensorSpec
    from policy_server.inputs.images import decoded_inputs

    policy = in_process_policy(str(Path(__file__).resolve().parent.parent / "models" / "default"))
    spec = [TensorSpec("image", "uint8", (480, 640, 3))]

    def through_jpeg(obs):
        encoded = encode_observation(obs, {"image": "jpeg:90"})
        with decoded_inputs({"image": encoded["image"]}, spec, ("image",), None, max_bytes=1 << 26) as decoded:
            return policy({**obs, "image": decoded["image"]})

    seeds = list(range(seed, seed + episodes))
    out = []
    for encoding, call in (("raw", policy), ("jpeg:90", through_jpeg)):
        report = run_episodes(call, seeds, PathReport("default", f"in-process {encoding}"))
        out.append({"encoding": encoding, "episodes": episodes, "success_rate": report.success_rate,
                    "line": report.line()})
        log.info(f"in-process {encoding:8} success {report.success_rate:.2f} over {episodes} episodes | "
                 f"{report.line()}")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="requests per encoding")
    parser.add_argument("--episodes", type=int, default=30, help="sim loop episodes per encoding (0: skip)")
    parser.add_argument("--seed", type=int, default=SEED_BASE, help="first episode seed (held out from training)")
    parser.add_argument("--skip-server", action="store_true", help="only the in-process closed loop")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = {}
    if not args.skip_server:
        with local_server([]) as (url, _):
            result["per_request"] = per_request(url, args.n)
            if args.episodes:
                result["sim_loop"] = closed_loop(url, args.episodes, args.seed)
    if args.episodes:
        result["sim_loop_in_process"] = closed_loop_in_process(args.episodes, args.seed)
    if args.json:
        write_json(args.json, result, indent=1)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    main()
