"""Client-side encoding of camera images (JPEG, or lossless PNG) for the policy server.

Opt in: ``PolicyClient(..., encode={"image": "jpeg:90"})``. The codec libraries (simplejpeg
for JPEG, Pillow for PNG: ``pip install robot-policy-server[images]``) are imported only
when an image is encoded, so the client stays numpy + requests otherwise. The server checks
an encoded image's header dimensions against the model's spec before decoding it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from binary_protocol import encoded_image

DEFAULT_JPEG_QUALITY = 90


def parse_codec(spec: str) -> tuple[str, int | None]:
    """``"jpeg"``, ``"jpeg:Q"`` (quality 1-100, default 90) or ``"png"`` -> (codec, quality)."""
    codec, _, quality = str(spec).partition(":")
    codec = codec.strip().lower()
    if codec == "png" and not quality:
        return "png", None
    if codec == "jpeg":
        try:
            q = int(quality) if quality else DEFAULT_JPEG_QUALITY
        except ValueError:
            raise ValueError(f"JPEG quality in {spec!r} is not an integer") from None
        if not 1 <= q <= 100:
            raise ValueError(f"JPEG quality {q} is outside 1..100")
        return "jpeg", q
    raise ValueError(f"image encoding {spec!r} is not 'jpeg', 'jpeg:QUALITY' or 'png'")


def encode_array(image: np.ndarray, codec: str, quality: int | None = None) -> bytes:
    """Encode one uint8 image ``[H, W, 3]`` (RGB) or ``[H, W, 1]`` (gray) (ValueError otherwise).

    JPEG keeps full chroma resolution (4:4:4): small coloured targets survive quality 90.
    """
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(
            f"only uint8 [H, W, 3] or [H, W, 1] images can be encoded, got {image.dtype}{list(image.shape)}"
        )
    if codec == "jpeg":
        import simplejpeg

        colorspace = "RGB" if image.shape[2] == 3 else "GRAY"
        return simplejpeg.encode_jpeg(
            image, quality=quality or DEFAULT_JPEG_QUALITY, colorspace=colorspace, colorsubsampling="444"
        )
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image if image.shape[2] == 3 else image[:, :, 0]).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def encode_observation(obs: Mapping[str, Any], encode: Mapping[str, str], rows: bool = False) -> dict[str, Any]:
    """``obs`` with the inputs named in ``encode`` replaced by encoded-image markers.

    ``rows``: ``obs`` is a vectorized request (each input ``[N, ...]``): those inputs become
    lists of N markers, one per row.
    """
    out = dict(obs)
    for name, spec in encode.items():
        if name not in out:
            continue
        codec, quality = parse_codec(spec)
        value = np.asarray(out[name])
        if rows:
            out[name] = [encoded_image(codec, encode_array(row, codec, quality)) for row in value]
        else:
            out[name] = encoded_image(codec, encode_array(value, codec, quality))
    return out
