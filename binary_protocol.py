"""Wire format version 1: dicts of numpy arrays as pickle protocol 5 with out-of-band buffers.

A body is either a *frame* or a *bare pickle*.

Frame (all integers little-endian)::

    offset  size  field
    0       4     magic b"PK5F"
    4       1     version = 1
    5       3     reserved, zero
    8       4     u32 N: number of out-of-band buffers (at most 4096)
    12      8     u64 P: length of the pickle
    20      8*N   u64 length of each buffer, in order
    ..            zero padding up to a multiple of 64 from the frame start
    ..      P     pickle protocol 5 stream, made with ``buffer_callback``
    ..            for each buffer: zero padding up to a multiple of 64, then the buffer

The frame ends exactly where its last buffer ends (where the pickle ends when N is 0);
trailing bytes are an error. A *bare pickle* is a protocol-5 stream (first bytes
``0x80 0x05``) with no out-of-band buffers; arrays then travel in-band.

The pickle may contain only: dict (str keys), list, tuple, str, bytes, int, float, bool,
None, and numpy arrays of kind b/i/u/f/c (bool, ints, unsigned ints, floats, complex;
either byte order). An array is pickled by numpy as
``numpy._core.numeric._frombuffer(buffer, numpy.dtype(...), shape, order)``
(``numpy.core.numeric`` under numpy 1); those two globals and ``numpy.dtype`` are the
only ones a decoder resolves. A client in another language writes exactly that
opcode sequence (see DEVELOPMENT.md).

Decoding never imports or calls anything outside that allow-list: the unpickler's
``find_class`` answers from an exact table, the objects it hands to the pickle machine
refuse ``BUILD``, array arguments are checked before numpy sees them, and the loaded
tree is walked with caps on depth and visits. Every rejection raises
:class:`ProtocolError`. Decoded arrays are read-only views into the body: no copy.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
from typing import Any

import numpy as np

__all__ = ["ProtocolError", "dict_to_binary", "binary_to_dict", "MAGIC", "VERSION", "ALIGNMENT"]

MAGIC = b"PK5F"
VERSION = 1
ALIGNMENT = 64
MAX_BUFFERS = 4096
MAX_DEPTH = 32
MAX_NODES = 100_000
MAX_NDIM = 32

_HEADER = struct.Struct("<4sB3sIQ")  # magic, version, reserved, N, P
_ZERO_PAD = bytes(ALIGNMENT)
_SCALARS = frozenset([str, bytes, int, float, bool, type(None)])

# The dtypes a body may carry: numpy's pickled base names (kinds b, i, u, f, c).
_DTYPE_NAMES = frozenset(
    ["b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"]
)
_DTYPE_KINDS = frozenset("biufc")
_BYTEORDERS = frozenset("<>|=")


class ProtocolError(ValueError):
    """A body (or an object to encode) that wire format version 1 does not allow."""


def _pad(offset: int) -> int:
    return -offset % ALIGNMENT


# ---------------------------------------------------------------------------------
# Encoding


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind not in _DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ProtocolError(f"{where}: unsupported dtype {dtype!s} (allowed kinds: b, i, u, f, c)")
    if dtype.str[1:] not in _DTYPE_NAMES:
        raise ProtocolError(f"{where}: unsupported dtype {dtype!s}")


def _prepare(obj: Any, where: str, depth: int) -> Any:
    """Return ``obj`` in the form the wire allows, or raise ProtocolError."""
    if depth > MAX_DEPTH:
        raise ProtocolError(f"{where}: nesting deeper than {MAX_DEPTH}")
    if type(obj) in _SCALARS:
        return obj
    if isinstance(obj, np.generic):  # numpy scalar (np.float64 is also a float) -> 0-d array
        obj = np.asarray(obj)
    if isinstance(obj, np.ndarray):
        if type(obj) is not np.ndarray:
            raise ProtocolError(f"{where}: ndarray subclass {type(obj).__name__} is not supported")
        _check_dtype(obj.dtype, where)
        return obj if obj.flags.c_contiguous else obj.copy(order="C")
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ProtocolError(f"{where}: dict key {key!r} is not a str")
            out[key] = _prepare(value, f"{where}.{key}", depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_prepare(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise ProtocolError(f"{where}: unsupported type {type(obj).__name__}")


def dict_to_binary(data: dict) -> bytes:
    """Encode ``data`` as a version-1 frame.

    Arrays are made C-contiguous and numpy scalars become 0-d arrays; object, string,
    datetime and structured arrays, and types outside the allowed set, raise
    :class:`ProtocolError`.
    """
    if not isinstance(data, dict):
        raise ProtocolError(f"top level must be a dict, got {type(data).__name__}")
    prepared = _prepare(data, "data", 0)
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(prepared, protocol=5, buffer_callback=buffers.append)
    if len(buffers) > MAX_BUFFERS:
        raise ProtocolError(f"{len(buffers)} arrays exceed the limit of {MAX_BUFFERS}")
    raws = [b.raw() for b in buffers]

    header_len = _HEADER.size + 8 * len(raws)
    parts: list[Any] = [
        _HEADER.pack(MAGIC, VERSION, b"\0\0\0", len(raws), len(payload)),
        struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws)),
        _ZERO_PAD[: _pad(header_len)],
        payload,
    ]
    offset = header_len + _pad(header_len) + len(payload)
    for raw in raws:
        pad = _pad(offset)
        parts.append(_ZERO_PAD[:pad])
        parts.append(raw)
        offset += pad + raw.nbytes
    return b"".join(parts)


# ---------------------------------------------------------------------------------
# Decoding


class _Refuses:
    """Base of every object the unpickler hands out: BUILD on it is refused.

    ``__slots__ = ()`` leaves no ``__dict__`` for BUILD to write into, and
    ``__setstate__`` raises, so a stream cannot mutate these objects.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise ProtocolError(f"BUILD on {type(self).__name__} is not allowed")

    def __reduce__(self):  # never pickled back out
        raise TypeError(f"{type(self).__name__} cannot be pickled")


