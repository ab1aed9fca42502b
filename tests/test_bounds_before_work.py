"""Every bound is checked before the work it protects: rows and decoded bytes before any image
decodes, a PNG's size and chunk count before its decoder runs, declared OIP shapes before
JSON data converts; and the worker's probes keep answering while a large JSON body decodes."""

from __future__ import annotations

import concurrent.futures
import gc
import io
import json
import logging
import struct
import threading
import time
import weakref
import zlib

import numpy as np
import pytest
import requests
from PIL import Image

from binary_protocol import dict_to_binary, encoded_image
from policy_server.errors import DeadlineExceeded, InvalidInput, QueueFull
from policy_server.inputs import images
from policy_server.wsgi_keys import ByteBudget
from tests.support.apps import make_app
from tests.support.fakes import FakePolicy, fake_observation
from tests.support.serving import run_server
from tests.support.wait import eventually


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def never_decode(monkeypatch):
    monkeypatch.setattr(images, "_decode", lambda *a: pytest.fail("an image was decoded"))
    monkeypatch.setattr(images, "_header", lambda *a: pytest.fail("an image header was read"))


def encodable_client(**config):
    policy = FakePolicy()
    policy.encoded_inputs = ("image",)
    return make_app(policy, **config).test_client()


def post(client, obs, rows=None):
    body = dict_to_binary(obs)
    headers = {"X-Batch-Rows": str(rows)} if rows else {}
    return client.post("/infer", data=body, headers=headers, environ_overrides={"CONTENT_LENGTH": str(len(body))})


def vectorized(rows: int) -> dict:
    """``rows`` rows whose markers all share one small PNG (the body stays tiny)."""
    marker = encoded_image("png", png(fake_observation()["image"]))
    return {"state": np.zeros((rows, 6), np.float32), "image": [marker] * rows}


# -- encoded images -------------------------------------------------------------------


def test_more_rows_than_the_queue_holds_is_413_before_anything_decodes(monkeypatch):
    client = encodable_client(queue_size=16)
    never_decode(monkeypatch)
    response = post(client, vectorized(17), rows=17)
    assert response.status_code == 413 and "17 rows exceed the queue size 16" in response.get_json()["detail"]


def test_a_request_that_would_decode_past_the_body_limit_is_413_before_anything_decodes(monkeypatch):
    client = encodable_client(max_body_bytes=10_000)  # 52 rows of 8x8x3 = 9,984 bytes fit, 53 do not
    never_decode(monkeypatch)
    response = post(client, vectorized(53), rows=53)
    assert response.status_code == 413 and "decode to 10176 bytes" in response.get_json()["detail"]
    monkeypatch.undo()
    assert post(client, vectorized(52), rows=52).status_code == 200


def test_decoding_takes_its_bytes_from_the_worker_budget_and_gives_them_back(monkeypatch):
    spec, budget = FakePolicy().input_spec, ByteBudget(1000)
    budget.take(900)  # bodies being read by the front door
    with pytest.raises(QueueFull, match="900 bytes of request data held"):
        with images.decoded_inputs(vectorized(2), spec, ("image",), 2, max_bytes=1 << 20, budget=budget):
            pass
    assert budget.used == 900
    budget.give(900)
    with images.decoded_inputs(vectorized(2), spec, ("image",), 2, max_bytes=1 << 20, budget=budget) as out:
        assert budget.used == 2 * 192 and out["image"].shape == (2, 8, 8, 3)
    assert budget.used == 0


def test_encoded_data_longer_than_its_image_can_need_is_422_before_its_header_is_read(monkeypatch):
    never_decode(monkeypatch)
    padded = np.zeros(images.max_encoded_bytes((8, 8, 3)) + 1, np.uint8)
    padded[:8] = np.frombuffer(images.PNG_SIGNATURE, np.uint8)
    response = post(encodable_client(), {**fake_observation(), "image": {"codec": "png", "data": padded}})
    assert response.status_code == 422 and "at most 65920 accepted" in response.get_json()["detail"]


def chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_png_padded_with_a_flood_of_chunks_is_refused_before_decoding(monkeypatch):
    valid = png(fake_observation()["image"])
    iend = valid.rindex(b"IEND") - 4
    flood = valid[:iend] + chunk(b"tEXt") * 5000 + valid[iend:]  # 60 KB: inside the size bound
    monkeypatch.setattr(images, "_decode_png", lambda *a: pytest.fail("decoded"))
    with pytest.raises(InvalidInput, match="more than 1[0-9][0-9] chunks"):
        images.png_header(np.frombuffer(flood, np.uint8), "'image'")
    response = post(encodable_client(), {**fake_observation(), "image": encoded_image("png", flood)})
    assert response.status_code == 422 and "chunks" in response.get_json()["detail"]
    assert images.png_header(np.frombuffer(valid, np.uint8), "'image'") == (8, 8, 3)  # a real one passes


