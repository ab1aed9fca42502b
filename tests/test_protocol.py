"""Wire format v1: round trips, frame layout, zero-copy decoding, hand-written pickles, refusals."""

from __future__ import annotations

import math
import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import binary_protocol
from binary_protocol import ALIGNMENT, MAGIC, ProtocolError, binary_to_dict, dict_to_binary

NUMERIC_DTYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
]
SHAPES = [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4, 5)]


def roundtrip(data: dict) -> dict:
    return binary_to_dict(dict_to_binary(data))


def assert_same_array(got: np.ndarray, want: np.ndarray) -> None:
    assert type(got) is np.ndarray
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_public_surface():
    assert set(binary_protocol.__all__) == {
        "ProtocolError", "dict_to_binary", "binary_to_dict", "MAGIC", "VERSION", "ALIGNMENT",
    }
    assert issubclass(ProtocolError, ValueError)


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_roundtrip_every_numeric_dtype_and_shape(dtype, shape):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    assert_same_array(roundtrip({"x": array})["x"], array)


@pytest.mark.parametrize("dtype", [">f4", ">i2", ">u8", ">c16", "<f8"])
def test_roundtrip_keeps_byte_order(dtype):
    array = np.arange(12, dtype=dtype).reshape(3, 4)
    got = roundtrip({"x": array})["x"]
    assert got.dtype.str == np.dtype(dtype).str
    assert_same_array(got, array)


def test_roundtrip_non_contiguous_and_fortran_order():
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    data = {"strided": base[::2, ::3], "fortran": np.asfortranarray(base), "transposed": base.T}
    got = roundtrip(data)
    for key, want in data.items():
        assert_same_array(got[key], want)


def test_roundtrip_nan_and_inf():
    array = np.array([np.nan, np.inf, -np.inf, -0.0, 1.5], dtype=np.float32)
    got = roundtrip({"x": array, "f": float("nan"), "g": float("-inf")})
    np.testing.assert_array_equal(got["x"], array)  # nan == nan for assert_array_equal
    assert np.signbit(got["x"][3])
    assert math.isnan(got["f"]) and got["g"] == float("-inf")


def test_roundtrip_nested_containers_and_python_scalars():
    data = {
        "obs": {"state": np.ones(3, np.float32), "images": [np.zeros((2, 2), np.uint8)] * 2},
        "meta": ("episode", 7, 2**80, -1.25, True, None, b"\x00bytes", ["nested", ("tuple",)]),
        "empty": {},
    }
    got = roundtrip(data)
    assert got["meta"] == data["meta"]
    assert got["empty"] == {}
    assert_same_array(got["obs"]["state"], data["obs"]["state"])
    assert len(got["obs"]["images"]) == 2
    assert isinstance(got["meta"], tuple) and isinstance(got["meta"][7], list)


def test_numpy_scalars_become_zero_d_arrays():
    got = roundtrip({"a": np.float32(1.5), "b": np.int64(-3), "c": np.bool_(True), "d": np.float64(2.0)})
    assert_same_array(got["a"], np.array(1.5, np.float32))
    assert_same_array(got["b"], np.array(-3, np.int64))
    assert_same_array(got["c"], np.array(True))
    assert_same_array(got["d"], np.array(2.0))


def test_frame_layout_is_aligned_and_exact():
    image = np.arange(1000, dtype=np.uint8)
    state = np.arange(6, dtype=np.float32)
    body = dict_to_binary({"image": image, "state": state})
    magic, version, reserved, n, p = struct.unpack_from("<4sB3sIQ", body)
    assert (magic, version, reserved, n) == (MAGIC, 1, b"\0\0\0", 2)
    lengths = struct.unpack_from("<2Q", body, 20)
    assert sorted(lengths) == sorted([image.nbytes, state.nbytes])
    pickle_start = 20 + 16 + (-(20 + 16) % ALIGNMENT)
    assert pickle_start % ALIGNMENT == 0 and body[pickle_start:pickle_start + 2] == b"\x80\x05"
    offset = pickle_start + p
    for length in lengths:
        offset += -offset % ALIGNMENT
        assert offset % ALIGNMENT == 0
        offset += length
    assert offset == len(body)  # no trailing padding


def test_decode_is_zero_copy_and_read_only():
    image = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    body = dict_to_binary({"image": image, "state": np.zeros(6, np.float32)})
    decoded = binary_to_dict(body)
    body_view = np.frombuffer(body, dtype=np.uint8)
    start = body_view.__array_interface__["data"][0]
    for key in ("image", "state"):
        address = decoded[key].__array_interface__["data"][0]
        assert start <= address < start + len(body), key
        assert (address - start) % ALIGNMENT == 0
        assert np.shares_memory(decoded[key], body_view)
        assert not decoded[key].flags.writeable
    np.testing.assert_array_equal(decoded["image"], image)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decode_accepts_any_bytes_like(kind):
    body = dict_to_binary({"x": np.arange(5)})
    assert_same_array(binary_to_dict(kind(body))["x"], np.arange(5))


def test_read_only_arrays_reencode():
    decoded = roundtrip({"x": np.arange(10, dtype=np.int16)})
    assert not decoded["x"].flags.writeable
    assert_same_array(roundtrip(decoded)["x"], np.arange(10, dtype=np.int16))


def test_bare_protocol5_pickle_is_accepted_and_zero_copy():
    data = {"x": np.arange(4, dtype=np.float32), "y": [1, "two"], "z": np.arange(3.0)}
    body = pickle.dumps(data, protocol=5)  # writable contiguous arrays travel as BYTEARRAY8
    got = binary_to_dict(body)
    assert_same_array(got["x"], data["x"])
    assert_same_array(got["z"], data["z"])
    assert got["y"] == [1, "two"]
    assert np.shares_memory(got["x"], np.frombuffer(body, np.uint8))
    assert not got["x"].flags.writeable


