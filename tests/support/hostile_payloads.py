"""Hand-assembled hostile request bodies for ``binary_protocol.binary_to_dict``.

Every body here is written opcode by opcode (no ``pickle.dumps`` of a real object), so a
payload can name callables and states that no honest encoder would produce. Payloads that
try to run code would, if anything ever executed them, create the file ``canary``: the
tests check that it never appears.

``hostile_payloads(canary)`` returns the list; ``valid_bodies()`` returns benign bodies
made with the same helpers (proof that a hostile body differs from an accepted one only by
its hostile part). A few builders take a size so that tests can scale an attack up.

Opcode reference: CPython ``Lib/pickletools.py``.
"""

from __future__ import annotations

import random
import shlex
import struct
from dataclasses import dataclass

__all__ = [
    "FAMILIES",
    "HostilePayload",
    "hostile_payloads",
    "valid_bodies",
    "split_frame",
    "EXT_REGISTRATIONS",
    "ext_call_body",
    "memo_index_body",
    "colliding_keys_body",
    "bigint_shape_body",
    "frame",
    "bare",
]

FAMILIES = (
    "reduce",
    "inst_obj",
    "ext",
    "dotted",
    "object_array",
    "dtype_state",
    "build",
    "frombuffer_args",
    "lying_length",
    "nesting",
)


@dataclass(frozen=True)
class HostilePayload:
    family: str
    name: str
    body: bytes
    # True when an *unrestricted* ``pickle.loads`` of this body (with the frame's buffers)
    # creates the canary: proof that the payload is a live gadget, not a typo.
    armed: bool = False

    @property
    def id(self) -> str:
        return f"{self.family}-{self.name}"


# ---------------------------------------------------------------------------------
# Opcodes (pickletools names)

PROTO5 = b"\x80\x05"
STOP = b"."
MARK = b"("
POP = b"0"
NONE = b"N"
TRUE = b"\x88"  # NEWTRUE
FALSE = b"\x89"  # NEWFALSE
EMPTY_DICT = b"}"
EMPTY_LIST = b"]"
EMPTY_TUPLE = b")"
EMPTY_SET = b"\x8f"
ADDITEMS = b"\x90"
FROZENSET = b"\x91"
APPEND = b"a"
APPENDS = b"e"
SETITEM = b"s"
SETITEMS = b"u"
LIST = b"l"
TUPLE = b"t"
TUPLE1 = b"\x85"
TUPLE2 = b"\x86"
TUPLE3 = b"\x87"
REDUCE = b"R"
BUILD = b"b"
INST = b"i"
OBJ = b"o"
NEWOBJ = b"\x81"
NEWOBJ_EX = b"\x92"
STACK_GLOBAL = b"\x93"
GLOBAL = b"c"
EXT1 = b"\x82"
EXT2 = b"\x83"
EXT4 = b"\x84"
MEMOIZE = b"\x94"
NEXT_BUFFER = b"\x97"
READONLY_BUFFER = b"\x98"
PERSID = b"P"
BINPERSID = b"Q"
FRAME = b"\x95"


def binget(index: int) -> bytes:
    return b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)


def u(text: str) -> bytes:
    """A str: SHORT_BINUNICODE or BINUNICODE."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) < 256:
        return b"\x8c" + bytes([len(raw)]) + raw
    return b"X" + struct.pack("<I", len(raw)) + raw


def by(data: bytes) -> bytes:
    """A bytes object: SHORT_BINBYTES or BINBYTES."""
    if len(data) < 256:
        return b"C" + bytes([len(data)]) + data
    return b"B" + struct.pack("<I", len(data)) + data


def bytearray8(data: bytes) -> bytes:
    return b"\x96" + struct.pack("<Q", len(data)) + data


def long_(value: int) -> bytes:
    """LONG1 / LONG4: two's complement little-endian, any size."""
    raw = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    if len(raw) < 256:
        return b"\x8a" + bytes([len(raw)]) + raw
    return b"\x8b" + struct.pack("<i", len(raw)) + raw


def i(value: int) -> bytes:
    """An int: BININT1 / BININT2 / BININT / LONG1 / LONG4."""
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    return long_(value)


def tup(*items: bytes) -> bytes:
    if not items:
        return EMPTY_TUPLE
    if len(items) <= 3:
        return b"".join(items) + (TUPLE1, TUPLE2, TUPLE3)[len(items) - 1]
    return MARK + b"".join(items) + TUPLE


def lst(*items: bytes) -> bytes:
    """A list the way a protocol-5 pickler writes one: EMPTY_LIST, MARK, items, APPENDS."""
    return EMPTY_LIST + MARK + b"".join(items) + APPENDS if items else EMPTY_LIST


def dct(*pairs: tuple[bytes, bytes]) -> bytes:
    if not pairs:
        return EMPTY_DICT
    return EMPTY_DICT + MARK + b"".join(k + v for k, v in pairs) + SETITEMS


def sglobal(module: str, name: str) -> bytes:
    return u(module) + u(name) + STACK_GLOBAL


def tglobal(module: str, name: str) -> bytes:
    """Protocol-0 GLOBAL: ``c<module>\\n<name>\\n``."""
    return GLOBAL + module.encode() + b"\n" + name.encode() + b"\n"


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + REDUCE


def build(obj: bytes, state: bytes) -> bytes:
    return obj + state + BUILD


def bare(*parts: bytes) -> bytes:
    """A bare protocol-5 pickle: PROTO 5, ``parts``, STOP."""
    return PROTO5 + b"".join(parts) + STOP


def top(value: bytes, key: str = "x") -> bytes:
    """Opcodes for ``{key: value}``."""
    return EMPTY_DICT + u(key) + value + SETITEM


def bare_dict(value: bytes, key: str = "x") -> bytes:
    return bare(top(value, key))


