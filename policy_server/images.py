"""Server-side decoding of encoded camera images (JPEG via simplejpeg, PNG via Pillow).

A model opts in per input (``encoded_inputs = ("image",)`` on the policy object, listed in
``/model_info``); only uint8 ``[H, W, 3]`` / ``[H, W, 1]`` inputs qualify. An encoded input
arrives as the marker :func:`binary_protocol.encoded_image` (a list of them for a
vectorized request). Before anything is decompressed, the image's own header is read and
its width, height and channels are checked against the spec (422 otherwise): a small body
cannot expand into a huge image. Decoding runs in the request thread, straight into one
preallocated ``[H, W, C]`` (or ``[N, H, W, C]``) array, which the batch's staging copy
then reads like any raw input: an encoded image costs no extra copy over a raw one.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from binary_protocol import IMAGE_CODECS, is_encoded_image
from policy_server.contract import TensorSpec
from policy_server.errors import InvalidInput

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASELINE_SOF = (0xC0, 0xC1)  # baseline and extended sequential Huffman JPEG
MAX_JPEG_SEGMENTS = 256  # segments before the first scan (a real file has about a dozen)
PNG_COLOUR_CHANNELS = {0: 1, 2: 3}  # greyscale, truecolour (8-bit only)


def encodable(spec: TensorSpec) -> bool:
    """Whether an input may be declared encodable: uint8 ``[H, W, 3]`` or ``[H, W, 1]``."""
    return spec.dtype == "uint8" and len(spec.shape) == 3 and spec.shape[2] in (1, 3)


def decode_inputs(
    inputs: Mapping[str, Any], spec: Sequence[TensorSpec], encoded: Sequence[str], rows: int | None
) -> Mapping[str, Any]:
    """``inputs`` with every encoded-image marker decoded to its uint8 array.

    Raises InvalidInput (422) naming the input (and row): a marker on an input the model does
    not declare encodable, an unknown codec, header dimensions or channels that disagree
    with the spec (checked before decoding), or data that does not decode.
    """
    found = [
        name for name, value in inputs.items()
        if is_encoded_image(value) or (isinstance(value, list) and value and is_encoded_image(value[0]))
    ]
    if not found:
        return inputs
    by_name = {s.name: s for s in spec}
    out = dict(inputs)
    for name in found:
        if name not in encoded or name not in by_name:
            raise InvalidInput(f"input {name!r} may not arrive encoded; this model accepts encoded {sorted(encoded)}")
        shape = by_name[name].shape
        value = inputs[name]
        if rows is None:
            if not is_encoded_image(value):
                raise InvalidInput(f"input {name!r}: a list of encoded images needs X-Batch-Rows")
            image = np.empty(shape, np.uint8)
            decode_into(value, image, name)
        else:
            if not isinstance(value, list) or len(value) != rows:
                raise InvalidInput(f"input {name!r}: a request of {rows} rows needs a list of {rows} encoded images")
            image = np.empty((rows, *shape), np.uint8)
            for i, item in enumerate(value):
                if not is_encoded_image(item):
                    raise InvalidInput(f"input {name!r} row {i}: not an encoded image")
                decode_into(item, image[i], f"{name!r} row {i}")
        out[name] = image
    return out


def decode_into(marker: dict, out: np.ndarray, where: str) -> None:
    """Check one marker's header against ``out``'s shape ``[H, W, C]``, then decode into ``out``."""
    codec, data = marker["codec"], marker["data"]
    if codec not in IMAGE_CODECS:
        raise InvalidInput(f"input {where}: image codec {str(codec)[:20]!r} is not one of {IMAGE_CODECS}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
        raise InvalidInput(f"input {where}: encoded data must be uint8[n]")
    height, width, channels = out.shape
    raw = data.tobytes() if not data.flags.c_contiguous else data
    if codec == "jpeg":
        got = jpeg_header(raw, where)
    else:
        got = png_header(bytes(raw[:33]), where)
    if got != (height, width, channels):
        raise InvalidInput(
            f"input {where}: the {codec} header says {got[1]}x{got[0]} with {got[2]} channel(s); "
            f"the spec needs {width}x{height} with {channels}"
        )
    try:
        if codec == "jpeg":
            import simplejpeg

            simplejpeg.decode_jpeg(raw, colorspace="RGB" if channels == 3 else "GRAY", buffer=out)
        else:
            _decode_png(bytes(raw), out)
    except (ValueError, OSError, SyntaxError) as exc:
        raise InvalidInput(f"input {where}: {codec} data does not decode: {str(exc)[:200]}") from None


def check_sequential_jpeg(data, where: str) -> None:
    """Walk the segments before the first scan: the frame must be sequential (SOF0/SOF1).

    Progressive and other multi-scan JPEGs are refused: a crafted one with thousands of
    scans can keep a decoder busy for seconds, and cameras and our client send baseline.
    """
    view = memoryview(data)
    if len(view) < 4 or view[0] != 0xFF or view[1] != 0xD8:
        raise InvalidInput(f"input {where}: not a JPEG (no SOI marker)")
    i, frame = 2, None
    for _ in range(MAX_JPEG_SEGMENTS):
        if i + 4 > len(view) or view[i] != 0xFF:
            break
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the frame header came before it
            if frame not in BASELINE_SOF:
                kind = "no frame header" if frame is None else f"frame type 0x{frame:02X}"
                raise InvalidInput(f"input {where}: only baseline (sequential) JPEG is accepted, got {kind}")
            return
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            frame = marker
        i += 2 + ((view[i + 2] << 8) | view[i + 3])
    raise InvalidInput(f"input {where}: not a JPEG this server accepts (no scan within {MAX_JPEG_SEGMENTS} segments)")


def jpeg_header(data, where: str) -> tuple[int, int, int]:
    """(height, width, channels) from a JPEG's frame header, without decoding any pixels."""
    import simplejpeg

    check_sequential_jpeg(data, where)
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        raise InvalidInput(f"input {where}: not a JPEG: {str(exc)[:200]}") from None
    channels = {"Gray": 1, "YCbCr": 3, "RGB": 3}.get(colorspace)
    if channels is None:
        raise InvalidInput(f"input {where}: JPEG colour space {colorspace} is not grey or RGB")
    return height, width, channels


def png_header(head: bytes, where: str) -> tuple[int, int, int]:
    """(height, width, channels) from a PNG's IHDR chunk (8-bit grey or RGB only)."""
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise InvalidInput(f"input {where}: not a PNG (no signature and IHDR)")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if depth != 8 or colour not in PNG_COLOUR_CHANNELS or head[28] != 0:
        raise InvalidInput(f"input {where}: PNG must be 8-bit grey or RGB, not interlaced")
    return height, width, PNG_COLOUR_CHANNELS[colour]


def _decode_png(data: bytes, out: np.ndarray) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        if image.size != (out.shape[1], out.shape[0]):  # IHDR was checked; Pillow agrees or refuses
            raise ValueError(f"size {image.size}")
        pixels = np.asarray(image)
    out[...] = pixels.reshape(out.shape)