class _PendingDtype(_Refuses):
    """Stands for ``numpy.dtype(name, False, True)`` until its one BUILD gives the byte order."""

    __slots__ = ("name", "byteorder", "built")

    def __init__(self, name: str) -> None:
        self.name = name
        self.byteorder = "="
        self.built = False

    def __setstate__(self, state: Any) -> None:
        # numpy's plain form: (3, byteorder, None, None, None, -1, -1, 0). Nothing else
        # (subarrays, fields, metadata, flags) ever reaches numpy's C __setstate__.
        if self.built:
            raise ProtocolError("dtype state given twice")
        if (
            type(state) is not tuple
            or len(state) != 8
            or state[0] != 3
            or type(state[1]) is not str
            or state[1] not in _BYTEORDERS
            or state[2:] != (None, None, None, -1, -1, 0)
        ):
            raise ProtocolError("dtype state is not the plain form")
        self.byteorder = state[1]
        self.built = True

    def resolve(self) -> np.dtype:
        dtype = np.dtype(self.name)
        return dtype if self.byteorder in "=|" else dtype.newbyteorder(self.byteorder)


class _DtypeFactory(_Refuses):
    """The allow-listed ``numpy.dtype``: only ``dtype(<numeric name>, False, True)``."""

    __slots__ = ()

    def __call__(self, *args: Any) -> _PendingDtype:
        if len(args) != 3 or args[1] is not False or args[2] is not True:
            raise ProtocolError("dtype arguments are not the plain form")
        name = args[0]
        if type(name) is not str or name not in _DTYPE_NAMES:
            raise ProtocolError(f"dtype {name!r} is not allowed (kinds b, i, u, f, c only)")
        return _PendingDtype(name)