def frame(
    pickle_bytes: bytes,
    buffers: list[bytes] | tuple[bytes, ...] = (),
    *,
    magic: bytes = b"PK5F",
    version: int = 1,
    reserved: bytes = b"\0\0\0",
    n: int | None = None,
    pickle_len: int | None = None,
    lengths: list[int] | None = None,
    header_pad_fill: int = 0,
    buffer_pad_fill: int = 0,
    trailing: bytes = b"",
) -> bytes:
    """A PK5F frame; every header field can be made to lie."""
    n = len(buffers) if n is None else n
    lengths = [len(b) for b in buffers] if lengths is None else lengths
    pickle_len = len(pickle_bytes) if pickle_len is None else pickle_len
    out = bytearray(struct.pack("<4sB3sIQ", magic, version, reserved, n, pickle_len))
    out += struct.pack(f"<{len(lengths)}Q", *lengths)
    out += bytes([header_pad_fill]) * (-len(out) % 64)
    out += pickle_bytes
    for buf in buffers:
        out += bytes([buffer_pad_fill]) * (-len(out) % 64)
        out += buf
    out += trailing
    return bytes(out)


def split_frame(body: bytes) -> tuple[bytes, list[bytes]]:
    """Pickle region and buffers of a well-formed frame (a bare pickle has no buffers).

    Independent of binary_protocol, for running payloads through an unrestricted
    ``pickle.loads`` to prove that they are armed.
    """
    if body[:4] != b"PK5F":
        return body, []
    _, _, _, n, plen = struct.unpack_from("<4sB3sIQ", body)
    lengths = struct.unpack_from(f"<{n}Q", body, 20)
    offset = 20 + 8 * n
    out = []
    for length in (plen, *lengths):
        offset += -offset % 64
        out.append(body[offset : offset + length])
        offset += length
    return out[0], out[1:]


# numpy's own spelling of a contiguous array (see binary_protocol's docstring)
FROMBUFFER = sglobal("numpy._core.numeric", "_frombuffer")
FROMBUFFER_NP1 = sglobal("numpy.core.numeric", "_frombuffer")
DTYPE = sglobal("numpy", "dtype")


def plain_state(byteorder: str = "<") -> bytes:
    return tup(i(3), u(byteorder), NONE, NONE, NONE, i(-1), i(-1), i(0))


def dtype_(name: str = "f4", byteorder: str = "<", *, args: tuple[bytes, ...] | None = None,
           state: bytes | None = b"plain") -> bytes:
    """``numpy.dtype(name, False, True)`` then BUILD with the plain state (or ``state``)."""
    out = call(DTYPE, *(args if args is not None else (u(name), FALSE, TRUE)))
    if state == b"plain":
        state = plain_state(byteorder)
    if state is not None:
        out += state + BUILD
    return out


def shape_ops(shape: tuple[int, ...]) -> bytes:
    return tup(*(i(d) for d in shape))


def arr(buf: bytes, dtype: bytes | None = None, shape: bytes | tuple[int, ...] = (2,),
        order: bytes | str = "C", *extra: bytes, fb: bytes = FROMBUFFER) -> bytes:
    """``_frombuffer(buf, dtype, shape, order, *extra)``; arguments are opcode fragments."""
    dtype = dtype_("f4") if dtype is None else dtype
    shape = shape_ops(shape) if isinstance(shape, tuple) else shape
    order = u(order) if isinstance(order, str) else order
    return fb + MARK + buf + dtype + shape + order + b"".join(extra) + TUPLE + REDUCE


ZEROS8 = by(b"\0" * 8)  # in-band buffer for a f4[2]


# ---------------------------------------------------------------------------------
# Scalable builders (also used by the tests that measure cost)


def memo_index_body(index: int) -> bytes:
    """LONG_BINPUT with a huge memo index: CPython's C unpickler grows its memo *array* to
    ``2 * index`` slots and zero-fills it (8 bytes a slot), from a 9-byte body."""
    return bare(EMPTY_DICT, b"r" + struct.pack("<I", index))


def colliding_keys_body(n: int, collide: bool = True) -> bytes:
    """A dict whose ``n`` int keys all hash alike (multiples of 2**61 - 1): every insert
    probes every earlier key while the unpickler builds the dict (quadratic)."""
    modulus = 2**61 - 1
    keys = [(k + 1) * modulus if collide else 2**62 + (k + 1) * 7919 for k in range(n)]
    return bare(EMPTY_DICT + MARK + b"".join(long_(k) + NONE for k in keys) + SETITEMS)


def bigint_shape_body(nbytes: int, ndim: int = 32) -> bytes:
    """An array whose shape holds one ``nbytes``-byte int, memoised and repeated ndim-1
    times, then 0: non-negative ints of any size pass the shape check, and the byte-count
    check multiplies them all (``math.prod``) before numpy sees the shape."""
    big = long_((1 << (8 * nbytes - 2)) - 1)
    shape = MARK + big + MEMOIZE + binget(0) * (ndim - 2) + i(0) + TUPLE
    return bare(top(arr(by(b""), dtype_("f4"), shape, "C")))


# copyreg extension codes used by the ext tests (0xF0-0xFF is the private range).
EXT_REGISTRATIONS = (
    ("ext1", 0xF1, "os", "system"),
    ("ext2", 0xF1F1, "builtins", "exec"),
    ("ext4", 0x7FF1F1F1, "subprocess", "check_call"),
)


def ext_op(code: int) -> bytes:
    if code < 256:
        return EXT1 + bytes([code])
    if code < 65536:
        return EXT2 + struct.pack("<H", code)
    return EXT4 + struct.pack("<i", code)


def ext_call_body(code: int, module: str, name: str, canary: str) -> bytes:
    """``<extension code>(<canary-creating argument>)``."""
    return bare_dict(call(ext_op(code), _canary_arg(module, name, canary)))


def _canary_arg(module: str, name: str, canary: str) -> bytes:
    if (module, name) in {("builtins", "exec"), ("builtins", "eval")}:
        return u(f"open({canary!r}, 'w').close()")
    if module == "subprocess":
        return lst(u("touch"), u(canary))
    return u(f"touch {shlex.quote(canary)}")


