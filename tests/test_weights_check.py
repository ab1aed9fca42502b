"""Weights checked before any model code runs (policy_server/model/weights_check.py)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from policy_server.errors import InvalidModel
from policy_server.model.weights_check import check_directory, check_file, check_push, read_header
from tests.support.tiny_model import tiny_weights


def raw_file(path, header, data: bytes = b"") -> str:
    text = header if isinstance(header, str) else json.dumps(header)
    path.write_bytes(struct.pack("<Q", len(text.encode())) + text.encode() + data)
    return str(path)


def test_a_valid_file_reads_back_its_entries(tmp_path):
    save_file(tiny_weights(1.0), str(tmp_path / "w.safetensors"))
    entries, start = read_header(str(tmp_path / "w.safetensors"))
    assert {k: (e.dtype, e.shape) for k, e in entries.items()} == {
        "linear.weight": ("F32", (70, 7)), "linear.bias": ("F32", (70,))}
    assert start > 8
    assert check_file(str(tmp_path / "w.safetensors")) == entries


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_a_non_finite_weight_in_a_file_names_its_key(tmp_path, value, dtype):
    weights = {k: v.astype(dtype) for k, v in tiny_weights(1.0).items()}
    weights["linear.bias"][3] = value
    save_file(weights, str(tmp_path / "w.safetensors"))
    with pytest.raises(InvalidModel, match="w.safetensors: weight 'linear.bias' is not finite"):
        check_file(str(tmp_path / "w.safetensors"))


@pytest.mark.parametrize("dtype, bits, bad", [
    ("BF16", "<u2", 0x7F80),  # +inf
    ("BF16", "<u2", 0xFFC0),  # NaN
    ("F8_E5M2", "u1", 0x7C),  # +inf
    ("F8_E4M3", "u1", 0x7F),  # NaN
])
def test_non_finite_values_of_dtypes_numpy_lacks(tmp_path, dtype, bits, bad):
    values = np.zeros(4, bits)
    size = values.nbytes
    header = {"t": {"dtype": dtype, "shape": [4], "data_offsets": [0, size]}}
    check_file(raw_file(tmp_path / "ok.safetensors", header, values.tobytes()))
    values[2] = bad
    with pytest.raises(InvalidModel, match="'t' is not finite"):
        check_file(raw_file(tmp_path / "bad.safetensors", header, values.tobytes()))


def test_a_directory_is_checked_file_by_file(tmp_path):
    save_file(tiny_weights(1.0), str(tmp_path / "model.safetensors"))
    (tmp_path / "sub").mkdir()
    bad = tiny_weights(1.0)
    bad["linear.weight"][0, 0] = np.inf
    save_file(bad, str(tmp_path / "sub" / "extra.safetensors"))
    with pytest.raises(InvalidModel, match="sub/extra.safetensors: weight 'linear.weight'"):
        check_directory(str(tmp_path))


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
BAD_HEADERS = {
    "not JSON": ("{nope", "not JSON"),
    "not an object": ("[1]", "not a JSON object"),
    "duplicate keys": ('{"a": %s, "a": %s}' % (json.dumps(F32_4), json.dumps(F32_4)), "repeats the key 'a'"),
    "unknown dtype": ({"a": {**F32_4, "dtype": "F128"}}, "unknown dtype"),
    "missing field": ({"a": {"dtype": "F32", "shape": [4]}}, "needs exactly"),
    "negative dim": ({"a": {**F32_4, "shape": [-4]}}, "shape must be"),
    "bool dim": ({"a": {**F32_4, "shape": [True]}}, "shape must be"),
    "offsets past the end": ({"a": {**F32_4, "data_offsets": [0, 1 << 40]}}, "outside the file"),
    "reversed offsets": ({"a": {**F32_4, "data_offsets": [16, 0]}}, "outside the file"),
    "span mismatch": ({"a": {**F32_4, "shape": [5]}}, r"span 16 bytes, F32 \[5\] needs 20"),
    "overlap": ({"a": F32_4, "b": {**F32_4, "data_offsets": [8, 24]}}, "overlaps"),
    "metadata not strings": ({"__metadata__": {"x": 1}}, "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_headers_are_refused_with_a_reason(tmp_path, case):
    header, fragment = BAD_HEADERS[case]
    path = raw_file(tmp_path / "w.safetensors", header, bytes(32))
    with pytest.raises(InvalidModel, match=fragment):
        check_file(path)


def test_truncated_files_and_lying_lengths(tmp_path):
    (tmp_path / "short").write_bytes(b"\x01\x02")
    with pytest.raises(InvalidModel, match="truncated"):
        read_header(str(tmp_path / "short"))
    (tmp_path / "huge").write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    with pytest.raises(InvalidModel, match="exceeds the file"):
        read_header(str(tmp_path / "huge"))


def test_a_push_is_checked_key_dtype_shape_and_finite(tmp_path):
    save_file(tiny_weights(1.0), str(tmp_path / "w.safetensors"))
    expected, _ = read_header(str(tmp_path / "w.safetensors"))
    assert set(check_push(tiny_weights(2.0), expected)) == {"linear.weight", "linear.bias"}
    bad = tiny_weights(2.0)
    bad["linear.bias"][5] = -np.inf  # the hard case: finite outputs behind a ReLU, still refused
    with pytest.raises(InvalidModel, match="weight 'linear.bias' is not finite"):
        check_push(bad, expected)
    swapped = tiny_weights(2.0)
    swapped["linear.bias"] = swapped["linear.bias"].astype(">f4")  # byte order is free
    assert check_push(swapped, expected)["linear.bias"].dtype == np.float32
    with pytest.raises(InvalidModel, match="dict of name -> array"):
        check_push({"linear.bias": [1.0]}, expected)
