"""Weights checked before any model code runs: safetensors headers parsed strictly, every tensor finite.

An update's weights are checked here before the model's ``policy.py`` is imported: a pushed
state dict against the current version's header (keys, dtype, shape) and for finite
values; a model directory's ``*.safetensors`` files for a well-formed header (a bounded JSON
object without duplicate keys, known dtypes, offsets inside the file that match dtype and
shape and do not overlap) and finite float tensors. Every refusal is InvalidModel (422)
naming the file and the first offending key. numpy only, no torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from policy_server.errors import InvalidModel

MAX_HEADER_BYTES = 100 * 1024 * 1024  # what the safetensors library itself accepts
MAX_DIMS = 32
SCAN_ELEMENTS = 1 << 24  # finiteness is checked this many elements at a time (bounded memory)

# safetensors dtype tag -> (item size, numpy dtype to read it as, how to find non-finite values)
_FLOAT = "float"
_DTYPES: dict[str, tuple[int, str, str | None]] = {
    "BOOL": (1, "u1", None), "U8": (1, "u1", None), "I8": (1, "i1", None),
    "I16": (2, "<i2", None), "U16": (2, "<u2", None), "I32": (4, "<i4", None), "U32": (4, "<u4", None),
    "I64": (8, "<i8", None), "U64": (8, "<u8", None),
    "F16": (2, "<f2", _FLOAT), "F32": (4, "<f4", _FLOAT), "F64": (8, "<f8", _FLOAT),
    "BF16": (2, "<u2", "bf16"), "F8_E5M2": (1, "u1", "e5m2"), "F8_E4M3": (1, "u1", "e4m3"),
}
# numpy dtype name -> safetensors dtype tag (what a push may carry)
NUMPY_TAGS = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16",
    "int32": "I32", "uint32": "U32", "float32": "F32", "int64": "I64", "uint64": "U64", "float64": "F64",
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidModel(f"header repeats the key {key[:100]!r}")
        seen[key] = value
    return seen


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: str, shown: str | None = None) -> tuple[dict[str, TensorEntry], int]:
    """``({name: TensorEntry}, data start)`` of a safetensors file, checked strictly; InvalidModel
    naming ``shown`` (default: the file name) and the problem otherwise. Loads no tensor."""
    shown = shown or os.path.basename(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise InvalidModel(f"{shown}: truncated, {len(head)} bytes where a safetensors header length is 8")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise InvalidModel(f"{shown}: header length {length} exceeds the file ({size} bytes) or the limit")
            raw = fh.read(length)
    except OSError as exc:
        raise InvalidModel(f"{shown}: cannot read: {exc.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except InvalidModel as exc:
        raise InvalidModel(f"{shown}: {exc.detail}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidModel(f"{shown}: header is not JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise InvalidModel(f"{shown}: header is not a JSON object")
    data_size = size - 8 - length
    entries: dict[str, TensorEntry] = {}
    for key, value in header.items():
        if key == "__metadata__":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise InvalidModel(f"{shown}: __metadata__ must map strings to strings")
            continue
        entries[key] = _entry(shown, key, value, data_size)
    reach, reach_key = 0, ""
    for key, entry in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.end > entry.begin:
            if entry.begin < reach:
                raise InvalidModel(f"{shown}: tensor {key[:100]!r} overlaps {reach_key[:100]!r}")
            reach, reach_key = entry.end, key
    return entries, 8 + length


def _entry(shown: str, key: str, value: Any, data_size: int) -> TensorEntry:
    where = f"{shown}: tensor {key[:100]!r}"
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise InvalidModel(f"{where} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in _DTYPES:
        raise InvalidModel(f"{where} has unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) for d in shape):
        raise InvalidModel(f"{where}: shape must be a list of at most {MAX_DIMS} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise InvalidModel(f"{where}: data_offsets must be two non-negative integers")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise InvalidModel(f"{where}: data_offsets [{begin}, {end}] lie outside the file's {data_size} data bytes")
    needed = math.prod(shape) * _DTYPES[dtype][0]
    if end - begin != needed:
        raise InvalidModel(f"{where}: data_offsets span {end - begin} bytes, {dtype} {shape} needs {needed}")
    return TensorEntry(dtype, tuple(shape), begin, end)


def _finite(values: np.ndarray, rule: str) -> bool:
    if rule == _FLOAT:
        return bool(np.isfinite(values).all())
    if rule == "bf16":  # exponent bits all ones: inf or NaN
        return not bool(((values & 0x7F80) == 0x7F80).any())
    if rule == "e5m2":
        return not bool(((values & 0x7C) == 0x7C).any())
    return not bool(((values & 0x7F) == 0x7F).any())  # e4m3fn: only NaN, no infinity


def check_file(path: str, shown: str | None = None) -> dict[str, TensorEntry]:
    """:func:`read_header`, then every float tensor finite (read in bounded chunks); InvalidModel
    naming the first non-finite tensor by name otherwise. Returns the header's entries."""
    shown = shown or os.path.basename(path)
    entries, start = read_header(path, shown)
    if not entries:
        return entries
    with open(path, "rb") as fh:
        for key in sorted(entries):
            entry = entries[key]
            size, np_dtype, rule = _DTYPES[entry.dtype]
            if rule is None or entry.end == entry.begin:
                continue
            count = (entry.end - entry.begin) // size
            values = np.memmap(fh, dtype=np_dtype, mode="r", offset=start + entry.begin, shape=(count,))
            for first in range(0, count, SCAN_ELEMENTS):
                if not _finite(values[first:first + SCAN_ELEMENTS], rule):
                    raise InvalidModel(f"{shown}: weight {key[:100]!r} is not finite (NaN or infinity)")
            del values
    return entries


def check_directory(model_dir: str) -> None:
    """Every ``*.safetensors`` file under ``model_dir`` (a staged copy: no links) checked with
    :func:`check_file`, in sorted order."""
    for root, dirs, files in os.walk(model_dir):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".safetensors"):
                path = os.path.join(root, name)
                check_file(path, os.path.relpath(path, model_dir))


def check_push(weights: Any, expected: Mapping[str, TensorEntry]) -> dict[str, np.ndarray]:
    """A pushed state dict as native-order arrays: the current model's keys exactly, each with
    its dtype and shape, every float value finite. InvalidModel naming the first offending key
    (in sorted order) otherwise."""
    if not isinstance(weights, dict) or not all(isinstance(v, np.ndarray) for v in weights.values()):
        raise InvalidModel("weights must be a dict of name -> array")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise InvalidModel(f"weights lack {len(missing)} key(s) of the current model, first {missing[0]!r}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise InvalidModel(f"weights have {len(extra)} key(s) the current model lacks, first {extra[0][:100]!r}")
    native = {}
    for key in sorted(weights):
        array, entry = weights[key], expected[key]
        array = array.astype(array.dtype.newbyteorder("="), copy=False)
        got = NUMPY_TAGS.get(array.dtype.name, array.dtype.name)
        if got != entry.dtype:
            raise InvalidModel(f"weight {key!r} is {got}, the current model has {entry.dtype}")
        if array.shape != entry.shape:
            raise InvalidModel(
                f"weight {key!r} has shape {list(array.shape)}, the current model has {list(entry.shape)}"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidModel(f"weight {key!r} is not finite (NaN or infinity)")
        native[key] = array
    return native