# ---------------------------------------------------------------------------------
# Benign bodies built with the same helpers


def valid_bodies() -> list[tuple[str, bytes, dict]]:
    """(name, body, what it decodes to: {key: (dtype str, shape)} or plain values)."""
    oob = b"\x00\x00\x80\x3f\x00\x00\x00\x40"  # f4 [1, 2]
    return [
        ("bare_inband_bytes", bare_dict(arr(by(oob), dtype_("f4", "<"), (2,), "C")),
         {"x": ("<f4", (2,))}),
        ("bare_inband_bytearray_numpy1", bare_dict(arr(bytearray8(oob), dtype_("f4", "<"), (2,),
                                                       "C", fb=FROMBUFFER_NP1)),
         {"x": ("<f4", (2,))}),
        ("frame_oob", frame(bare_dict(arr(NEXT_BUFFER, dtype_("f4", "<"), (2,), "C")), [oob]),
         {"x": ("<f4", (2,))}),
        ("frame_oob_order_K", frame(bare_dict(arr(NEXT_BUFFER, dtype_("u1", "|"), (2, 4), "K",
                                                  tup(i(1), i(0)))), [bytes(range(8))]),
         {"x": ("|u1", (4, 2))}),
        ("frame_two_buffers", frame(bare(EMPTY_DICT + MARK
                                         + u("a") + arr(NEXT_BUFFER, dtype_("f4", "<"), (2,), "C")
                                         + u("b") + arr(NEXT_BUFFER, dtype_("i8", ">"), (1,), "F")
                                         + SETITEMS), [oob, bytes(8)]),
         {"a": ("<f4", (2,)), "b": (">i8", (1,))}),
        ("bare_plain_values", bare(dct((u("s"), u("txt")), (u("l"), lst(i(1), NONE, TRUE)),
                                       (u("t"), tup(i(2**70), by(b"b"))))),
         {"s": "txt", "l": [1, None, True], "t": (2**70, b"b")}),
    ]


# ---------------------------------------------------------------------------------
# The payloads


