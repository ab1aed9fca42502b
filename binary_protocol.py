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
opcode sequence (see docs/wire-formats.md).

Decoding never imports or calls anything outside that allow-list. It does not use
CPython's unpickler: it implements only the opcodes a protocol-5 pickler emits for the
allowed types (no memo PUT, EXT, INST/OBJ, persistent ids or sets), resolves exactly
those three globals, allows BUILD only on a dtype with numpy's plain state, refuses
non-str dict keys as they are inserted, checks array arguments before numpy sees them,
and walks the result with caps on depth and visits. Every rejection raises
:class:`ProtocolError`. Decoded arrays are read-only views into the body: no copy.
"""

from __future__ import annotations

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
# Opcodes allowed per allowed object: a real pickle uses 1-3 per value (an array ~20, but
# arrays are few); the cap bounds the decoder's work to about half a second.
OPS_PER_NODE = 4

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


def _describe(obj: Any) -> str:
    """A short, bounded description of a decoded object for an error message.

    Never ``repr`` of what a stream built: a deep tuple makes repr recurse past the limit,
    and memo-shared strings make it build gigabytes.
    """
    if type(obj) is str:
        return repr(obj[:32])
    return type(obj).__name__.lstrip("_")


# ---------------------------------------------------------------------------------
# Encoding


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind not in _DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ProtocolError(f"{where}: unsupported dtype {dtype!s} (allowed kinds: b, i, u, f, c)")
    if dtype.str[1:] not in _DTYPE_NAMES:
        raise ProtocolError(f"{where}: unsupported dtype {dtype!s}")


def _prepare(obj: Any, where: str, depth: int) -> Any:
    """Return ``obj`` in the form the wire allows, or raise ProtocolError."""
    if type(obj) is str:
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(f"{where}: string is not valid UTF-8 (lone surrogate)") from None
        return obj
    if type(obj) in _SCALARS:
        return obj
    if isinstance(obj, np.generic):  # numpy scalar (np.float64 is also a float) -> 0-d array
        obj = np.asarray(obj)
    if isinstance(obj, np.ndarray):
        if type(obj) is not np.ndarray:
            raise ProtocolError(f"{where}: ndarray subclass {type(obj).__name__} is not supported")
        _check_dtype(obj.dtype, where)
        return obj if obj.flags.c_contiguous else obj.copy(order="C")
    if isinstance(obj, (dict, list, tuple)) and depth >= MAX_DEPTH:
        raise ProtocolError(f"{where}: nesting deeper than {MAX_DEPTH}")
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ProtocolError(f"{where}: dict key of type {type(key).__name__} is not a str")
            _prepare(key, f"{where} key", depth)
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
#
# The decoder does not use CPython's unpickler. It implements only the opcodes that a
# protocol-5 pickler emits for the allowed types, so memo PUT (whose index sizes an
# allocation), EXT (resolved from a process-wide cache before find_class), INST/OBJ,
# persistent ids, sets and non-str dict keys (hash-collision attacks) have no code path.
# The only callables a stream can reach are the two checked constructors below.

_MAX_LONG_BYTES = 64  # ints up to 512 bits
_MAX_DIM = 1 << 62


class _Token:
    """Objects that exist only while decoding; none may appear in the result."""

    __slots__ = ()


class _Global(_Token):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_FROMBUFFER = _Global("_frombuffer")
_DTYPE = _Global("dtype")
_GLOBALS = {
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,  # numpy 2
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,  # numpy 1
    ("numpy", "dtype"): _DTYPE,
}


class _Dtype(_Token):
    """``numpy.dtype(name, False, True)`` awaiting its optional BUILD with the byte order."""

    __slots__ = ("name", "byteorder", "built")

    def __init__(self, args: tuple) -> None:
        if len(args) != 3 or args[1] is not False or args[2] is not True:
            raise ProtocolError("dtype arguments are not the plain form (name, False, True)")
        if type(args[0]) is not str or args[0] not in _DTYPE_NAMES:
            raise ProtocolError(f"dtype {_describe(args[0])} is not allowed (kinds b, i, u, f, c only)")
        self.name = args[0]
        self.byteorder = "="
        self.built = False

    def build(self, state: Any) -> None:
        # numpy's plain form is (3, byteorder, None, None, None, -1, -1, 0); subarrays,
        # fields, metadata and flags never reach numpy's C __setstate__, which has read
        # uninitialised memory when handed a crafted state.
        if self.built:
            raise ProtocolError("dtype state given twice")
        if (
            type(state) is not tuple
            or len(state) != 8
            or type(state[0]) is not int
            or state[0] != 3
            or type(state[1]) is not str
            or state[1] not in _BYTEORDERS
            or state[2] is not None
            or state[3] is not None
            or state[4] is not None
            or any(type(v) is not int for v in state[5:])
            or state[5:] != (-1, -1, 0)
        ):
            raise ProtocolError("dtype state is not the plain form")
        self.byteorder = state[1]
        self.built = True

    def resolve(self) -> np.dtype:
        dtype = np.dtype(self.name)
        return dtype if self.byteorder in "=|" else dtype.newbyteorder(self.byteorder)


class _Buffer(_Token):
    """An out-of-band buffer (NEXT_BUFFER) or in-band BYTEARRAY8 bytes: only an array may use it."""

    __slots__ = ("view", "index")

    def __init__(self, view: memoryview, index: int) -> None:
        self.view = view
        self.index = index  # -1 for in-band


class _Decoder:
    """One decode: checked array construction and the out-of-band buffer bookkeeping."""

    def __init__(self, buffers: list[memoryview]) -> None:
        self.buffers = buffers
        self.next_buffer = 0
        self.used: set[int] = set()

    def next_oob(self) -> _Buffer:
        if self.next_buffer >= len(self.buffers):
            raise ProtocolError("NEXT_BUFFER beyond the frame's out-of-band buffers")
        buffer = _Buffer(self.buffers[self.next_buffer], self.next_buffer)
        self.next_buffer += 1
        return buffer

    def frombuffer(self, args: tuple) -> np.ndarray:
        if len(args) not in (4, 5):
            raise ProtocolError("_frombuffer takes 4 or 5 arguments")
        buf, dtype, shape, order = args[:4]
        axis_order = args[4] if len(args) == 5 else None
        if type(buf) is _Buffer:
            if buf.index >= 0:
                if buf.index in self.used:
                    raise ProtocolError(f"out-of-band buffer {buf.index} used twice")
                self.used.add(buf.index)
            data: Any = buf.view
        elif type(buf) is bytes:
            data = buf
        else:
            raise ProtocolError(f"array buffer of type {type(buf).__name__} is not allowed")
        if type(dtype) is not _Dtype:
            raise ProtocolError("array dtype is not an allowed numpy.dtype")
        if type(shape) is not tuple or len(shape) > MAX_NDIM:
            raise ProtocolError(f"array shape must be a tuple of at most {MAX_NDIM} ints")
        for dim in shape:
            if type(dim) is not int or not 0 <= dim <= _MAX_DIM:
                raise ProtocolError("array shape is not a tuple of non-negative ints below 2**62")
        if type(order) is not str or order not in ("C", "F", "K"):
            raise ProtocolError(f"array order {_describe(order)} is not allowed")
        if order == "K":
            if (
                type(axis_order) is not tuple
                or any(type(a) is not int for a in axis_order)
                or sorted(axis_order) != list(range(len(shape)))
            ):
                raise ProtocolError("array axis order is not a permutation of its axes")
        elif axis_order is not None:
            raise ProtocolError("axis order given without order 'K'")
        dt = dtype.resolve()
        nbytes = memoryview(data).nbytes
        needed = math.prod(shape) * dt.itemsize
        if needed != nbytes:
            raise ProtocolError(f"array of shape {shape} and dtype {dt} needs {needed} bytes, buffer has {nbytes}")
        flat = np.frombuffer(data, dtype=dt)
        if order == "K":
            return flat.reshape(shape).transpose(axis_order)
        return flat.reshape(shape, order=order)


def _load(view: memoryview, buffers: list[memoryview], max_ops: int) -> Any:
    """Run the restricted opcode set over ``view``; return the one object left at STOP.

    Opcodes are read from a bytes copy of the pickle (fast indexing); in-band array bytes
    are sliced from ``view`` itself, so they stay views into the body. Branches are ordered
    by how often a protocol-5 pickle of an observation uses them.
    """
    n = view.nbytes
    data = bytes(view) if n <= 65536 else view
    if n < 3 or data[0] != 0x80 or data[1] != 5:
        raise ProtocolError("pickle does not start with PROTO 5")
    decoder = _Decoder(buffers)
    unpack_from = struct.unpack_from
    stack: list[Any] = []
    push = stack.append
    marks: list[int] = []
    memo: list[Any] = []
    fence = 0  # items below the last MARK cannot be popped
    pos = 2
    ops = 0
    while pos < n:
        ops += 1
        if ops > max_ops:
            raise ProtocolError(f"more than {max_ops} pickle opcodes")
        op = data[pos]
        pos += 1
        if op == 0x94:  # MEMOIZE
            if len(stack) <= fence:
                raise ProtocolError("MEMOIZE on an empty stack")
            memo.append(stack[-1])
        elif op == 0x8C:  # SHORT_BINUNICODE
            if pos >= n:
                break
            end = pos + 1 + data[pos]
            if end > n:
                break
            push(str(data[pos + 1 : end], "utf-8"))
            pos = end
        elif op == 0x4B:  # BININT1
            if pos >= n:
                break
            push(data[pos])
            pos += 1
        elif op == 0x28:  # MARK
            fence = len(stack)
            marks.append(fence)
        elif op == 0x93:  # STACK_GLOBAL
            if len(stack) < fence + 2:
                raise ProtocolError("STACK_GLOBAL needs a module and a name")
            name = stack.pop()
            module = stack.pop()
            if type(module) is not str or type(name) is not str:
                raise ProtocolError("STACK_GLOBAL module and name must be str")
            found = _GLOBALS.get((module, name))
            if found is None:
                raise ProtocolError(f"global {module[:64]}.{name[:64]} is not allowed")
            push(found)
        elif op == 0x52:  # REDUCE
            if len(stack) < fence + 2:
                raise ProtocolError("REDUCE needs a callable and arguments")
            args = stack.pop()
            func = stack.pop()
            if type(args) is not tuple:
                raise ProtocolError("REDUCE arguments must be a tuple")
            if func is _FROMBUFFER:
                push(decoder.frombuffer(args))
            elif func is _DTYPE:
                push(_Dtype(args))
            else:
                raise ProtocolError(f"REDUCE on {type(func).__name__.lstrip('_')}, not an allowed global")
        elif op == 0x74 or op == 0x75 or op == 0x65:  # TUPLE, SETITEMS, APPENDS: pop to MARK
            if not marks:
                raise ProtocolError("no MARK to pop to")
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
            fence = marks[-1] if marks else 0
            if op == 0x74:
                push(tuple(items))
                continue
            if len(stack) <= fence:
                raise ProtocolError("SETITEMS or APPENDS without a container below its MARK")
            target = stack[-1]
            if op == 0x65:
                if type(target) is not list:
                    raise ProtocolError(f"APPENDS on {type(target).__name__.lstrip('_')}")
                target.extend(items)
                continue
            if type(target) is not dict:
                raise ProtocolError(f"SETITEMS on {type(target).__name__.lstrip('_')}")
            if len(items) % 2:
                raise ProtocolError("SETITEMS with an odd number of items")
            for i in range(0, len(items), 2):
                if type(items[i]) is not str:
                    raise ProtocolError(f"dict key of type {type(items[i]).__name__.lstrip('_')} is not allowed")
                if items[i] in target:  # a pickler never repeats a key: a crafted stream hiding a value
                    raise ProtocolError("dict repeats a key")
                target[items[i]] = items[i + 1]
        elif 0x85 <= op <= 0x87:  # TUPLE1, TUPLE2, TUPLE3
            k = op - 0x84
            if len(stack) < fence + k:
                raise ProtocolError("TUPLE opcode on too short a stack")
            items = tuple(stack[-k:])
            del stack[-k:]
            push(items)
        elif op == 0x62:  # BUILD
            if len(stack) < fence + 2:
                raise ProtocolError("BUILD needs an object and a state")
            state = stack.pop()
            target = stack[-1]
            if type(target) is not _Dtype:
                raise ProtocolError(f"BUILD on {type(target).__name__.lstrip('_')} is not allowed")
            target.build(state)
        elif op == 0x68 or op == 0x6A:  # BINGET, LONG_BINGET
            width = 1 if op == 0x68 else 4
            if pos + width > n:
                break
            index = data[pos] if width == 1 else unpack_from("<I", data, pos)[0]
            pos += width
            if index >= len(memo):
                raise ProtocolError(f"memo index {index} was never stored")
            push(memo[index])
        elif op == 0x89:  # NEWFALSE
            push(False)
        elif op == 0x88:  # NEWTRUE
            push(True)
        elif op == 0x4E:  # NONE
            push(None)
        elif op == 0x97:  # NEXT_BUFFER
            push(decoder.next_oob())
        elif op == 0x98:  # READONLY_BUFFER: every buffer is a read-only view already
            if len(stack) <= fence or type(stack[-1]) is not _Buffer:
                raise ProtocolError("READONLY_BUFFER needs a buffer")
        elif op == 0x7D:  # EMPTY_DICT
            push({})
        elif op == 0x5D:  # EMPTY_LIST
            push([])
        elif op == 0x29:  # EMPTY_TUPLE
            push(())
        elif op == 0x73:  # SETITEM
            if len(stack) < fence + 3:
                raise ProtocolError("SETITEM needs a dict, a key and a value")
            value = stack.pop()
            key = stack.pop()
            target = stack[-1]
            if type(target) is not dict:
                raise ProtocolError(f"SETITEM on {type(target).__name__.lstrip('_')}")
            if type(key) is not str:
                raise ProtocolError(f"dict key of type {type(key).__name__.lstrip('_')} is not allowed")
            if key in target:
                raise ProtocolError("dict repeats a key")
            target[key] = value
        elif op == 0x61:  # APPEND
            if len(stack) < fence + 2 or type(stack[-2]) is not list:
                raise ProtocolError("APPEND needs a list")
            value = stack.pop()
            stack[-1].append(value)
        elif op == 0x4A or op == 0x4D or op == 0x47:  # BININT, BININT2, BINFLOAT
            fmt, width = {0x4A: ("<i", 4), 0x4D: ("<H", 2), 0x47: (">d", 8)}[op]
            if pos + width > n:
                break
            push(unpack_from(fmt, data, pos)[0])
            pos += width
        elif op == 0x8A or op == 0x8B:  # LONG1, LONG4
            width = 1 if op == 0x8A else 4
            if pos + width > n:
                break
            k = data[pos] if width == 1 else unpack_from("<I", data, pos)[0]
            if k > _MAX_LONG_BYTES:
                raise ProtocolError(f"integer of {k} bytes exceeds {_MAX_LONG_BYTES}")
            pos += width
            if pos + k > n:
                break
            push(int.from_bytes(data[pos : pos + k], "little", signed=True))
            pos += k
        elif op in _SIZED:  # BINUNICODE, BINUNICODE8, SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
            fmt, width = _SIZED[op]
            if pos + width > n:
                break
            k = unpack_from(fmt, data, pos)[0]
            pos += width
            if pos + k > n:
                break
            if op == 0x58 or op == 0x8D:
                push(str(data[pos : pos + k], "utf-8"))
            elif op == 0x96:
                push(_Buffer(view[pos : pos + k], -1))
            else:
                push(bytes(data[pos : pos + k]))
            pos += k
        elif op == 0x95:  # FRAME: a framing hint; its length must lie inside the pickle
            if pos + 8 > n:
                break
            frame_len = unpack_from("<Q", data, pos)[0]
            if frame_len == 0 or pos + 8 + frame_len > n:
                raise ProtocolError("FRAME empty or longer than the pickle")
            pos += 8
        elif op == 0x2E:  # STOP
            if pos != n:
                raise ProtocolError(f"{n - pos} trailing bytes after STOP")
            if marks or len(stack) != 1:
                raise ProtocolError("STOP with a MARK open or more than one object")
            if len(decoder.used) != len(buffers):
                raise ProtocolError("frame carries out-of-band buffers that no array uses")
            return stack[0]
        else:
            raise ProtocolError(f"pickle opcode 0x{op:02x} at byte {pos - 1} is not allowed")
    raise ProtocolError(f"pickle truncated at byte {pos} of {n}")


# Length-prefixed opcodes: (struct format of the length, its width).
_SIZED = {
    0x58: ("<I", 4), 0x8D: ("<Q", 8),  # BINUNICODE, BINUNICODE8
    0x43: ("<B", 1), 0x42: ("<I", 4), 0x8E: ("<Q", 8),  # SHORT_BINBYTES, BINBYTES, BINBYTES8
    0x96: ("<Q", 8),  # BYTEARRAY8
}


_SCALARS_OUT = _SCALARS | {np.ndarray}


def _check_tree(obj: Any, max_depth: int, max_nodes: int) -> None:
    """Refuse decode-time tokens in the result and cap depth and visits (memo-shared
    subtrees count at every visit, so a small body cannot make a walk run long)."""
    visits = 1
    stack = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind in _SCALARS_OUT:
            continue
        if depth >= max_depth:
            raise ProtocolError(f"nesting deeper than {max_depth}")
        if kind is dict or kind is list or kind is tuple:
            # Count children as they are pushed, so neither the work nor the stack can
            # outgrow max_nodes (a list holding itself a million times, say).
            visits += len(item)
            if visits > max_nodes:
                raise ProtocolError(f"more than {max_nodes} objects")
            children = item.values() if kind is dict else item
            stack.extend((v, depth + 1) for v in children)
        else:
            raise ProtocolError(f"object of type {kind.__name__.lstrip('_')} is not allowed in the result")


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
            raise ProtocolError(f"frame claims {length} bytes at offset {offset + pad}, body has {size}")
        if pad and view[offset : offset + pad] != _ZERO_PAD[:pad]:
            raise ProtocolError(f"non-zero padding at offset {offset}")
        slices.append((offset + pad, length))
        offset += pad + length
    if offset != size:
        raise ProtocolError(f"{size - offset} trailing bytes after the frame")
    (p_start, p_len), *rest = slices
    return view[p_start : p_start + p_len], [view[s : s + k] for s, k in rest]


def binary_to_dict(
    body: bytes | bytearray | memoryview,
    *,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
) -> dict:
    """Decode a version-1 frame or bare protocol-5 pickle into a dict.

    Arrays are read-only views into ``body`` (out-of-band and BYTEARRAY8 buffers: no copy),
    so ``body`` must outlive them and must not be modified. Raises :class:`ProtocolError`
    naming the reason for anything the format does not allow.
    """
    try:
        view = memoryview(body).cast("B").toreadonly()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"body of type {type(body).__name__} is not bytes-like") from exc
    if view.nbytes >= 4 and view[:4] == MAGIC:
        pickle_view, buffers = _split_frame(view)
    elif view.nbytes >= 2 and view[:2] == b"\x80\x05":
        pickle_view, buffers = view, []
    else:
        raise ProtocolError("body is neither a PK5F frame nor a protocol-5 pickle")
    try:
        loaded = _load(pickle_view, buffers, max_ops=OPS_PER_NODE * max_nodes)
    except ProtocolError:
        raise
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:  # numpy refusing a reshape, ...
        raise ProtocolError(f"malformed pickle: {type(exc).__name__}: {exc}") from exc
    if type(loaded) is not dict:
        raise ProtocolError(f"top level must be a dict, got {type(loaded).__name__.lstrip('_')}")
    _check_tree(loaded, max_depth, max_nodes)
    return loaded


# An encoded camera image (opt in, see docs/wire-formats.md "Compressed camera images") is a plain
# dict of already-allowed types, so the allow-list does not grow: {"codec": "jpeg" | "png",
# "data": uint8[n] (the encoded bytes, sent out of band)}. A vectorized request sends a list
# of them, one per row.
IMAGE_CODECS = ("jpeg", "png")


def encoded_image(codec: str, data: bytes | np.ndarray) -> dict:
    """The wire marker for an encoded image: ``{"codec": codec, "data": uint8[n]}``."""
    if codec not in IMAGE_CODECS:
        raise ProtocolError(f"image codec {codec!r} is not one of {IMAGE_CODECS}")
    return {"codec": codec, "data": np.frombuffer(data, dtype=np.uint8)}


def is_encoded_image(value: Any) -> bool:
    """True when ``value`` has the marker's shape (the codec and data are checked by the reader)."""
    return type(value) is dict and value.keys() == {"codec", "data"}