# Hand-written pickles: what a numpy-1 or numpy-2 peer (or another language) sends.

def _str(s: str) -> bytes:
    raw = s.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)  # BININT


def handmade_array_pickle(module: str, dtype_name: str, byteorder: str, shape, order: str,
                          inband: bytes | None) -> bytes:
    """PROTO 5, {"x": module._frombuffer(buf, numpy.dtype(name, False, True)+BUILD, shape, order)}."""
    buf = b"\x97" if inband is None else b"\x96" + struct.pack("<Q", len(inband)) + inband
    dtype = (
        _str("numpy") + _str("dtype") + b"\x93" + _str(dtype_name) + b"\x89\x88\x87R"
        + b"(" + _int(3) + _str(byteorder) + b"NNN" + _int(-1) + _int(-1) + _int(0) + b"tb"
    )
    shape_ops = b"(" + b"".join(_int(d) for d in shape) + b"t"
    return (
        b"\x80\x05}" + _str("x")
        + _str(module) + _str("_frombuffer") + b"\x93"
        + b"(" + buf + dtype + shape_ops + _str(order) + b"tR"
        + b"s."
    )


def frame(pickle_bytes: bytes, buffers: list[bytes]) -> bytes:
    header = struct.pack("<4sB3sIQ", MAGIC, 1, b"\0\0\0", len(buffers), len(pickle_bytes))
    header += b"".join(struct.pack("<Q", len(b)) for b in buffers)
    out = header + bytes(-len(header) % 64) + pickle_bytes
    for b in buffers:
        out += bytes(-len(out) % 64) + b
    return out


@pytest.mark.parametrize("module", ["numpy.core.numeric", "numpy._core.numeric"], ids=["numpy1", "numpy2"])
def test_handwritten_out_of_band_pickles_from_numpy1_and_numpy2(module):
    values = np.arange(6, dtype="<f4")
    body = frame(handmade_array_pickle(module, "f4", "<", (2, 3), "C", None), [values.tobytes()])
    assert_same_array(binary_to_dict(body)["x"], values.reshape(2, 3))


@pytest.mark.parametrize("module", ["numpy.core.numeric", "numpy._core.numeric"], ids=["numpy1", "numpy2"])
def test_handwritten_in_band_bare_pickles(module):
    values = np.arange(4, dtype=">i2")
    body = handmade_array_pickle(module, "i2", ">", (4,), "C", values.tobytes())
    got = binary_to_dict(body)["x"]
    assert got.dtype.str == ">i2"
    assert_same_array(got, values)


def test_handwritten_fortran_order():
    values = np.arange(6, dtype="<f8")
    body = frame(handmade_array_pickle("numpy._core.numeric", "f8", "<", (2, 3), "F", None), [values.tobytes()])
    assert_same_array(binary_to_dict(body)["x"], values.reshape((2, 3), order="F"))


# Encoder refusals.

class Sub(np.ndarray):
    pass


@pytest.mark.parametrize(
    "value, reason",
    [
        (np.array([1, "a"], dtype=object), "dtype"),
        (np.array(["abc"]), "dtype"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "dtype"),
        (np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]), "dtype"),
        (np.zeros(2, dtype=np.longdouble), "dtype"),
        (np.zeros(3).view(Sub), "subclass"),
        ({1, 2}, "unsupported type set"),
        (object(), "unsupported type object"),
        (bytearray(b"x"), "unsupported type bytearray"),
        ({1: "int key"}, "not a str"),
    ],
    ids=["object", "unicode", "datetime", "structured", "longdouble", "subclass", "set", "object-instance",
         "bytearray", "int-key"],
)
def test_encoder_refuses_what_the_wire_cannot_carry(value, reason):
    with pytest.raises(ProtocolError, match=reason):
        dict_to_binary({"x": value})


def test_encoder_refuses_non_dict_top_level_and_deep_nesting():
    with pytest.raises(ProtocolError, match="top level"):
        dict_to_binary([1, 2])  # type: ignore[arg-type]
    deep: list = []
    for _ in range(binary_protocol.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ProtocolError, match="nesting"):
        dict_to_binary({"x": deep})


# Property tests.

_dtypes = st.sampled_from(NUMERIC_DTYPES + [">f4", ">i8", ">c8"])
_shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
_arrays = _dtypes.flatmap(lambda d: hnp.arrays(np.dtype(d), _shapes))
_leaves = st.one_of(
    _arrays,
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
)
_trees = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=5), children, max_size=4),
    ),
    max_leaves=12,
)


def _assert_tree_equal(got, want):
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    elif isinstance(want, dict):
        assert type(got) is dict and got.keys() == want.keys()
        for key in want:
            _assert_tree_equal(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want)
        for a, b in zip(got, want, strict=False):
            _assert_tree_equal(a, b)
    else:
        assert type(got) is type(want) and got == want


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _trees, max_size=5))
def test_property_roundtrip(data):
    _assert_tree_equal(roundtrip(data), data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_property_random_bytes_never_crash(body):
    try:
        binary_to_dict(body)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_property_corrupted_frames_raise_protocol_error_or_decode(data):
    body = bytearray(dict_to_binary({"state": np.arange(6, dtype=np.float32), "tag": "x"}))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(body) - 1))
        body[index] = data.draw(st.integers(0, 255))
    try:
        decoded = binary_to_dict(bytes(body))
    except ProtocolError:
        return
    assert type(decoded) is dict