class _PendingArray(_Refuses):
    """An array made by ``_frombuffer``; replaced by the ndarray when the tree is walked."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


class _FromBuffer(_Refuses):
    """The allow-listed ``numpy._core.numeric._frombuffer``, with its arguments checked."""

    __slots__ = ("oob", "used")

    def __init__(self, oob: dict[int, int]) -> None:
        self.oob = oob  # id(out-of-band memoryview) -> index
        self.used: set[int] = set()

    def __call__(self, *args: Any) -> _PendingArray:
        if len(args) not in (4, 5):
            raise ProtocolError("_frombuffer takes 4 or 5 arguments")
        buf, dtype, shape, order = args[:4]
        axis_order = args[4] if len(args) == 5 else None

        if type(buf) is memoryview:
            index = self.oob.get(id(buf))
            if index is None:
                raise ProtocolError("array buffer is not one of the frame's buffers")
            if index in self.used:
                raise ProtocolError(f"out-of-band buffer {index} used twice")
            self.used.add(index)
        elif type(buf) not in (bytes, bytearray):
            raise ProtocolError(f"array buffer of type {type(buf).__name__} is not allowed")
        if type(dtype) is not _PendingDtype:
            raise ProtocolError("array dtype is not an allowed numpy.dtype")
        if type(shape) is not tuple or len(shape) > MAX_NDIM:
            raise ProtocolError(f"array shape must be a tuple of at most {MAX_NDIM} ints")
        for dim in shape:
            if type(dim) is not int or dim < 0:
                raise ProtocolError(f"array shape {shape!r} is not a tuple of non-negative ints")
        if type(order) is not str or order not in ("C", "F", "K"):
            raise ProtocolError(f"array order {order!r} is not allowed")
        if order == "K":
            if (
                type(axis_order) is not tuple
                or sorted(axis_order) != list(range(len(shape)))
                or any(type(a) is not int for a in axis_order)
            ):
                raise ProtocolError("array axis order is not a permutation of its axes")
        elif axis_order is not None:
            raise ProtocolError("axis order given without order 'K'")

        dt = dtype.resolve()
        nbytes = memoryview(buf).nbytes
        if math.prod(shape) * dt.itemsize != nbytes:
            raise ProtocolError(
                f"array of shape {shape} and dtype {dt} needs {math.prod(shape) * dt.itemsize} "
                f"bytes, buffer has {nbytes}"
            )
        flat = np.frombuffer(buf, dtype=dt)
        if order == "K":
            return _PendingArray(flat.reshape(shape).transpose(axis_order))
        return _PendingArray(flat.reshape(shape, order=order))


_DTYPE_FACTORY = _DtypeFactory()
_FROMBUFFER_NAMES = frozenset(
    [("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer")]
)


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves exactly three globals; never falls back to the default ``find_class``."""

    def __init__(self, file: io.BytesIO, buffers: list[memoryview]) -> None:
        super().__init__(file, fix_imports=False, buffers=buffers)
        self._frombuffer = _FromBuffer({id(b): i for i, b in enumerate(buffers)})
        self.n_buffers = len(buffers)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _FROMBUFFER_NAMES:
            return self._frombuffer
        if (module, name) == ("numpy", "dtype"):
            return _DTYPE_FACTORY
        raise ProtocolError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise ProtocolError("persistent ids are not allowed")


class _Walk:
    """Replace pending arrays with ndarrays and refuse anything else outside the allowed types.

    Every visit counts against the node cap, so memo-shared subtrees cannot make the walk
    run long.
    """

    def __init__(self, max_depth: int, max_nodes: int) -> None:
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.nodes = 0

    def __call__(self, obj: Any, depth: int = 0) -> Any:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise ProtocolError(f"more than {self.max_nodes} objects")
        if depth > self.max_depth:
            raise ProtocolError(f"nesting deeper than {self.max_depth}")
        kind = type(obj)
        if kind is _PendingArray:
            return obj.array
        if kind in _SCALARS:
            return obj
        if kind is dict:
            out = {}
            for key, value in obj.items():
                if type(key) is not str:
                    raise ProtocolError(f"dict key of type {type(key).__name__} is not allowed")
                out[key] = self(value, depth + 1)
            return out
        if kind is list:
            return [self(v, depth + 1) for v in obj]
        if kind is tuple:
            return tuple(self(v, depth + 1) for v in obj)
        raise ProtocolError(f"object of type {kind.__name__} is not allowed")


