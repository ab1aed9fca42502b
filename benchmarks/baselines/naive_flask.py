"""Baseline: the naive policy server (in-band pickle, no batching, gunicorn sync worker).

Benchmark-only and loopback-only. It reads the body with ``request.get_data()`` and
answers an in-band pickle. Unlike the servers this project compares against, it decodes
the request with ``binary_to_dict`` rather than ``pickle.loads``: we ship no unsafe
decoder, not even in a benchmark (the in-band decode cost is the same order).

Run: gunicorn -w W -k sync -b 127.0.0.1:PORT "benchmarks.baselines.naive_flask:create_app()"
"""

from __future__ import annotations

import os
import pickle

from flask import Flask, Response, request

from binary_protocol import binary_to_dict


def create_app() -> Flask:
    import torch

    from policy_server.model.loader import load_model_dir

    torch.set_num_threads(int(os.environ.get("BASELINE_TORCH_THREADS", "1")))
    model = load_model_dir(os.environ["BASELINE_MODEL_PATH"], "cpu")
    app = Flask(__name__)

    @app.post("/infer")
    def infer():
        obs = binary_to_dict(request.get_data())
        batch = {s.name: torch.from_numpy(obs[s.name][None].copy()) for s in model.input_spec}
        with torch.inference_mode():
            out = model.policy.forward(batch)
        answer = {name: t[0].numpy() for name, t in out.items()}
        return Response(pickle.dumps(answer, protocol=5), mimetype="application/octet-stream")

    return app
