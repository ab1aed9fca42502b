"""The Open Inference Protocol v2 (KServe v2 / Triton HTTP) codec: JSON tensors and Triton's
binary tensor data extension, decoded as strictly as wire format v1.

Sources: the KServe "Open Inference Protocol (V2)" REST specification (inference request and
response objects, tensor data types, ``{"error": ...}`` bodies) and Triton's "Binary Tensor
Data Extension" (``Inference-Header-Content-Length``, ``binary_data_size``, ``binary_data``,
``binary_data_output``). No pickle anywhere: the header is ``json.loads``; tensor bytes are
read with ``numpy.frombuffer`` after every declared size was checked against the body.

A request::

    {"id": "42", "parameters": {"timeout": 50000},
     "inputs": [{"name": "state", "datatype": "FP32", "shape": [1, 6], "data": [...]},
                {"name": "image", "datatype": "UINT8", "shape": [1, 480, 640, 3],
                 "parameters": {"binary_data_size": 921600}}],
     "outputs": [{"name": "action", "parameters": {"binary_data": true}}]}

followed, for binary inputs, by their raw little-endian row-major bytes in input order
(the header is the first ``Inference-Header-Content-Length`` bytes of the body).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policy_server.contract import TensorSpec
from policy_server.errors import BadRequest, InvalidInput, PayloadTooLarge

HEADER_LENGTH = "Inference-Header-Content-Length"
# OIP tensor data types and their numpy (little-endian) dtypes. BYTES and BF16 are not served.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_BY_NUMPY = {dtype.newbyteorder("="): name for name, dtype in DATATYPES.items()}
MAX_TENSORS = 64  # inputs or requested outputs in one request
MAX_RANK = 16
MAX_ID_CHARS = 256


def datatype_of(dtype: str | np.dtype) -> str:
    """The OIP datatype name of a numpy dtype (``float32`` -> ``FP32``); ValueError if none."""
    key = np.dtype(dtype).newbyteorder("=")
    if key not in _BY_NUMPY:
        raise ValueError(f"dtype {np.dtype(dtype).name} has no Open Inference Protocol datatype")
    return _BY_NUMPY[key]


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """A metadata tensor: the per-sample shape with ``-1`` for the batch dimension."""
    return {"name": spec.name, "datatype": datatype_of(spec.dtype), "shape": [-1, *spec.shape]}


def model_metadata(
    name: str, version: str, input_spec: Sequence[TensorSpec], output_spec: Sequence[TensorSpec]
) -> dict:
    """``GET /v2/models/{name}``: name, versions, platform, inputs and outputs."""
    return {
        "name": name,
        "versions": [version],
        "platform": "pytorch",
        "inputs": [tensor_metadata(s) for s in input_spec],
        "outputs": [tensor_metadata(s) for s in output_spec],
    }


@dataclass
class InferRequest:
    """A decoded inference request: ``inputs`` name -> array ``[N, *shape]`` (read-only views
    into the body for binary inputs), the requested outputs (name -> answer as binary), the
    request ``id`` to echo and the ``timeout`` parameter in microseconds (None when absent)."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool] = field(default_factory=dict)
    binary_output_default: bool = False
    request_id: str | None = None
    timeout_us: int | None = None


def parse_header_length(raw: str | None, body_length: int, max_header_bytes: int) -> int | None:
    """The ``Inference-Header-Content-Length`` header: None (all JSON) or 0 < n <= body length.

    Raises BadRequest for a malformed value or one past the body, PayloadTooLarge for a JSON
    header over ``max_header_bytes``.
    """
    if raw is None:
        return None
    try:
        length = int(raw.strip())
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} is not an integer: {raw[:20]!r}") from None
    if length <= 0:
        raise BadRequest(f"{HEADER_LENGTH} must be positive, got {length}")
    if length > max_header_bytes:
        raise PayloadTooLarge(f"JSON header of {length} bytes exceeds the limit of {max_header_bytes}")
    if length > body_length:
        raise BadRequest(f"{HEADER_LENGTH} {length} is past the end of the {body_length}-byte body")
    return length