def _split_frame(view: memoryview) -> tuple[memoryview, list[memoryview]]:
    """Check a frame's header and lengths; return the pickle and buffer slices."""
    size = view.nbytes
    if size < _HEADER.size:
        raise ProtocolError(f"frame header truncated ({size} bytes)")
    _, version, reserved, n_buffers, pickle_len = _HEADER.unpack_from(view)
    if version != VERSION:
        raise ProtocolError(f"unsupported frame version {version} (this decoder reads {VERSION})")
    if reserved != b"\0\0\0":
        raise ProtocolError("reserved header bytes are not zero")
    if n_buffers > MAX_BUFFERS:
        raise ProtocolError(f"{n_buffers} buffers exceed the limit of {MAX_BUFFERS}")
    header_len = _HEADER.size + 8 * n_buffers
    if header_len > size:
        raise ProtocolError("frame truncated inside the buffer length table")
    lengths = struct.unpack_from(f"<{n_buffers}Q", view, _HEADER.size)

    offset = header_len
    slices: list[tuple[int, int]] = []
    for length in (pickle_len, *lengths):
        pad = _pad(offset)
        if offset + pad + length > size:
            raise ProtocolError(
                f"frame claims {length} bytes at offset {offset + pad}, body has {size}"
            )
        if view[offset : offset + pad] != _ZERO_PAD[:pad]:
            raise ProtocolError(f"non-zero padding at offset {offset}")
        slices.append((offset + pad, length))
        offset += pad + length
    if offset != size:
        raise ProtocolError(f"{size - offset} trailing bytes after the frame")
    (p_start, p_len), *rest = slices
    return view[p_start : p_start + p_len], [view[s : s + n] for s, n in rest]


def binary_to_dict(
    body: bytes | bytearray | memoryview,
    *,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
) -> dict:
    """Decode a version-1 frame or bare protocol-5 pickle into a dict.

    Arrays are read-only views into ``body`` (zero-copy for out-of-band buffers), so
    ``body`` must outlive them and must not be modified. Raises :class:`ProtocolError`
    naming the reason for anything the format does not allow.
    """
    try:
        # Read-only, so that READONLY_BUFFER hands the unpickler back the very same views.
        view = memoryview(body).cast("B").toreadonly()
    except TypeError as exc:
        raise ProtocolError(f"body of type {type(body).__name__} is not bytes-like") from exc
    if view.nbytes >= 4 and view[:4] == MAGIC:
        pickle_view, buffers = _split_frame(view)
    elif view.nbytes >= 2 and view[:2] == b"\x80\x05":
        pickle_view, buffers = view, []
    else:
        raise ProtocolError("body is neither a PK5F frame nor a protocol-5 pickle")

    stream = io.BytesIO(pickle_view)
    unpickler = _AllowListUnpickler(stream, buffers)
    try:
        loaded = unpickler.load()
    except ProtocolError:
        raise
    except Exception as exc:  # truncated streams, bad opcodes, BUILD on builtins, ...
        raise ProtocolError(f"malformed pickle: {type(exc).__name__}: {exc}") from exc
    if stream.tell() != pickle_view.nbytes:
        raise ProtocolError(f"{pickle_view.nbytes - stream.tell()} trailing bytes after the pickle")
    if len(unpickler._frombuffer.used) != len(buffers):
        raise ProtocolError("frame carries out-of-band buffers that no array uses")
    if type(loaded) is not dict:
        raise ProtocolError(f"top level must be a dict, got {type(loaded).__name__}")
    return _Walk(max_depth, max_nodes)(loaded)
