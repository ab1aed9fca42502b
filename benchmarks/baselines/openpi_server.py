"""Baseline: an openpi-style WebSocket policy server (the reference the openpi wire is measured against).

Benchmark-only, loopback-only. It serves the way openpi's reference server does: one asyncio
process, the metadata frame on connect, then each frame decoded with openpi's own
``msgpack_numpy`` (unchecked dtypes, as there), the forward run inline on the event loop at
batch 1 (one at a time: no batching), the answer packed back. The policy and its forward are
the same as every other target's.

Run: python -m benchmarks.baselines.openpi_server --port PORT --model-path DIR
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

log = logging.getLogger("openpi_server")


async def serve(port: int, model_path: str) -> None:
    import numpy as np
    import torch
    import websockets.asyncio.server
    from openpi_client import msgpack_numpy

    from policy_server.model.loader import load_model_dir

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = load_model_dir(model_path, "cpu")

    def infer(obs: dict) -> dict:
        batch = {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in obs.items()}
        with torch.inference_mode():
            out = model.policy.forward(batch)
        actions = out["action"][0].numpy()
        return {"action": actions, "actions": actions}

    async def handler(websocket) -> None:
        packer = msgpack_numpy.Packer()
        await websocket.send(packer.pack({}))
        while True:
            try:
                obs = msgpack_numpy.unpackb(await websocket.recv())
            except websockets.ConnectionClosed:
                return
            await websocket.send(packer.pack(infer(obs)))  # inline: blocks the event loop, as openpi's does

    async with websockets.asyncio.server.serve(handler, "127.0.0.1", port, compression=None, max_size=None) as server:
        log.info("openpi-style server on 127.0.0.1:%d", port)
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-path", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    asyncio.run(serve(args.port, args.model_path))


if __name__ == "__main__":
    main()