def test_an_image_of_many_idat_chunks_as_encoders_write_them_still_decodes():
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)  # incompressible
    raw = b"".join(b"\0" + image[y].tobytes() for y in range(64))
    data = zlib.compress(raw)
    idats = b"".join(chunk(b"IDAT", data[i:i + 1024]) for i in range(0, len(data), 1024))  # 1 KiB chunks
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
    encoded = images.PNG_SIGNATURE + ihdr + idats + chunk(b"IEND")
    out = np.empty((64, 64, 3), np.uint8)
    images.decode_into(encoded_image("png", encoded), out, "'image'")
    np.testing.assert_array_equal(out, image)


def test_a_pngs_compressed_text_and_profile_chunks_never_reach_the_decoder(monkeypatch):
    """Pillow inflates every zTXt, compressed iTXt and iCCP chunk it meets (up to 1 MiB each):
    60 of them in a 67 KB PNG cost 70 ms, 72 rows sharing it 5 s. Only IHDR, IDAT and IEND
    are decoded, and the pixels are the same."""
    from PIL import PngImagePlugin

    image = fake_observation()["image"]
    valid = png(image)
    iend = valid.rindex(b"IEND") - 4
    bomb = zlib.compress(b"\0" * (1 << 20), 9)  # 1 KB that inflates to 1 MiB
    extras = (chunk(b"zTXt", b"k\0\0" + bomb) * 20 + chunk(b"iTXt", b"k\0\1\0\0\0" + bomb) * 20
              + chunk(b"tEXt", b"k\0v") + chunk(b"gAMA", struct.pack(">I", 45455)))
    padded = valid[:33] + chunk(b"iCCP", b"p\0\0" + bomb) + valid[33:iend] + extras + valid[iend:]
    assert len(padded) < images.max_encoded_bytes(image.shape)  # inside every earlier bound
    inflated = []
    for name in ("chunk_zTXt", "chunk_iTXt", "chunk_iCCP", "chunk_tEXt"):
        monkeypatch.setattr(PngImagePlugin.PngStream, name, lambda *a, name=name: inflated.append(name))
    out = np.empty(image.shape, np.uint8)
    images.decode_into(encoded_image("png", padded), out, "'image'")
    assert inflated == []
    np.testing.assert_array_equal(out, image)
    assert images.png_pixel_chunks(padded) == images.png_pixel_chunks(valid)


def test_decoding_stops_when_the_deadline_passes_between_images(monkeypatch):
    """A vectorized request's images are decoded one after another; once its deadline has
    passed the rest are not decoded (504), so a slow body cannot spend seconds past it."""
    clock = iter(range(100))  # time.monotonic() as seen by the decoder: 0, 1, 2, ...
    monkeypatch.setattr(images, "time", type("Clock", (), {"monotonic": staticmethod(lambda: next(clock))}))
    decoded = []
    monkeypatch.setattr(images, "_decode", lambda marker, out, where: decoded.append(where))
    spec = FakePolicy().input_spec
    with pytest.raises(DeadlineExceeded, match="while decoding images, before input 'image' row 3"):
        with images.decoded_inputs(vectorized(8), spec, ("image",), 8, max_bytes=1 << 20, deadline=2.5):
            pass
    assert decoded == ["'image' row 0", "'image' row 1", "'image' row 2"]
    later = time.monotonic() + 3600  # through the app: its deadline has passed by the first image
    monkeypatch.setattr(images, "time", type("Clock", (), {"monotonic": staticmethod(lambda: later)}))
    response = post(encodable_client(), vectorized(4), rows=4)
    assert response.status_code == 504 and "while decoding images" in response.get_json()["detail"]
    assert len(decoded) == 3


# -- through a real worker ----------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def worker_pid(server) -> int:
    return next(iter(server.ready_workers()))