def hostile_payloads(canary: str) -> list[HostilePayload]:
    out: list[HostilePayload] = []

    def add(family: str, name: str, body: bytes, armed: bool = False) -> None:
        assert family in FAMILIES, family
        out.append(HostilePayload(family, name, body, armed))

    sh = f"touch {shlex.quote(canary)}"
    py = f"open({canary!r}, 'w').close()"
    argv = lst(u("touch"), u(canary))
    getattr_ = sglobal("builtins", "getattr")
    os_system = call(sglobal("os", "system"), u(sh))
    exec_py = call(sglobal("builtins", "exec"), u(py))
    valid_array = arr(ZEROS8, dtype_("f4"), (2,), "C")

    # -- reduce: GLOBAL / STACK_GLOBAL + REDUCE ---------------------------------------
    R = "reduce"
    add(R, "os_system_stack_global", bare_dict(os_system), armed=True)
    add(R, "os_system_text_global", bare_dict(call(tglobal("os", "system"), u(sh))), armed=True)
    add(R, "posix_system", bare_dict(call(sglobal("posix", "system"), u(sh))), armed=True)
    add(R, "subprocess_popen", bare_dict(call(sglobal("subprocess", "Popen"), argv)), armed=True)
    add(R, "subprocess_check_call", bare_dict(call(sglobal("subprocess", "check_call"), argv)),
        armed=True)
    add(R, "os_popen", bare_dict(call(sglobal("os", "popen"), u(sh))), armed=True)
    add(R, "builtins_eval", bare_dict(call(sglobal("builtins", "eval"), u(py))), armed=True)
    add(R, "builtins_exec", bare_dict(exec_py), armed=True)
    add(R, "builtins_import_getattr_chain",
        bare_dict(call(call(getattr_, call(sglobal("builtins", "__import__"), u("os")),
                            u("system")), u(sh))), armed=True)
    add(R, "builtins_getattr_exec_from_builtins_module",
        bare_dict(call(call(getattr_, call(sglobal("builtins", "__import__"), u("builtins")),
                            u("exec")), u(py))), armed=True)
    add(R, "builtins_open_write", bare_dict(call(sglobal("builtins", "open"), u(canary), u("w"))),
        armed=True)
    add(R, "io_open_write", bare_dict(call(sglobal("io", "open"), u(canary), u("w"))), armed=True)
    add(R, "pathlib_touch_via_getattr",
        bare_dict(call(call(getattr_, call(sglobal("pathlib", "Path"), u(canary)), u("touch")))),
        armed=True)
    add(R, "timeit_setup_code", bare_dict(call(sglobal("timeit", "timeit"), u("pass"), u(py))),
        armed=True)
    add(R, "functools_partial_os_system",
        bare_dict(call(call(sglobal("functools", "partial"), sglobal("os", "system"), u(sh)))),
        armed=True)
    inner = bare(os_system)
    add(R, "nested_pickle_loads", bare_dict(call(sglobal("pickle", "loads"), by(inner))),
        armed=True)
    add(R, "gadget_after_valid_array",
        bare(EMPTY_DICT + MARK + u("a") + valid_array + u("b") + exec_py + SETITEMS), armed=True)
    add(R, "gadget_as_dict_key", bare(EMPTY_DICT + os_system + i(1) + SETITEM), armed=True)
    # Only a GLOBAL, no call: resolving it would import a module with side effects.
    add(R, "global_imports_side_effect_module", bare_dict(sglobal("this", "s")))
    add(R, "frame_os_system", frame(bare_dict(os_system)), armed=True)
    add(R, "frame_exec_next_to_oob_array",
        frame(bare(EMPTY_DICT + MARK + u("a") + arr(NEXT_BUFFER, dtype_("f4"), (2,), "C")
                   + u("b") + exec_py + SETITEMS), [bytes(8)]), armed=True)
    add(R, "frame_popen_text_global", frame(bare_dict(call(tglobal("subprocess", "Popen"), argv))),
        armed=True)

    # -- inst_obj: INST / OBJ / NEWOBJ / NEWOBJ_EX --------------------------------------
    IO = "inst_obj"
    add(IO, "inst_os_system", bare_dict(MARK + u(sh) + INST + b"os\nsystem\n"), armed=True)
    add(IO, "inst_posix_system", bare_dict(MARK + u(sh) + INST + b"posix\nsystem\n"), armed=True)
    add(IO, "inst_builtins_exec", bare_dict(MARK + u(py) + INST + b"builtins\nexec\n"), armed=True)
    add(IO, "inst_subprocess_check_call",
        bare_dict(MARK + argv + INST + b"subprocess\ncheck_call\n"), armed=True)
    add(IO, "obj_os_system", bare_dict(MARK + sglobal("os", "system") + u(sh) + OBJ), armed=True)
    add(IO, "obj_eval_text_global", bare_dict(MARK + tglobal("builtins", "eval") + u(py) + OBJ),
        armed=True)
    add(IO, "inst_numpy_dtype_object",
        bare_dict(MARK + u("O8") + FALSE + TRUE + INST + b"numpy\ndtype\n"))
    add(IO, "obj_allowed_dtype_object",
        bare_dict(MARK + DTYPE + u("O8") + FALSE + TRUE + OBJ))
    add(IO, "obj_allowed_frombuffer_str_buffer",
        bare_dict(MARK + FROMBUFFER + u("\0" * 8) + dtype_("f4") + shape_ops((2,)) + u("C") + OBJ))
    add(IO, "newobj_subprocess_popen",
        bare_dict(sglobal("subprocess", "Popen") + tup(argv) + NEWOBJ))
    add(IO, "newobj_ex_subprocess_popen",
        bare_dict(sglobal("subprocess", "Popen") + tup(argv) + dct() + NEWOBJ_EX))
    add(IO, "newobj_ex_os_system_kwargs",
        bare_dict(sglobal("os", "system") + EMPTY_TUPLE + dct((u("command"), u(sh))) + NEWOBJ_EX))
    add(IO, "newobj_builtins_object",
        bare_dict(sglobal("builtins", "object") + EMPTY_TUPLE + NEWOBJ))
    add(IO, "newobj_numpy_ndarray",
        bare_dict(sglobal("numpy", "ndarray") + tup(tup(i(2))) + NEWOBJ))
    add(IO, "newobj_allowed_dtype_factory",
        bare_dict(DTYPE + tup(u("f4"), FALSE, TRUE) + NEWOBJ))
    add(IO, "newobj_ex_allowed_frombuffer",
        bare_dict(FROMBUFFER + tup(ZEROS8, dtype_("f4"), shape_ops((2,)), u("C")) + dct()
                  + NEWOBJ_EX))

    # -- ext: copyreg extension codes -----------------------------------------------------
    E = "ext"
    add(E, "ext1_unregistered_code_1", bare_dict(EXT1 + b"\x01"))
    add(E, "ext1_unregistered_code_1_called", bare_dict(call(EXT1 + b"\x01", u(sh))))
    add(E, "ext2_unregistered", bare_dict(call(EXT2 + struct.pack("<H", 0x1234), u(py))))
    add(E, "ext4_unregistered", bare_dict(call(EXT4 + struct.pack("<i", 0x12345678), argv)))
    add(E, "ext4_max_code", bare_dict(EXT4 + struct.pack("<i", 2**31 - 1)))
    add(E, "ext1_code_0", bare_dict(EXT1 + b"\x00"))
    add(E, "ext4_negative_code", bare_dict(EXT4 + struct.pack("<i", -1)))
    add(E, "ext1_truncated", PROTO5 + EXT1)
    for opname, code, module, name in EXT_REGISTRATIONS:
        add(E, f"{opname}_code_{code:#x}_{module}_{name}_called",
            ext_call_body(code, module, name, canary))

    # -- dotted: names through allowed-looking modules -----------------------------------
    D = "dotted"
    add(D, "numpy___builtins__.exec", bare_dict(call(sglobal("numpy", "__builtins__.exec"), u(py))))
    add(D, "numpy___builtins__.get_exec",
        bare_dict(call(call(sglobal("numpy", "__builtins__.get"), u("exec")), u(py))), armed=True)
    add(D, "numpy___builtins__.get_exec_text_global",
        bare_dict(call(call(tglobal("numpy", "__builtins__.get"), u("exec")), u(py))), armed=True)
    add(D, "numpy_dtype.__init__.__globals__",
        bare_dict(call(sglobal("numpy", "dtype.__init__.__globals__"), u("os"))))
    add(D, "numeric__frombuffer.__globals__",
        bare_dict(call(sglobal("numpy._core.numeric", "_frombuffer.__globals__"), u("os"))))
    add(D, "numeric__frombuffer.__builtins__.get_exec",
        bare_dict(call(call(sglobal("numpy._core.numeric", "_frombuffer.__builtins__.get"),
                            u("exec")), u(py))), armed=True)
    add(D, "numpy1_numeric_os.system",
        bare_dict(call(sglobal("numpy.core.numeric", "os.system"), u(sh))))
    add(D, "numpy_testing_utils_os.system",
        bare_dict(call(sglobal("numpy", "testing._private.utils.os.system"), u(sh))), armed=True)
    add(D, "numpy_load", bare_dict(call(sglobal("numpy", "load"), u(canary), TRUE)))
    add(D, "numpy_ndarray", bare_dict(call(sglobal("numpy", "ndarray"), tup(i(2)))))
    add(D, "multiarray__reconstruct",
        bare_dict(call(sglobal("numpy._core.multiarray", "_reconstruct"),
                       sglobal("numpy", "ndarray"), tup(i(0)), by(b"b"))))
    add(D, "multiarray_scalar",
        bare_dict(call(sglobal("numpy._core.multiarray", "scalar"), dtype_("f8"), by(bytes(8)))))
    add(D, "numpy1_multiarray__reconstruct",
        bare_dict(call(sglobal("numpy.core.multiarray", "_reconstruct"),
                       sglobal("numpy", "ndarray"), tup(i(0)), by(b"b"))))
    add(D, "copyreg__reconstructor",
        bare_dict(call(sglobal("copyreg", "_reconstructor"), sglobal("builtins", "object"),
                       sglobal("builtins", "object"), NONE)))
    add(D, "numpy_dotted_path_to_frombuffer",
        bare_dict(arr(ZEROS8, fb=sglobal("numpy", "_core.numeric._frombuffer"))))
    add(D, "numpy_core_dotted_path_to_frombuffer",
        bare_dict(arr(ZEROS8, fb=sglobal("numpy._core", "numeric._frombuffer"))))
    add(D, "frombuffer.__call__", bare_dict(arr(ZEROS8, fb=sglobal("numpy._core.numeric",
                                                                    "_frombuffer.__call__"))))
    add(D, "numpy_dtype.__class__", bare_dict(call(sglobal("numpy", "dtype.__class__"), u("f4"))))
    add(D, "module_trailing_space", bare_dict(arr(ZEROS8, fb=sglobal("numpy._core.numeric ",
                                                                      "_frombuffer"))))
    add(D, "name_trailing_nul", bare_dict(call(sglobal("numpy", "dtype\0"), u("f4"), FALSE, TRUE)))
    add(D, "module_case", bare_dict(call(sglobal("NumPy", "dtype"), u("f4"), FALSE, TRUE)))
    add(D, "stack_global_non_str_module", bare_dict(i(1) + u("dtype") + STACK_GLOBAL))
    add(D, "text_global_dotted_module",
        bare_dict(call(tglobal("numpy._core.numeric.os", "system"), u(sh))))

    # -- object_array: object dtype, _reconstruct, scalar --------------------------------
    OA = "object_array"
    add(OA, "dtype_O8_inband", bare_dict(arr(ZEROS8, dtype_("O8", "|"), (1,), "C")))
    add(OA, "dtype_O_inband", bare_dict(arr(ZEROS8, dtype_("O", "|"), (1,), "C")))
    add(OA, "dtype_O8_fake_pointer", bare_dict(arr(by(b"\x41" * 8), dtype_("O8", "|"), (1,), "C")))
    add(OA, "dtype_O8_frame_oob",
        frame(bare_dict(arr(NEXT_BUFFER, dtype_("O8", "|"), (1,), "C")), [b"\x41" * 8]))
    add(OA, "dtype_name_bytes_O8", bare_dict(arr(ZEROS8, dtype_(args=(by(b"O8"), FALSE, TRUE)),
                                                 (1,), "C")))
    add(OA, "dtype_f8_with_object_flags_state",
        bare_dict(arr(ZEROS8, dtype_("f8", state=tup(i(3), u("|"), NONE, NONE, NONE, i(8),
                                                       i(8), i(0x3F))), (1,), "C")))
    reconstruct_state = tup(i(1), tup(i(1)), dtype_("O8", "|"), FALSE, lst(os_system))
    add(OA, "reconstruct_object_array_with_gadget",
        bare_dict(build(call(sglobal("numpy._core.multiarray", "_reconstruct"),
                             sglobal("numpy", "ndarray"), tup(i(0)), by(b"b")),
                        reconstruct_state)), armed=True)
    add(OA, "numpy1_reconstruct_object_array",
        bare_dict(build(call(sglobal("numpy.core.multiarray", "_reconstruct"),
                             sglobal("numpy", "ndarray"), tup(i(0)), by(b"b")),
                        tup(i(1), tup(i(1)), dtype_("O8", "|"), FALSE, by(b"\x41" * 8)))))
    add(OA, "scalar_object_dtype_numpy_28316",
        bare_dict(call(sglobal("numpy._core.multiarray", "scalar"), dtype_("O8", "|"),
                       by(b"\x41" * 8))))
    add(OA, "numpy1_scalar_object_dtype",
        bare_dict(call(sglobal("numpy.core.multiarray", "scalar"), dtype_("O8", "|"))))

    # -- dtype_state: non-plain dtype arguments, crafted BUILD state ---------------------
    DS = "dtype_state"

    def in_array(dtype_ops: bytes) -> bytes:
        return bare_dict(arr(ZEROS8, dtype_ops, (2,), "C"))

    for name, args in [
        ("f4_True_True", (u("f4"), TRUE, TRUE)),
        ("f4_False_False", (u("f4"), FALSE, FALSE)),
        ("f4_int_flags", (u("f4"), i(0), i(1))),
        ("f4_one_arg", (u("f4"),)),
        ("f4_four_args", (u("f4"), FALSE, TRUE, NONE)),
        ("V8", (u("V8"), FALSE, TRUE)),
        ("M8", (u("M8"), FALSE, TRUE)),
        ("m8_ns", (u("m8[ns]"), FALSE, TRUE)),
        ("U4", (u("U4"), FALSE, TRUE)),
        ("S4", (u("S4"), FALSE, TRUE)),
        ("f16_longdouble", (u("f16"), FALSE, TRUE)),
        ("byteorder_prefixed_name", (u("<f4"), FALSE, TRUE)),
        ("struct_list_spec", (lst(tup(u("a"), u("O8"))), FALSE, TRUE)),
        ("name_is_int", (i(4), FALSE, TRUE)),
    ]:
        add(DS, f"args_{name}", in_array(dtype_(args=args, state=None)))

    def st(*items: bytes) -> bytes:
        return dtype_("f4", state=tup(*items))

    none3 = (NONE, NONE, NONE)
    m1 = i(-1)
    for name, dt in [
        ("subarray", st(i(3), u("|"), tup(dtype_("f4"), tup(i(2))), NONE, NONE, m1, m1, i(0))),
        ("fields_names", st(i(3), u("|"), NONE, tup(u("a")),
                            dct((u("a"), tup(dtype_("f4"), i(0)))), i(4), i(4), i(0))),
        ("v4_metadata", st(i(4), u("<"), *none3, m1, m1, i(0), dct((u("k"), i(1))))),
        ("v4_metadata_plain_prefix", st(i(4), u("<"), *none3, m1, m1, i(0))),
        ("version_2", st(i(2), u("<"), *none3, m1, m1, i(0))),
        ("byteorder_X", st(i(3), u("X"), *none3, m1, m1, i(0))),
        ("byteorder_bytes", st(i(3), by(b"<"), *none3, m1, m1, i(0))),
        ("byteorder_double", st(i(3), u("<<"), *none3, m1, m1, i(0))),
        ("len_7", st(i(3), u("<"), *none3, m1, m1)),
        ("len_9", st(i(3), u("<"), *none3, m1, m1, i(0), NONE)),
        ("elsize_negative", st(i(3), u("<"), *none3, i(-5), m1, i(0))),
        ("elsize_huge", st(i(3), u("<"), *none3, i(2**40), i(2**40), i(0))),
        ("flags_nonzero", st(i(3), u("<"), *none3, m1, m1, i(1))),
        ("state_list", dtype_("f4", state=lst(i(3), u("<"), *none3, m1, m1, i(0)))),
        ("state_dict", dtype_("f4", state=dct((u("byteorder"), u("<"))))),
        ("state_none", dtype_("f4", state=NONE)),
        ("state_and_slotstate", dtype_("f4", state=tup(plain_state(), dct((u("name"), u("O8")))))),
        ("build_twice", dtype_("f4", "<") + plain_state(">") + BUILD),
    ]:
        add(DS, f"state_{name}", in_array(dt))

    # -- build: BUILD on the allow-listed objects and on containers ---------------------
    B = "build"
    add(B, "on_frombuffer_dict_state",
        bare_dict(build(FROMBUFFER, dct((u("__call__"), u(py))))))
    add(B, "on_frombuffer_slot_state",
        bare_dict(build(FROMBUFFER, tup(NONE, dct((u("oob"), dct()), (u("used"), lst()))))))
    add(B, "on_frombuffer___defaults__",
        bare_dict(arr(ZEROS8, fb=build(FROMBUFFER,
                                       tup(NONE, dct((u("__defaults__"), tup(u("x")))))))))
    add(B, "on_frombuffer___kwdefaults__",
        bare_dict(build(FROMBUFFER, dct((u("__kwdefaults__"), dct((u("like"), NONE)))))))
    add(B, "on_frombuffer_state_none", bare_dict(build(FROMBUFFER, NONE)))
    add(B, "on_dtype_factory___class__",
        bare_dict(build(DTYPE, tup(NONE, dct((u("__class__"), FROMBUFFER))))))
    add(B, "on_dtype_factory_dict_state", bare_dict(build(DTYPE, dct((u("name"), u("O8"))))))
    add(B, "on_decoded_array", bare_dict(build(valid_array, dct((u("array"), lst())))))
    add(B, "on_decoded_array_slot_state",
        bare_dict(build(valid_array, tup(NONE, dct((u("array"), by(b"x")))))))
    add(B, "on_dict_dict_state", bare_dict(build(EMPTY_DICT, dct((u("a"), i(1))))))
    add(B, "on_dict_slot_state___class__",
        bare_dict(build(EMPTY_DICT, tup(NONE, dct((u("__class__"), FROMBUFFER))))))
    add(B, "on_list_slot_state___defaults__",
        bare_dict(build(EMPTY_LIST, tup(NONE, dct((u("__defaults__"), tup()))))))
    add(B, "on_top_level_dict", bare(build(EMPTY_DICT, tup(NONE, dct((u("__class__"), DTYPE))))))
    add(B, "on_str", bare_dict(build(u("s"), dct((u("a"), i(1))))))
    add(B, "on_none", bare_dict(build(NONE, dct((u("a"), i(1))))))
    add(B, "on_oob_memoryview",
        frame(bare_dict(build(NEXT_BUFFER, tup(NONE, dct((u("obj"), by(b"x")))))), [bytes(8)]))
    add(B, "empty_stack", PROTO5 + BUILD + STOP)

    # -- frombuffer_args: the arguments of the allow-listed _frombuffer ------------------
    FA = "frombuffer_args"
    dt = dtype_("f4")
    add(FA, "args_0", bare_dict(FROMBUFFER + EMPTY_TUPLE + REDUCE))
    add(FA, "args_3", bare_dict(call(FROMBUFFER, ZEROS8, dt, shape_ops((2,)))))
    add(FA, "args_6", bare_dict(arr(ZEROS8, dt, (2,), "K", tup(i(0)), NONE)))
    add(FA, "shape_claims_more_than_buffer", bare_dict(arr(ZEROS8, dt, (3,), "C")))
    add(FA, "shape_claims_1TiB", bare_dict(arr(ZEROS8, dt, (2**20, 2**20), "C")))
    add(FA, "negative_dim", bare_dict(arr(ZEROS8, dt, (-2,), "C")))
    add(FA, "negative_dims_product_matches", bare_dict(arr(ZEROS8, dt, (-1, -2), "C")))
    add(FA, "bool_dims", bare_dict(arr(by(bytes(4)), dt, tup(TRUE, TRUE), "C")))
    add(FA, "float_dim", bare_dict(arr(ZEROS8, dt, tup(b"G" + struct.pack(">d", 2.0)), "C")))
    add(FA, "shape_list", bare_dict(arr(ZEROS8, dt, lst(i(2)), "C")))
    add(FA, "shape_int", bare_dict(arr(ZEROS8, dt, i(2), "C")))
    add(FA, "shape_str", bare_dict(arr(ZEROS8, dt, u("2"), "C")))
    add(FA, "ndim_33", bare_dict(arr(by(bytes(4)), dt, (1,) * 33, "C")))
    add(FA, "ndim_65", bare_dict(arr(by(bytes(4)), dt, (1,) * 65, "C")))
    add(FA, "dim_2_64_with_zero", bare_dict(arr(by(b""), dt, (2**64, 0), "C")))
    add(FA, "dim_2_63_mismatch", bare_dict(arr(ZEROS8, dt, (2**63,), "C")))
    add(FA, "bigint_dims_memo_small", bigint_shape_body(1000))
    add(FA, "order_X", bare_dict(arr(ZEROS8, dt, (2,), "X")))
    add(FA, "order_bytes", bare_dict(arr(ZEROS8, dt, (2,), by(b"C"))))
    add(FA, "order_A", bare_dict(arr(ZEROS8, dt, (2,), "A")))
    add(FA, "order_K_repeated_axis", bare_dict(arr(ZEROS8, dt, (1, 2), "K", tup(i(0), i(0)))))
    add(FA, "order_K_axis_out_of_range", bare_dict(arr(ZEROS8, dt, (1, 2), "K", tup(i(1), i(2)))))
    add(FA, "order_K_bool_axes", bare_dict(arr(ZEROS8, dt, (1, 2), "K", tup(FALSE, TRUE))))
    add(FA, "order_K_negative_axes", bare_dict(arr(ZEROS8, dt, (1, 2), "K", tup(i(-1), i(0)))))
    add(FA, "order_K_list_axes", bare_dict(arr(ZEROS8, dt, (1, 2), "K", lst(i(1), i(0)))))
    add(FA, "order_K_without_axes", bare_dict(arr(ZEROS8, dt, (1, 2), "K")))
    add(FA, "axes_without_order_K", bare_dict(arr(ZEROS8, dt, (1, 2), "C", tup(i(1), i(0)))))
    add(FA, "dtype_plain_string", bare_dict(arr(ZEROS8, u("f4"), (2,), "C")))
    add(FA, "dtype_uncalled_factory", bare_dict(arr(ZEROS8, DTYPE, (2,), "C")))
    add(FA, "dtype_none", bare_dict(arr(ZEROS8, NONE, (2,), "C")))
    add(FA, "dtype_is_array", bare_dict(arr(ZEROS8, valid_array, (2,), "C")))
    add(FA, "buffer_str", bare_dict(arr(u("\0" * 8), dt, (2,), "C")))
    add(FA, "buffer_int", bare_dict(arr(i(0), dt, (2,), "C")))
    add(FA, "buffer_list", bare_dict(arr(lst(i(0), i(0)), dt, (2,), "C")))
    add(FA, "buffer_none", bare_dict(arr(NONE, dt, (2,), "C")))
    add(FA, "buffer_is_frombuffer", bare_dict(arr(FROMBUFFER, dt, (2,), "C")))
    add(FA, "buffer_is_decoded_array", bare_dict(arr(valid_array, dt, (2,), "C")))
    add(FA, "numpy1_spelling_order_X", bare_dict(arr(ZEROS8, dt, (2,), "X", fb=FROMBUFFER_NP1)))

    # -- lying_length: frame header, lengths, padding, trailing bytes -------------------
    L = "lying_length"
    ok_pickle = bare_dict(arr(NEXT_BUFFER, dt, (2,), "C"))
    buf8 = [bytes(8)]
    add(L, "pickle_len_exceeds_body", frame(bare_dict(i(1)), pickle_len=len(bare_dict(i(1))) + 1))
    add(L, "buffer_len_exceeds_body", frame(ok_pickle, buf8, lengths=[9]))
    add(L, "buffer_claims_8GiB", frame(ok_pickle, buf8, lengths=[2**33]))
    add(L, "buffer_claims_2_64_minus_1", frame(ok_pickle, buf8, lengths=[2**64 - 1]))
    add(L, "pickle_claims_2_64_minus_1", frame(ok_pickle, buf8, pickle_len=2**64 - 1))
    add(L, "buffer_lengths_sum_overflows_u64",
        frame(ok_pickle, buf8 * 2, lengths=[2**63, 2**63]))
    add(L, "n_4097", frame(ok_pickle, buf8, n=4097, lengths=[8] * 4097))
    add(L, "n_2_32_minus_1", frame(ok_pickle, buf8, n=2**32 - 1))
    add(L, "n_4096_table_missing", frame(ok_pickle, buf8, n=4096))
    add(L, "header_truncated_19_bytes", frame(b"")[:19])
    add(L, "header_truncated_8_bytes", b"PK5F\x01\0\0\0")
    add(L, "magic_only", b"PK5F")
    add(L, "reserved_not_zero", frame(ok_pickle, buf8, reserved=b"\0\1\0"))
    add(L, "version_2", frame(ok_pickle, buf8, version=2))
    add(L, "version_0", frame(ok_pickle, buf8, version=0))
    add(L, "header_padding_not_zero", frame(ok_pickle, buf8, header_pad_fill=0x41))
    add(L, "buffer_padding_not_zero", frame(ok_pickle, buf8, buffer_pad_fill=0x41))
    add(L, "trailing_after_last_buffer", frame(ok_pickle, buf8, trailing=b"X"))
    add(L, "trailing_padding_after_last_buffer", frame(ok_pickle, buf8, trailing=bytes(56)))
    add(L, "trailing_after_pickle_no_buffers", frame(bare_dict(i(1)), trailing=b"\0"))
    add(L, "trailing_after_stop_in_frame_pickle", frame(bare_dict(i(1)) + b"JUNK"))
    add(L, "trailing_after_stop_bare", bare_dict(i(1)) + b"JUNK")
    add(L, "trailing_after_stop_inside_FRAME_opcode",
        PROTO5 + FRAME + struct.pack("<Q", len(top(i(1))) + 1 + 4) + top(i(1)) + STOP + b"JUNK")
    add(L, "FRAME_opcode_longer_than_pickle",
        PROTO5 + FRAME + struct.pack("<Q", 2**40) + top(i(1)) + STOP)
    add(L, "buffer_never_used", frame(bare_dict(i(1)), buf8))
    add(L, "next_buffer_twice_with_n_1",
        frame(bare(EMPTY_DICT + MARK + u("a") + arr(NEXT_BUFFER, dt, (2,), "C")
                   + u("b") + arr(NEXT_BUFFER, dt, (2,), "C") + SETITEMS), buf8))
    add(L, "one_buffer_two_arrays_via_memo",
        frame(bare(EMPTY_DICT + MARK + u("a") + arr(NEXT_BUFFER + MEMOIZE, dt, (2,), "C")
                   + u("b") + arr(binget(0), dt, (2,), "C") + SETITEMS), buf8))
    add(L, "next_buffer_in_bare_pickle", bare_dict(arr(NEXT_BUFFER, dt, (2,), "C")))
    add(L, "empty_body", b"")
    add(L, "random_garbage", random.Random(1234).randbytes(4096))
    add(L, "random_garbage_after_proto5", PROTO5 + random.Random(99).randbytes(4096))
    add(L, "bare_protocol_4", b"\x80\x04" + top(i(1)) + STOP)
    add(L, "bare_protocol_2", b"\x80\x02" + top(i(1)) + STOP)
    add(L, "bare_protocol_0", b"(dp0\nVx\np1\nI1\ns.")
    add(L, "frame_protocol_4_pickle", frame(b"\x80\x04" + top(i(1)) + STOP))
    add(L, "frame_protocol_0_pickle", frame(b"(dp0\nVx\np1\nI1\ns."))
    add(L, "truncated_pickle", bare_dict(i(1))[:-1])
    add(L, "proto_99_after_proto_5", bare(b"\x80\x63" + top(i(1))))

    # -- nesting: depth, memo sharing, odd containers -------------------------------------
    N = "nesting"
    deep = 10_000
    add(N, "nested_lists_10000_in_dict", bare_dict(EMPTY_LIST * deep + APPEND * (deep - 1)))
    add(N, "nested_lists_10000_top_level", bare(EMPTY_LIST * deep + APPEND * (deep - 1)))
    add(N, "nested_tuples_200000", bare_dict(NONE + TUPLE1 * 200_000))
    add(N, "nested_dicts_10000",
        bare(EMPTY_DICT + (u("k") + EMPTY_DICT) * deep + SETITEM * deep))
    # level k is a list holding level k-1 twice (memo slot k): 2**levels visits if walked
    # naively. Each level is memoised and popped; the last one is fetched back.
    def laughs(levels: int) -> bytes:
        return (EMPTY_LIST + MEMOIZE + POP
                + b"".join(MARK + binget(k) * 2 + LIST + MEMOIZE + POP for k in range(levels))
                + binget(levels))

    add(N, "memo_billion_laughs_60_levels", bare_dict(laughs(60)))
    add(N, "memo_billion_laughs_30_levels_within_depth", bare_dict(laughs(30)))
    laughs_dicts = (EMPTY_DICT + MEMOIZE + POP
                    + b"".join(EMPTY_DICT + MARK + u("a") + binget(k) + u("b") + binget(k)
                               + SETITEMS + MEMOIZE + POP for k in range(30))
                    + binget(30))
    add(N, "memo_billion_laughs_dicts", bare_dict(laughs_dicts))
    wide = 20_000
    add(N, "memo_wide_fanout_4e8_visits",
        bare_dict(MARK + (MARK + i(0) * wide + LIST + MEMOIZE) + binget(0) * (wide - 1) + LIST))
    add(N, "cyclic_list", bare_dict(EMPTY_LIST + MEMOIZE + binget(0) + APPEND))
    add(N, "cyclic_dict", bare(EMPTY_DICT + MEMOIZE + u("self") + binget(0) + SETITEM))
    add(N, "dict_int_key", bare(EMPTY_DICT + i(1) + i(2) + SETITEM))
    add(N, "dict_tuple_key", bare(EMPTY_DICT + tup(u("a"), i(1)) + i(2) + SETITEM))
    add(N, "dict_none_key", bare(EMPTY_DICT + NONE + i(2) + SETITEM))
    add(N, "dict_bytes_key", bare(EMPTY_DICT + by(b"k") + i(2) + SETITEM))
    add(N, "nested_dict_int_key", bare_dict(dct((i(1), i(2)))))
    add(N, "dict_frozenset_key", bare(EMPTY_DICT + MARK + i(1) + FROZENSET + i(2) + SETITEM))
    add(N, "set_value", bare_dict(EMPTY_SET + MARK + i(1) + i(2) + ADDITEMS))
    add(N, "frozenset_value", bare_dict(MARK + i(1) + u("a") + FROZENSET))
    add(N, "bytearray_value", bare_dict(bytearray8(b"abc")))
    add(N, "persid", bare_dict(PERSID + b"os.system\n"))
    add(N, "binpersid", bare_dict(u(sh) + BINPERSID))
    add(N, "top_level_list", bare(lst(i(1))))
    add(N, "top_level_tuple", bare(tup(i(1))))
    add(N, "top_level_none", bare(NONE))
    add(N, "top_level_array", bare(valid_array))
    add(N, "colliding_int_keys_2000", colliding_keys_body(2000))
    add(N, "colliding_int_set_2000",
        bare_dict(EMPTY_SET + MARK + b"".join(long_((k + 1) * (2**61 - 1)) for k in range(2000))
                  + ADDITEMS))
    add(N, "sparse_memo_index_2_20", bare(lst(i(1)) + b"r" + struct.pack("<I", 2**20)))
    add(N, "long4_claims_2GiB", bare_dict(b"\x8b" + struct.pack("<i", 2**31 - 1) + b"\x01" * 64))
    add(N, "binbytes8_claims_2_62", bare_dict(b"\x8e" + struct.pack("<Q", 2**62) + b"x" * 64))
    add(N, "bytearray8_claims_16GiB", bare_dict(b"\x96" + struct.pack("<Q", 2**34) + b"x" * 64))
    add(N, "text_int_5000_digits", bare_dict(b"I" + b"9" * 5000 + b"\n"))

    return out
