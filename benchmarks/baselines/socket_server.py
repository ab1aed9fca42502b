"""Baseline: a bare TCP server doing the same forward (the transfer floor).

Benchmark-only, loopback-only. Each message is a u64 little-endian length and a version-1
frame; the answer is the same. One thread per connection; forwards run one at a time at
batch 1 with every core's torch thread, so this is the fastest unbatched single process.

Run: python -m benchmarks.baselines.socket_server --port PORT --model-path DIR
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import struct
import threading

log = logging.getLogger("socket_server")
LENGTH = struct.Struct("<Q")


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def serve(port: int, model_path: str, threads: int) -> None:
    import torch

    from binary_protocol import binary_to_dict, dict_to_binary
    from policy_server.model.loader import load_model_dir

    torch.set_num_threads(threads)
    model = load_model_dir(model_path, "cpu")
    lock = threading.Lock()

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                header = recv_exact(conn, LENGTH.size)
                if header is None:
                    return
                obs = binary_to_dict(recv_exact(conn, LENGTH.unpack(header)[0]))
                batch = {s.name: torch.from_numpy(obs[s.name][None].copy()) for s in model.input_spec}
                with lock, torch.inference_mode():
                    out = model.policy.forward(batch)
                body = dict_to_binary({name: t[0].numpy() for name, t in out.items()})
                conn.sendall(LENGTH.pack(len(body)) + body)

    server = socket.create_server(("127.0.0.1", port))
    log.info("socket baseline ready on 127.0.0.1:%d", port)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    serve(args.port, args.model_path, args.threads)


if __name__ == "__main__":
    main()
