"""openpi's wire format (msgpack with numpy arrays as maps), decoded strictly; client and server.

openpi's client (``openpi_client.msgpack_numpy``) sends an observation as one msgpack map;
each numpy array travels as the map ``{b"__ndarray__": True, b"data": <bytes>, b"dtype":
<dtype.str>, b"shape": [...]}`` and a numpy scalar as ``{b"__npgeneric__": True, b"data":
<value>, b"dtype": <dtype.str>}``. Its own decoder builds ``np.ndarray(buffer=..., dtype=<from
the message>)`` unchecked: a frame that declares ``|O8`` makes numpy read the data as object
pointers, and touching the array crashes the process. Here nothing is built from a frame that
was not checked first:

- msgpack itself (the maintained ``msgpack`` library) decodes with caps on every string, bin,
  array and map, no ext types (``max_ext_len=0``), and str or bin map keys; a string's bytes
  that are not UTF-8 decode to lone surrogates (``surrogateescape``), so that the reader of the
  field refuses it by name (the server: 422 naming the input), not the whole frame;
- a hook counts every array and map as it is built, and their elements, and stops at
  :data:`MAX_CONTAINERS` and :data:`MAX_ELEMENTS`, so a frame of many small objects costs
  neither memory nor seconds; nesting deeper than :data:`MAX_DEPTH` is refused;
- an array map must have exactly its four keys, a dtype of kind ``b``, ``i``, ``u`` or ``f``
  with a size that kind has (parsed from its string, never handed to numpy as given), a shape
  of at most :data:`MAX_RANK` non-negative ints, and data of exactly ``prod(shape) * itemsize``
  bytes; it becomes a read-only view of that data (no copy).

Every refusal is a :class:`binary_protocol.ProtocolError` (a ValueError) naming what is
wrong. :func:`encode` writes what openpi's client reads (arrays as the same maps). Only numpy
and msgpack are imported: the server decodes requests with it, our client answers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from binary_protocol import ProtocolError

MAX_CONTAINERS = 10_000  # arrays and maps in one frame
MAX_ELEMENTS = 100_000  # their elements (map entries count twice), as wire format v1's object cap
MAX_DEPTH = 32
MAX_RANK = 32
MAX_ARRAY_LEN = 4096  # elements of one msgpack array (shapes, short lists)
MAX_MAP_LEN = 1024  # keys of one map
MAX_STR_BYTES = 1 << 16  # one string (a prompt, a key)
MAX_ARRAY_BYTES = 1 << 40  # what any array's shape may need
ARRAY_KEYS = frozenset({"__ndarray__", "data", "dtype", "shape"})
SCALAR_KEYS = frozenset({"__npgeneric__", "data", "dtype"})
_DTYPE = re.compile(r"([<>|=])([biuf])(\d{1,2})")
_SIZES = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8)}


def decode(frame: bytes) -> Any:
    """One msgpack frame as Python objects, numpy arrays for array maps (ProtocolError on
    anything malformed, oversized, too deep or of a type this server does not take)."""
    counter = _Counter()
    try:
        value = msgpack.unpackb(
            frame, raw=False, unicode_errors="surrogateescape", strict_map_key=True, use_list=True,
            max_str_len=MAX_STR_BYTES, max_bin_len=len(frame), max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN, max_ext_len=0, object_hook=counter.map, list_hook=counter.list,
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as exc:  # ExtraData, StackError, bad UTF-8
        reason = str(exc) or type(exc).__name__  # some of msgpack's errors carry no message
        raise ProtocolError(f"frame is not msgpack this server takes: {reason[:200]}") from None
    _check_depth(value)
    return value


class _Counter:
    """The unpacker's hooks: count containers and their elements as they are built (so a frame
    that would build millions of small objects stops after the first hundred thousand), and
    turn array maps into arrays."""

    def __init__(self) -> None:
        self.containers = 0
        self.elements = 0

    def _count(self, elements: int) -> None:
        self.containers += 1
        self.elements += elements
        if self.containers > MAX_CONTAINERS:
            raise ProtocolError(f"frame holds more than {MAX_CONTAINERS} arrays and maps")
        if self.elements > MAX_ELEMENTS:
            raise ProtocolError(f"frame holds more than {MAX_ELEMENTS} elements in its arrays and maps")

    def list(self, value: list) -> list:
        self._count(len(value))
        return value

    def map(self, value: dict) -> Any:
        self._count(2 * len(value))
        if b"__ndarray__" in value or "__ndarray__" in value:
            return array_from_map(value)
        if b"__npgeneric__" in value or "__npgeneric__" in value:
            return scalar_from_map(value)
        return value


def _field_names(value: Mapping) -> dict[str, Any]:
    return {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v for k, v in value.items()}


def parse_dtype(raw: Any) -> np.dtype:
    """A wire dtype string (``"<f4"``, ``"|u1"``, ``"|b1"``, ...) as a numpy dtype, when its kind
    is one of ``b i u f`` with a size of that kind; ProtocolError otherwise."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    match = _DTYPE.fullmatch(text) if isinstance(text, str) else None
    if match is None or int(match.group(3)) not in _SIZES[match.group(2)]:
        shown = text[:20] if isinstance(text, str) else type(raw).__name__
        raise ProtocolError(f"array dtype {shown!r} is not one of bool, int, uint or float (e.g. '<f4', '|u1')")
    order, kind, size = match.groups()
    if order == "|" and size != "1":
        raise ProtocolError(f"array dtype {text!r}: '|' (no byte order) is for one-byte types")
    return np.dtype(f"{order}{kind}{size}")


