"""What the safety checks of an update cost, in-process, for one model directory.

Per step, over ``--repeats`` runs: median, p90 and max in milliseconds of

- ``copy_confined``: staging by :func:`policy_server.model.files.copy_tree` (fd walk,
  O_NOFOLLOW, link checks), against ``copy_shutil`` (``shutil.copytree``, what it replaced);
- ``check_directory``: every safetensors header parsed strictly and every tensor finite;
- ``check_push``: a pushed state dict checked against the header (keys, dtype, shape, finite);
- ``warm_up``: the warm-up (batch 1 twice, then the batch cap), which now also checks
  every row finite and compares the outputs of its distinct observations (no extra forward).

    python benchmarks/bench_update_checks.py --model models/default --repeats 20
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.timing import write_json  # noqa: E402
from policy_server.config import ServerConfig  # noqa: E402
from policy_server.model import files as model_files  # noqa: E402
from policy_server.model import weights_check
from policy_server.model.loader import load_model_dir  # noqa: E402
from policy_server.serving.served import prepare, warm_up  # noqa: E402

log = logging.getLogger("bench_update_checks")

def timed(fn, repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3),
            "max_ms": round(times[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/default")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model_dir = str(Path(args.model).resolve())
    scratch = Path(tempfile.mkdtemp(prefix="bench-checks-"))
    results = {}
    try:
        counter = iter(range(10 ** 9))

        def copy_confined():
            dest = scratch / f"c{next(counter)}"
            dest.mkdir()
            model_files.copy_tree(model_dir, str(dest), str(Path(model_dir).parent))

        def copy_shutil():
            shutil.copytree(model_dir, scratch / f"s{next(counter)}", ignore=shutil.ignore_patterns("__pycache__"))

        results["copy_confined"] = timed(copy_confined, args.repeats)
        results["copy_shutil"] = timed(copy_shutil, args.repeats)
        results["check_directory"] = timed(lambda: weights_check.check_directory(model_dir), args.repeats)
        from safetensors.numpy import load_file

        weights_path = str(Path(model_dir) / "model.safetensors")
        expected, _ = weights_check.read_header(weights_path)
        pushed = load_file(weights_path)
        results["check_push"] = timed(lambda: weights_check.check_push(pushed, expected), args.repeats)
        model = load_model_dir(model_dir, "cpu")
        served = prepare(model, ServerConfig(device="cpu"), ServerConfig().batch_size_for("cpu"))
        results["warm_up"] = timed(lambda: warm_up(served.executor, model), max(3, args.repeats // 4))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())
    report = {"model": args.model, "bytes": size, "repeats": args.repeats, "steps": results}
    log.info(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, report, indent=2)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    main()
