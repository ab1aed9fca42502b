"""Server-side decoding of encoded camera images (JPEG via simplejpeg, PNG via Pillow).

A model opts in per input (``encoded_inputs = ("image",)`` on the policy object, listed in
``/model_info``); only uint8 ``[H, W, 3]`` / ``[H, W, 1]`` inputs qualify. An encoded input
arrives as the marker :func:`binary_protocol.encoded_image` (a list of them for a
vectorized request). Before anything is allocated or decompressed, the work is bounded:
the markers' fields, the row count, the decoded size of the whole request (the body limit)
and each encoded size against what its image can need are checked, the decoded bytes are
taken from the worker's byte budget (bodies being read count there too), and each image's
own header is read and its width, height and channels are checked against the spec (422
otherwise; a PNG's chunks are counted too): a small body cannot expand into huge images
or keep a decoder busy. Decoding runs in the request thread, straight into one
preallocated ``[H, W, C]`` (or ``[N, H, W, C]``) array, which the batch's staging copy
then reads like any raw input: an encoded image costs no extra copy over a raw one.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from binary_protocol import IMAGE_CODECS, is_encoded_image
from policy_server.contract import TensorSpec
from policy_server.errors import DeadlineExceeded, InvalidInput, PayloadTooLarge, QueueFull
from policy_server.wsgi_keys import ByteBudget

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASELINE_SOF = (0xC0, 0xC1)  # baseline and extended sequential Huffman JPEG
MAX_JPEG_SEGMENTS = 256  # segments before the first scan (a real file has about a dozen)
PNG_COLOUR_CHANNELS = {0: 1, 2: 3}  # greyscale, truecolour (8-bit only)
PNG_CHUNKS_BASE = 64  # chunks any PNG may have, plus one per KiB of its data


def encodable(spec: TensorSpec) -> bool:
    """Whether an input may be declared encodable: uint8 ``[H, W, 3]`` or ``[H, W, 1]``."""
    return spec.dtype == "uint8" and len(spec.shape) == 3 and spec.shape[2] in (1, 3)


@contextlib.contextmanager
def decoded_inputs(
    inputs: Mapping[str, Any],
    spec: Sequence[TensorSpec],
    encoded: Sequence[str],
    rows: int | None,
    *,
    max_bytes: int,
    budget: ByteBudget | None = None,
    deadline: float | None = None,
) -> Iterator[Mapping[str, Any]]:
    """``inputs`` with every encoded-image marker decoded to its uint8 array, for the ``with``
    block (the request's handling); the decoded bytes are held in ``budget`` until it ends.

    Everything that bounds the work is checked before anything is allocated or decoded:
    each marker's fields and types, the row count, the decoded size (at most ``max_bytes``
    per request: what a raw body may be), each encoded size against what its image can need,
    then the room in ``budget`` (the worker's bytes of request data), then every header.

    Raises InvalidInput (422) naming the input (and row): a marker on an input the model
    does not declare encodable, a malformed marker, an unknown codec, an encoded size past
    its bound, header dimensions or channels that disagree with the spec, data that does not
    decode; PayloadTooLarge (413) for a request that would decode to more than ``max_bytes``;
    QueueFull (503, Retry-After) when the worker holds too much request data now;
    DeadlineExceeded (504) when ``deadline`` (``time.monotonic()``) passes between two images:
    the rest are not decoded.
    """
    found = [name for name, value in inputs.items() if _holds_markers(value)]
    if not found:
        yield inputs
        return
    by_name = {s.name: s for s in spec}
    plan = []  # (name, shape, markers)
    total = 0
    for name in found:
        if name not in encoded or name not in by_name:
            raise InvalidInput(f"input {name!r} may not arrive encoded; this model accepts encoded {sorted(encoded)}")
        shape = by_name[name].shape
        markers = _markers(name, inputs[name], rows)
        for where, marker in markers:
            _check_marker(marker, shape, where)
        plan.append((name, shape, markers))
        total += len(markers) * math.prod(shape)
    if total > max_bytes:
        raise PayloadTooLarge(f"encoded images would decode to {total} bytes, more than the limit of {max_bytes}")
    if budget is not None and not budget.take(total):
        raise QueueFull(
            f"{budget.used} bytes of request data held by this worker; no room to decode {total}",
            headers={"Retry-After": "1"},
        )
    try:
        for _, shape, markers in plan:
            for where, marker in markers:
                got = _header(marker, where)
                if got != shape:
                    raise InvalidInput(
                        f"input {where}: the {marker['codec']} header says {got[1]}x{got[0]} with {got[2]} "
                        f"channel(s); the spec needs {shape[1]}x{shape[0]} with {shape[2]}"
                    )
        out = dict(inputs)
        for name, shape, markers in plan:
            image = np.empty((len(markers), *shape) if rows is not None else shape, np.uint8)
            for i, (where, marker) in enumerate(markers):
                if deadline is not None and time.monotonic() > deadline:
                    raise DeadlineExceeded(f"the deadline passed while decoding images, before input {where}")
                _decode(marker, image[i] if rows is not None else image, where)
            out[name] = image
        yield out
    finally:
        if budget is not None:
            budget.give(total)


def _holds_markers(value: Any) -> bool:
    return is_encoded_image(value) or (isinstance(value, list) and bool(value) and is_encoded_image(value[0]))


def _markers(name: str, value: Any, rows: int | None) -> list[tuple[str, dict]]:
    """The input's markers with where each one is (for errors): one, or one per row."""
    if rows is None:
        if not is_encoded_image(value):
            raise InvalidInput(f"input {name!r}: a list of encoded images needs X-Batch-Rows")
        return [(repr(name), value)]
    if not isinstance(value, list) or len(value) != rows:
        raise InvalidInput(f"input {name!r}: a request of {rows} rows needs a list of {rows} encoded images")
    for i, item in enumerate(value):
        if not is_encoded_image(item):
            raise InvalidInput(f"input {name!r} row {i}: not an encoded image")
    return [(f"{name!r} row {i}", item) for i, item in enumerate(value)]


def max_encoded_bytes(shape: tuple[int, ...]) -> int:
    """The most encoded bytes accepted for an image of ``shape`` [H, W, C]: twice its raw size
    plus 64 KiB. A real camera frame is far smaller; more is padding that only costs time."""
    return 2 * math.prod(shape) + (64 << 10)


def _check_marker(marker: dict, shape: tuple[int, ...], where: str) -> None:
    """A marker's fields are the types the codecs take, and its data fits the image's bound."""
    codec, data = marker["codec"], marker["data"]
    if not isinstance(codec, str) or codec not in IMAGE_CODECS:
        shown = codec[:20] if isinstance(codec, str) else type(codec).__name__
        raise InvalidInput(f"input {where}: image codec {shown!r} is not one of {IMAGE_CODECS}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
        raise InvalidInput(f"input {where}: encoded data must be uint8[n]")
    bound = max_encoded_bytes(shape)
    if data.size > bound:
        raise InvalidInput(
            f"input {where}: {data.size} bytes of {codec} for a {shape[1]}x{shape[0]} image; at most {bound} accepted"
        )


def _raw(marker: dict):
    data = marker["data"]
    return data if data.flags.c_contiguous else data.tobytes()


def _header(marker: dict, where: str) -> tuple[int, int, int]:
    raw = _raw(marker)
    if marker["codec"] == "jpeg":
        return jpeg_header(raw, where)
    return png_header(raw, where)


def decode_into(marker: dict, out: np.ndarray, where: str) -> None:
    """Check one marker (fields, size, header) against ``out``'s shape ``[H, W, C]``, then decode into ``out``."""
    _check_marker(marker, out.shape, where)
    got = _header(marker, where)
    if got != out.shape:
        raise InvalidInput(
            f"input {where}: the {marker['codec']} header says {got[1]}x{got[0]} with {got[2]} channel(s); "
            f"the spec needs {out.shape[1]}x{out.shape[0]} with {out.shape[2]}"
        )
    _decode(marker, out, where)


def _decode(marker: dict, out: np.ndarray, where: str) -> None:
    codec, raw = marker["codec"], _raw(marker)
    try:
        if codec == "jpeg":
            import simplejpeg

            simplejpeg.decode_jpeg(raw, colorspace="RGB" if out.shape[2] == 3 else "GRAY", buffer=out)
        else:
            _decode_png(raw, out)
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


def png_header(data, where: str) -> tuple[int, int, int]:
    """(height, width, channels) from a PNG's IHDR chunk (8-bit grey or RGB only), after
    walking its chunk headers: at most :data:`PNG_CHUNKS_BASE` chunks plus one per KiB of
    data (a flood of empty chunks costs a decoder seconds), each inside the data."""
    head = bytes(data[:33])
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise InvalidInput(f"input {where}: not a PNG (no signature and IHDR)")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if depth != 8 or colour not in PNG_COLOUR_CHANNELS or head[28] != 0:
        raise InvalidInput(f"input {where}: PNG must be 8-bit grey or RGB, not interlaced")
    most = PNG_CHUNKS_BASE + len(data) // 1024
    for chunks, _ in enumerate(_png_chunks(memoryview(data)), 1):
        if chunks > most:
            raise InvalidInput(f"input {where}: PNG has more than {most} chunks for its {len(data)} bytes")
    return height, width, PNG_COLOUR_CHANNELS[colour]


def _png_chunks(view: memoryview) -> Iterator[tuple[bytes, memoryview]]:
    """Each chunk of a PNG as (type, the whole chunk: length, type, data and CRC), up to IEND
    or the data's end (a last chunk cut short comes as far as it goes)."""
    offset = 8
    while offset + 8 <= len(view):
        end = offset + 12 + int.from_bytes(view[offset : offset + 4], "big")
        kind = bytes(view[offset + 4 : offset + 8])
        yield kind, view[offset:end]
        if kind == b"IEND":
            return
        offset = end


PNG_PIXEL_CHUNKS = (b"IHDR", b"IDAT", b"IEND")


def png_pixel_chunks(data) -> bytes:
    """The PNG with only the chunks its pixels need (IHDR, IDAT, IEND; grey and RGB have no
    palette), each kept whole with its CRC. Ancillary chunks never reach the decoder: Pillow
    inflates every compressed text chunk and colour profile it meets (up to 1 MiB each), so a
    small PNG of many zTXt chunks could keep a worker busy, and none of them changes a pixel.
    Called after :func:`png_header` has bounded the chunk count."""
    return PNG_SIGNATURE + b"".join(chunk for kind, chunk in _png_chunks(memoryview(data)) if kind in PNG_PIXEL_CHUNKS)


def _decode_png(data, out: np.ndarray) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(png_pixel_chunks(data)), formats=["PNG"]) as image:
        if image.size != (out.shape[1], out.shape[0]):  # IHDR was checked; Pillow agrees or refuses
            raise ValueError(f"size {image.size}")
        pixels = np.asarray(image)
    out[...] = pixels.reshape(out.shape)
