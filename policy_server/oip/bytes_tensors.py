"""The Open Inference Protocol's ``BYTES`` tensors, as this server uses them: one text per row.

A text input (:class:`policy_server.contract.TextSpec`, e.g. a task instruction) travels as a
``BYTES`` tensor of shape ``[N]`` or ``[N, 1]``: in JSON, ``data`` holds the N strings (flat
or nested); with the binary tensor data extension, each element is a 4-byte little-endian
length and then that many bytes (Triton's layout). Either way the input becomes a list of N
Python str; bytes that are not UTF-8 are refused naming the input and row (422).
"""

from __future__ import annotations

import math
from typing import Any

from policy_server.errors import BadRequest, InvalidInput

MAX_ELEMENT_BYTES = 1 << 20  # one BYTES element, before the model's own max_bytes is checked


def json_texts(name: str, shape: tuple[int, ...], data: list) -> list[str]:
    """A BYTES tensor's JSON ``data``: ``prod(shape)`` strings, flat or nested one level per
    dimension (``[["a"], ["b"]]`` for shape ``[2, 1]``). BadRequest when the count disagrees
    with the shape; InvalidInput (422) naming the input and row for an element that is not
    a string."""
    count = math.prod(shape)
    flat: list[Any] = data
    for _ in range(len(shape) - 1):
        if not flat or not all(isinstance(item, list) for item in flat):
            break
        flat = [element for item in flat for element in item]
    if len(flat) != count:
        raise BadRequest(f"input {name!r}: BYTES 'data' must hold {count} strings for shape {list(shape)}")
    for row, text in enumerate(flat):
        if not isinstance(text, str):
            raise InvalidInput(f"input {name!r} row {row}: expected text (a string), got {type(text).__name__}")
    return list(flat)


def binary_texts(name: str, shape: tuple[int, ...], raw: memoryview) -> list[str]:
    """A BYTES tensor's binary data: ``prod(shape)`` elements, each a u32 little-endian length
    and its bytes, filling ``raw`` exactly (BadRequest otherwise); each UTF-8 (InvalidInput)."""
    count, offset, texts = math.prod(shape), 0, []
    for row in range(count):
        if offset + 4 > len(raw):
            raise BadRequest(f"input {name!r}: BYTES element {row} has no length prefix")
        length = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if length > MAX_ELEMENT_BYTES or offset + length > len(raw):
            raise BadRequest(f"input {name!r}: BYTES element {row} of {length} bytes runs past its data")
        try:
            texts.append(bytes(raw[offset : offset + length]).decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"input {name!r} row {row}: text is not valid UTF-8") from None
        offset += length
    if offset != len(raw):
        raise BadRequest(f"input {name!r}: {len(raw) - offset} bytes after its {count} BYTES elements")
    return texts


def encode_texts(texts: list[str]) -> bytes:
    """Texts in the binary extension's BYTES layout (for clients and tests)."""
    out = bytearray()
    for text in texts:
        data = text.encode("utf-8")
        out += len(data).to_bytes(4, "little") + data
    return bytes(out)