def array_from_map(value: Mapping) -> np.ndarray:
    """An array map as a read-only array viewing its data (ProtocolError unless exactly right)."""
    fields = _field_names(value)
    if set(fields) != ARRAY_KEYS or fields["__ndarray__"] is not True:
        raise ProtocolError(f"an array map has exactly the keys {sorted(ARRAY_KEYS)} and __ndarray__ true")
    dtype = parse_dtype(fields["dtype"])
    shape = fields["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
    ):
        raise ProtocolError(f"array shape must be a list of at most {MAX_RANK} non-negative integers")
    if math.prod(d for d in shape if d) * dtype.itemsize > MAX_ARRAY_BYTES:  # even with a zero dimension
        raise ProtocolError(f"array shape {shape} is larger than any array this wire carries")
    data = fields["data"]
    if not isinstance(data, bytes):
        raise ProtocolError("array data must be bytes (msgpack bin)")
    need = math.prod(shape) * dtype.itemsize
    if len(data) != need:
        raise ProtocolError(f"array data has {len(data)} bytes; {dtype.str}{shape} needs {need}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if dtype.kind == "b" and array.size and array.view(np.uint8).max() > 1:
        raise ProtocolError("bool array bytes must be 0 or 1")
    return array


def scalar_from_map(value: Mapping) -> np.ndarray:
    """A numpy scalar map as a 0-d array of its dtype (ProtocolError unless exactly right)."""
    fields = _field_names(value)
    if set(fields) != SCALAR_KEYS or fields["__npgeneric__"] is not True:
        raise ProtocolError(f"a scalar map has exactly the keys {sorted(SCALAR_KEYS)} and __npgeneric__ true")
    dtype = parse_dtype(fields["dtype"])
    data = fields["data"]
    takes = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float)}[dtype.kind]
    if not isinstance(data, takes) or (dtype.kind != "b" and isinstance(data, bool)):
        raise ProtocolError(f"a {dtype.name} scalar cannot be {type(data).__name__}")
    try:
        return np.array(data, dtype=dtype)
    except OverflowError:
        raise ProtocolError(f"scalar {data!r} does not fit {dtype.name}") from None


def _check_depth(value: Any) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ProtocolError(f"frame nests deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise ValueError(f"dtype {obj.dtype} is not sent on this wire")
        obj = np.ascontiguousarray(obj)
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"{type(obj).__name__} is not sent on this wire")


def encode(value: Any) -> bytes:
    """``value`` (maps, lists, str, numbers, numpy arrays of kind b i u f) as one msgpack frame
    that ``openpi_client.msgpack_numpy.unpackb`` reads."""
    return msgpack.packb(value, default=_pack_default, use_bin_type=True)
