"""Compressed camera images: the wire marker, header checks before decoding, the model's
declaration, the client's encode option, and end to end through gunicorn."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from binary_protocol import binary_to_dict, dict_to_binary, encoded_image, is_encoded_image
from policy_client.image_codecs import encode_array, encode_observation, parse_codec
from policy_server.errors import InvalidInput, ModelError
from policy_server.inputs import images
from policy_server.model.loader import describe
from request_tools import PolicyClient
from tests.support.apps import make_app
from tests.support.fakes import FakePolicy, expected_action, fake_observation
from tests.support.serving import ROOT, run_server


def encodable_app():
    policy = FakePolicy()
    policy.encoded_inputs = ("image",)
    return make_app(policy)


@pytest.fixture(scope="module")
def client():
    return encodable_app().test_client()


def post(client, obs, rows=None):
    body = dict_to_binary(obs)
    headers = {"X-Batch-Rows": str(rows)} if rows else {}
    return client.post("/infer", data=body, headers=headers, environ_overrides={"CONTENT_LENGTH": str(len(body))})


def png_with_header(width: int, height: int, colour: int = 2, payload: bytes = b"") -> bytes:
    """A PNG whose IHDR says ``width`` x ``height`` (the pixel data need not match)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return images.PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")


def test_parse_codec():
    assert parse_codec("jpeg:90") == ("jpeg", 90) and parse_codec("jpeg") == ("jpeg", 90)
    assert parse_codec("PNG") == ("png", None)
    for bad in ("jpeg:0", "jpeg:101", "jpeg:x", "webp", "png:3"):
        with pytest.raises(ValueError):
            parse_codec(bad)


def test_client_checks_its_encode_option_when_made():
    with pytest.raises(ValueError, match="webp"):
        PolicyClient("http://127.0.0.1:1", encode={"image": "webp"})


def test_marker_is_made_of_allowed_types_and_survives_the_wire():
    marker = encoded_image("jpeg", b"\xff\xd8abc")
    decoded = binary_to_dict(dict_to_binary({"image": marker}))["image"]
    assert is_encoded_image(decoded) and decoded["codec"] == "jpeg"
    assert decoded["data"].dtype == np.uint8 and decoded["data"].tobytes() == b"\xff\xd8abc"
    assert not is_encoded_image({"codec": "jpeg", "data": b"", "extra": 1})


def test_png_is_lossless_and_jpeg_close(client):
    obs = fake_observation(4)
    big = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for codec, quality in (("png", None), ("jpeg", 95)):
        out = np.empty_like(big)
        images.decode_into(encoded_image(codec, encode_array(big, codec, quality)), out, "'image'")
        if codec == "png":
            np.testing.assert_array_equal(out, big)
        else:
            assert np.abs(out.astype(int) - big).mean() < 12
    response = post(client, encode_observation(obs, {"image": "png"}))
    assert response.status_code == 200
    np.testing.assert_array_equal(binary_to_dict(response.data)["action"], expected_action(obs))


def test_jpeg_header_dimensions_disagreeing_with_the_spec_are_refused_before_decoding(client, monkeypatch):
    import simplejpeg

    def never(*args, **kwargs):
        raise AssertionError("decoded despite a wrong header")

    monkeypatch.setattr(simplejpeg, "decode_jpeg", never)
    wide = np.zeros((8, 16, 3), np.uint8)
    response = post(client, {**fake_observation(), "image": encoded_image("jpeg", encode_array(wide, "jpeg", 90))})
    assert response.status_code == 422
    assert "header says 16x8 with 3 channel(s); the spec needs 8x8 with 3" in response.get_json()["detail"]
    grey = np.zeros((8, 8, 1), np.uint8)
    response = post(client, {**fake_observation(), "image": encoded_image("jpeg", encode_array(grey, "jpeg", 90))})
    assert response.status_code == 422 and "1 channel(s)" in response.get_json()["detail"]