def decode_request(body: bytes, header_length: int | None, max_header_bytes: int) -> InferRequest:
    """Decode an inference request body (BadRequest / PayloadTooLarge on anything malformed).

    Every ``binary_data_size`` is checked against its datatype and shape, and their sum
    against the bytes after the header, before any tensor is sliced.
    """
    if header_length is None:
        if len(body) > max_header_bytes:
            raise PayloadTooLarge(f"JSON body of {len(body)} bytes exceeds the limit of {max_header_bytes}")
        header_bytes, binary = body, memoryview(b"")
    else:
        view = memoryview(body)
        header_bytes, binary = view[:header_length], view[header_length:]
    header = _load_json(bytes(header_bytes))
    params = _parameters(header, "request")
    request_id = header.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_ID_CHARS):
        raise BadRequest(f"'id' must be a string of at most {MAX_ID_CHARS} characters")
    timeout = params.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0):
        raise BadRequest("parameter 'timeout' must be a positive integer (microseconds)")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs or len(raw_inputs) > MAX_TENSORS:
        raise BadRequest(f"'inputs' must be a list of 1 to {MAX_TENSORS} tensors")
    tensors = [_input_header(t, i) for i, t in enumerate(raw_inputs)]
    names = [t[0] for t in tensors]
    if len(set(names)) != len(names):
        raise BadRequest("an input name appears twice")
    declared = sum(t[4] for t in tensors if t[4] is not None)
    if declared != len(binary):
        raise BadRequest(f"inputs declare {declared} bytes of binary data, the body has {len(binary)} after the header")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for name, dtype, shape, data, size in tensors:
        if size is not None:
            raw = binary[offset : offset + size]
            if dtype.kind == "b" and size and np.frombuffer(raw, np.uint8).max() > 1:
                raise BadRequest(f"input {name!r}: BOOL bytes must be 0 or 1")
            inputs[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
            offset += size
        else:
            inputs[name] = _json_tensor(name, dtype, shape, data)
    outputs = _requested_outputs(header.get("outputs"))
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise BadRequest("parameter 'binary_data_output' must be a boolean")
    return InferRequest(inputs, outputs, binary_default, request_id, timeout)


def _load_json(raw: bytes) -> dict:
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"JSON header does not parse: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise BadRequest("JSON header must be an object")
    return header


def _parameters(obj: Mapping, where: str) -> dict:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{where} 'parameters' must be an object")
    return params


def _input_header(tensor: Any, index: int) -> tuple[str, np.dtype, tuple[int, ...], Any, int | None]:
    if not isinstance(tensor, dict):
        raise BadRequest(f"input {index} must be an object")
    name = tensor.get("name")
    if not isinstance(name, str) or not name or len(name) > 128:
        raise BadRequest(f"input {index}: 'name' must be a non-empty string")
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise BadRequest(f"input {name!r}: unsupported datatype {str(datatype)[:20]!r}; supported: {sorted(DATATYPES)}")
    dtype = DATATYPES[datatype]
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
    ):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of at most {MAX_RANK} non-negative integers")
    count = math.prod(shape)
    size = _parameters(tensor, f"input {name!r}").get("binary_data_size")
    has_data = "data" in tensor
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
        if has_data:
            raise BadRequest(f"input {name!r}: both 'data' and binary_data_size")
        if size != count * dtype.itemsize:
            raise BadRequest(
                f"input {name!r}: binary_data_size {size} is not {count} x {dtype.itemsize} bytes "
                f"for {datatype} {shape}"
            )
    elif not has_data:
        raise BadRequest(f"input {name!r}: neither 'data' nor binary_data_size")
    return name, dtype, tuple(shape), tensor.get("data"), size


def _json_tensor(name: str, dtype: np.dtype, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """A JSON ``data`` array (flat or nested, row-major) as ``dtype[shape]``, strictly typed."""
    try:
        array = np.array(data)
    except (ValueError, TypeError, RecursionError):
        raise BadRequest(f"input {name!r}: 'data' is not a rectangular array of numbers") from None
    kind = array.dtype.kind
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if array.size and kind not in allowed:
        raise BadRequest(f"input {name!r}: 'data' holds {array.dtype.name} values, not {dtype.name}")
    if array.size != math.prod(shape):
        raise BadRequest(
            f"input {name!r}: 'data' has {array.size} elements, shape {list(shape)} needs {math.prod(shape)}"
        )
    if array.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if array.dtype.kind not in "iu" or int(array.min()) < info.min or int(array.max()) > info.max:
            raise BadRequest(f"input {name!r}: 'data' does not fit {dtype.name}")
    return array.astype(dtype).reshape(shape)


def _requested_outputs(raw: Any) -> dict[str, bool]:
    if raw is None:
        return {}
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise BadRequest(f"'outputs' must be a list of at most {MAX_TENSORS} objects")
    outputs: dict[str, bool] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"output {index} must be an object with a 'name'")
        binary = _parameters(item, f"output {item['name']!r}").get("binary_data", None)
        if binary is not None and not isinstance(binary, bool):
            raise BadRequest(f"output {item['name']!r}: binary_data must be a boolean")
        outputs[item["name"]] = binary
    return outputs


def check_against_spec(inputs: Mapping[str, np.ndarray], spec: Sequence[TensorSpec]) -> int:
    """The request's batch dimension N after checking every input's datatype and rank.

    Raises InvalidInput (422) naming the input: a datatype other than the spec's, a rank
    other than the spec's plus one, or leading dimensions that disagree. Missing and extra
    inputs and per-sample shapes are checked by the vectorized path with N rows.
    """
    by_name = {s.name: s for s in spec}
    rows = None
    for name, array in inputs.items():
        s = by_name.get(name)
        if s is None:
            continue  # named by the vectorized path's check (unexpected input)
        if array.dtype.newbyteorder("=") != s.np_dtype:
            raise InvalidInput(
                f"input {name!r}: expected datatype {datatype_of(s.dtype)}, got {datatype_of(array.dtype)}"
            )
        if array.ndim != len(s.shape) + 1:
            raise InvalidInput(f"input {name!r}: expected shape {[-1, *s.shape]}, got {list(array.shape)}")
        if rows is None:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            raise InvalidInput(f"input {name!r}: batch dimension {array.shape[0]}, another input has {rows}")
    if rows is None:
        raise InvalidInput(f"no known input; expected {sorted(by_name)}")
    if rows < 1:
        raise InvalidInput("the batch dimension must be at least 1")
    return rows


def encode_response(
    model_name: str,
    version: str,
    outputs: Mapping[str, np.ndarray],
    binary: Mapping[str, bool],
    request_id: str | None,
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length (for
    ``Inference-Header-Content-Length``). ``binary`` says per output name whether it goes
    as raw little-endian bytes after the header."""
    tensors, chunks = [], []
    for name, array in outputs.items():
        array = np.ascontiguousarray(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if binary.get(name):
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        tensors.append(entry)
    header: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": tensors}
    if request_id is not None:
        header["id"] = request_id
    encoded = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    if not chunks:
        return encoded, None
    return b"".join([encoded, *chunks]), len(encoded)
