"""Encode and decode time of the candidate image codecs for one 480x640x3 uint8 camera frame.

JPEG: simplejpeg, OpenCV (opencv-python-headless) and PyTurboJPEG (needs the system's
libturbojpeg; skipped when absent). PNG: Pillow and OpenCV. The frame is a reacher render
(examples/reacher.py) plus, as a harder case, camera-like noise. Median and p90 over --iters
after warm-up, and the encoded size. Uninstalled libraries are skipped.

    .venv/bin/python benchmarks/bench_codecs.py --iters 50
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import write_json  # noqa: E402
from examples.reacher import ReacherEnv  # noqa: E402

log = logging.getLogger("bench_codecs")

def frames() -> dict[str, np.ndarray]:
    env = ReacherEnv(seed=3)
    render = np.ascontiguousarray(env.reset()["image"])
    noise = np.random.default_rng(0).normal(0, 8, render.shape)
    return {"reacher": render, "reacher+noise": np.clip(render + noise, 0, 255).astype(np.uint8)}


def codecs(quality: int) -> dict[str, tuple]:
    found = {}
    try:
        import simplejpeg

        found["jpeg simplejpeg"] = (
            lambda a: simplejpeg.encode_jpeg(a, quality=quality, colorspace="RGB"),
            lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"),
        )
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(1)
        found["jpeg opencv"] = (
            lambda a: cv2.imencode(".jpg", a[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes(),
            lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[..., ::-1],
        )
        found["png opencv"] = (
            lambda a: cv2.imencode(".png", a[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes(),
            lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[..., ::-1],
        )
    except ImportError:
        pass
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        tj = TurboJPEG()
        found["jpeg pyturbojpeg"] = (
            lambda a: tj.encode(a, quality=quality, pixel_format=TJPF_RGB),
            lambda b: tj.decode(b, pixel_format=TJPF_RGB),
        )
    except (ImportError, RuntimeError, OSError) as exc:
        log.warning(f"pyturbojpeg skipped: {exc}")
    try:
        from PIL import Image

        def png_encode(a):
            out = io.BytesIO()
            Image.fromarray(a).save(out, format="PNG", compress_level=1)
            return out.getvalue()

        found["png pillow"] = (png_encode, lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")))
    except ImportError:
        pass
    return found


def timed(fn, arg, iters: int) -> np.ndarray:
    for _ in range(3):
        fn(arg)
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        fn(arg)
        times[i] = time.perf_counter() - t0
    return times * 1e3


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    log.info(
        f"{'frame':14} {'codec':18} {'bytes':>8} {'enc p50':>8} {'enc p90':>8} "
        f"{'dec p50':>8} {'dec p90':>8} {'max err':>7}"
    )
    for frame_name, frame in frames().items():
        for name, (encode, decode) in codecs(args.quality).items():
            data = encode(frame)
            err = int(np.abs(decode(data).astype(int) - frame).max())
            enc, dec = timed(encode, frame, args.iters), timed(decode, data, args.iters)
            row = {
                "frame": frame_name,
                "codec": name,
                "bytes": len(data),
                "encode_ms_p50": np.median(enc),
                "encode_ms_p90": np.percentile(enc, 90),
                "decode_ms_p50": np.median(dec),
                "decode_ms_p90": np.percentile(dec, 90),
                "max_abs_error": err,
            }
            results.append(row)
            log.info(
                f"{frame_name:14} {name:18} {len(data):8d} {row['encode_ms_p50']:8.2f} {row['encode_ms_p90']:8.2f} "
                f"{row['decode_ms_p50']:8.2f} {row['decode_ms_p90']:8.2f} {err:7d}"
            )
    if args.json:
        write_json(args.json, results, indent=1, default=float)
    return {"results": results}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    main()