def test_png_decompression_bomb_is_refused_from_its_header(client, monkeypatch):
    monkeypatch.setattr(images, "_decode_png", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    bomb = png_with_header(100_000, 100_000, payload=b"\0" * 1000)
    response = post(client, {**fake_observation(), "image": encoded_image("png", bomb)})
    assert response.status_code == 422 and "100000x100000" in response.get_json()["detail"]
    response = post(client, {**fake_observation(), "image": encoded_image("png", png_with_header(8, 8, colour=6))})
    assert response.status_code == 422 and "8-bit grey or RGB" in response.get_json()["detail"]


@pytest.mark.parametrize(
    "image, fragment",
    [
        ({"codec": "webp", "data": np.zeros(4, np.uint8)}, "is not one of"),
        ({"codec": "jpeg", "data": np.zeros(4, np.float32)}, "uint8[n]"),
        ({"codec": "jpeg", "data": np.frombuffer(b"not a jpeg at all", np.uint8)}, "not a JPEG"),
        ({"codec": "png", "data": np.frombuffer(b"\x89PNG short", np.uint8)}, "not a PNG"),
        (
            {"codec": "png", "data": np.frombuffer(png_with_header(8, 8, payload=b"\1" * 5), np.uint8)},
            "does not decode",
        ),
    ],
)
def test_bad_encoded_images_are_422(client, image, fragment):
    response = post(client, {**fake_observation(), "image": image})
    assert response.status_code == 422, response.get_data(as_text=True)
    assert fragment in response.get_json()["detail"]


def test_progressive_jpeg_is_refused_before_decoding(client):
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(fake_observation()["image"]).save(out, format="JPEG", quality=90, progressive=True)
    response = post(client, {**fake_observation(), "image": encoded_image("jpeg", out.getvalue())})
    assert response.status_code == 422 and "only baseline" in response.get_json()["detail"]
    out = io.BytesIO()
    Image.fromarray(fake_observation()["image"]).save(out, format="JPEG", quality=90)
    assert post(client, {**fake_observation(), "image": encoded_image("jpeg", out.getvalue())}).status_code == 200


def test_truncated_jpeg_is_422(client):
    data = encode_array(fake_observation()["image"], "jpeg", 90)
    response = post(client, {**fake_observation(), "image": encoded_image("jpeg", data[:-12])})
    assert response.status_code == 422 and "does not decode" in response.get_json()["detail"]


def test_a_model_that_does_not_declare_it_refuses_encoded_images():
    plain = make_app().test_client()
    response = post(plain, encode_observation(fake_observation(), {"image": "png"}))
    assert response.status_code == 422 and "may not arrive encoded" in response.get_json()["detail"]
    assert plain.get("/model_info").get_json()["encoded_inputs"] == []


def test_vectorized_request_sends_one_encoded_image_per_row(client):
    observations = [fake_observation(s) for s in range(3)]
    stacked = {k: np.stack([o[k] for o in observations]) for k in observations[0]}
    response = post(client, encode_observation(stacked, {"image": "png"}, rows=True), rows=3)
    assert response.status_code == 200
    action = binary_to_dict(response.data)["action"]
    for i, obs in enumerate(observations):
        np.testing.assert_array_equal(action[i], expected_action(obs))
    wrong = encode_observation(stacked, {"image": "png"}, rows=True)
    wrong["image"] = wrong["image"][:2]
    response = post(client, wrong, rows=3)
    assert response.status_code == 422 and "list of 3 encoded images" in response.get_json()["detail"]


def test_declaration_must_name_a_uint8_image_input():
    policy = FakePolicy()
    policy.encoded_inputs = ("state",)
    with pytest.raises(ModelError, match="encoded_inputs"):
        describe(policy, name="fake", version="1", device="cpu")
    policy.encoded_inputs = ("image",)
    assert describe(policy, name="fake", version="1", device="cpu").info()["encoded_inputs"] == ["image"]


def decoded(inputs, rows=None, **kwargs):
    kwargs.setdefault("max_bytes", 1 << 26)
    with images.decoded_inputs(inputs, FakePolicy().input_spec, ("image",), rows, **kwargs) as out:
        return out


def test_decode_inputs_without_markers_returns_the_same_mapping():
    obs = fake_observation()
    assert decoded(obs) is obs
    with pytest.raises(InvalidInput, match="needs X-Batch-Rows"):
        decoded({"image": [encoded_image("png", b"x")]})


def test_the_client_imports_no_codec_unless_asked():
    code = (
        "import sys, request_tools, binary_protocol; "
        "bad = [m for m in ('simplejpeg', 'PIL', 'cv2', 'torch', 'flask') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.integration
def test_encoded_camera_end_to_end_through_the_client(tmp_path):
    with (
        run_server(tmp_path, workers=1) as server,
        PolicyClient(server.base_url) as raw,
        PolicyClient(server.base_url, encode={"image": "png"}) as png,
    ):
        info = raw.model_info()
        assert info["encoded_inputs"] == ["image"] and info["image_codecs"] == ["jpeg", "png"]
        from examples.reacher import ReacherEnv

        obs = ReacherEnv(seed=5).reset()
        expected = raw.infer(obs)["action"]
        np.testing.assert_array_equal(png.infer(obs)["action"], expected)  # lossless: the same action
        jpeg = png.infer(obs, encode={"image": "jpeg:90"})["action"]
        assert np.abs(jpeg - expected).max() < 0.05 * (np.abs(expected).max() + 1e-3) + 1e-3
        batch = [ReacherEnv(seed=s).reset() for s in range(3)]
        np.testing.assert_array_equal(png.infer_batch(batch)["action"], raw.infer_batch(batch)["action"])