@pytest.mark.integration
def test_vectorized_encoded_requests_past_their_bounds_cost_the_worker_no_memory(tmp_path):
    """The shipped default model (640x480 images) accepts PNG. A 40 KB body naming 2,600 rows
    of one shared PNG would decode to 2.4 GB; one of 100 rows to 92 MB, over the 64 MiB body
    limit. Each is 413 before a byte is decoded, and the worker's memory does not move."""
    frame = png(np.zeros((480, 640, 3), np.uint8))
    with run_server(tmp_path, workers=1) as server:
        pid = worker_pid(server)
        before = rss_kib(pid)

        def send(rows: int) -> requests.Response:
            obs = {"state": np.zeros((rows, 6), np.float32), "image": [encoded_image("png", frame)] * rows}
            return requests.post(server.base_url + "/infer", data=dict_to_binary(obs), timeout=60,
                                 headers={"X-Batch-Rows": str(rows)})

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(send, [2600, 2600, 100, 100]))
        peak = rss_kib(pid)
        assert [a.status_code for a in answers] == [413] * 4, [a.text for a in answers]
        assert "rows exceed the queue size" in answers[0].json()["detail"]
        assert "would decode to" in answers[2].json()["detail"]
        assert peak - before < 50_000, (before, peak)  # KiB
        ok = send(8)  # 7.4 MB of decoded images: within every bound
        assert ok.status_code == 200, ok.text
        eventually(lambda: rss_kib(pid) - before < 100_000, 15, "the worker's memory back near where it was")


JSON_PROBE_PROMISE_S = 1.0


@pytest.mark.integration
def test_probes_answer_while_large_json_bodies_decode(tmp_path):
    """A 16 MB JSON body is refused before it is parsed. Eight clients keep sending the
    largest accepted all-JSON body, 1 MB of nested numbers the model refuses only once they
    are parsed (an input it does not have): each a parse that holds the GIL. The worker's
    /health keeps its promise all along."""
    n = (1 << 20) // 6 - 20
    body = json.dumps({"inputs": [{"name": "junk", "datatype": "FP32", "shape": [1, n], "data": [[0.5]] * n}]},
                      separators=(",", ":")).encode()
    assert 1_000_000 < len(body) <= 1 << 20, len(body)
    with run_server(tmp_path, workers=1) as server:
        url = server.base_url + "/v2/models/default/infer"
        huge = body[:-4] + b"," + b"0," * (8 << 20) + b"0]}]}"  # 16 MB: 413 before any parse
        refused = requests.post(url, data=huge, timeout=60)
        assert refused.status_code == 413 and "exceeds the limit of 1048576" in refused.json()["detail"]
        assert requests.post(url, data=body, timeout=60).status_code == 422  # parsed, then refused: warm
        stop = threading.Event()

        def send() -> list[int]:
            statuses = []
            with requests.Session() as session:
                while not stop.is_set():
                    statuses.append(session.post(url, data=body, timeout=60).status_code)
            return statuses

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            senders = [pool.submit(send) for _ in range(8)]
            probes = []
            end = time.monotonic() + 6  # the measurement: a probe every 20 ms for 6 s, not a wait
            with requests.Session() as session:
                while time.monotonic() < end:
                    start = time.perf_counter()
                    assert session.get(server.base_url + "/health", timeout=10).status_code == 200
                    probes.append(time.perf_counter() - start)
                    time.sleep(0.02)
            stop.set()
            statuses = [s for f in senders for s in f.result()]
    assert statuses and set(statuses) <= {422, 503}, set(statuses)  # 503: shed while the others parse
    assert max(probes) < JSON_PROBE_PROMISE_S, sorted(probes)[-5:]
    logging.getLogger(__name__).info(
        "%d JSON bodies parsed; /health p50 %.1f ms, max %.1f ms over %d probes",
        len(statuses), 1e3 * np.median(probes), 1e3 * max(probes), len(probes),
    )


def test_an_error_from_the_batcher_leaves_no_cycle_holding_the_decoded_images(monkeypatch):
    """A request refused after its images were decoded (here: its deadline passed in the
    queue) frees them when its answer is sent, not when the cyclic collector next runs
    (which an idle worker may not do for a long time: the memory the red team saw held)."""
    client = encodable_client()
    decoded = []
    real = images._decode

    def spy(marker, out, where):
        real(marker, out, where)
        decoded.append(weakref.ref(out.base if out.base is not None else out))

    monkeypatch.setattr(images, "_decode", spy)
    # the decoder sees time stand still, so the deadline passes only in the batcher's queue
    monkeypatch.setattr(images, "time", type("Clock", (), {"monotonic": staticmethod(lambda: 0.0)}))
    obs = {**fake_observation(), "image": encoded_image("png", png(fake_observation()["image"]))}
    body = dict_to_binary(obs)
    collecting = gc.isenabled()
    gc.disable()
    try:
        response = client.post("/infer", data=body, headers={"X-Deadline-Ms": "0.001"},
                               environ_overrides={"CONTENT_LENGTH": str(len(body))})
        assert response.status_code == 504
        assert decoded and all(ref() is None for ref in decoded)
    finally:
        if collecting:
            gc.enable()
