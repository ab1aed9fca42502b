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

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policy_server.contract import TensorSpec, TextSpec, is_text
from policy_server.errors import BadRequest, InvalidInput, NonFiniteOutput, PayloadTooLarge
from policy_server.inputs.episodes import parse_episode_id
from policy_server.inputs.tensors import positive_header
from policy_server.oip.bytes_tensors import binary_texts, json_texts
from policy_server.oip.json_data import BIG_JSON_BYTES, big_json, json_tensor

HEADER_LENGTH = "Inference-Header-Content-Length"
# OIP tensor data types and their numpy (little-endian) dtypes.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"  # text inputs only (policy_server.oip.bytes_tensors); BF16 is not served
_BY_NUMPY = {dtype.newbyteorder("="): name for name, dtype in DATATYPES.items()}
MAX_TENSORS = 64  # inputs or requested outputs in one request
MAX_RANK = 16
MAX_ID_CHARS = 256
MAX_NAME_CHARS = 128
MAX_TIMEOUT_US = 10**12  # the largest ``timeout`` parameter taken at its word (11.6 days)
MAX_TENSOR_BYTES = 1 << 40  # no tensor's declared shape may need more, even with a zero dimension


def datatype_of(dtype: str | np.dtype) -> str:
    """The OIP datatype name of a numpy dtype (``float32`` -> ``FP32``); ValueError if none."""
    key = np.dtype(dtype).newbyteorder("=")
    if key not in _BY_NUMPY:
        raise ValueError(f"dtype {np.dtype(dtype).name} has no Open Inference Protocol datatype")
    return _BY_NUMPY[key]


def tensor_metadata(spec: TensorSpec | TextSpec) -> dict[str, Any]:
    """A metadata tensor: the per-sample shape with ``-1`` for the batch dimension (a text
    input is ``BYTES`` of shape ``[-1]``, one text per row)."""
    if is_text(spec):
        return {"name": spec.name, "datatype": BYTES, "shape": [-1]}
    return {"name": spec.name, "datatype": datatype_of(spec.dtype), "shape": [-1, *spec.shape]}


def model_metadata(
    name: str, version: str, input_spec: Sequence[TensorSpec], output_spec: Sequence[TensorSpec],
    versions: Sequence[str] = (),
) -> dict:
    """``GET /v2/models/{name}``: name, versions (``version`` first: its specs are these, then
    the other ``versions`` a request may pin), platform, inputs and outputs."""
    return {
        "name": name,
        "versions": [version, *(v for v in versions if v != version)],
        "platform": "pytorch",
        "inputs": [tensor_metadata(s) for s in input_spec],
        "outputs": [tensor_metadata(s) for s in output_spec],
    }


@dataclass(frozen=True)
class TensorHeader:
    """One input as the JSON header declares it, before any data is converted: ``dtype`` the
    datatype's numpy (little-endian) dtype, ``data`` the JSON ``data`` (None for binary
    data), ``size`` its ``binary_data_size`` and ``offset`` where its bytes start after the
    header (binary data only)."""

    name: str
    datatype: str
    dtype: np.dtype
    shape: tuple[int, ...]
    data: Any = None
    size: int | None = None
    offset: int = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class InferRequest:
    """A decoded inference request: ``inputs`` name -> array ``[N, *shape]`` (read-only views
    into the body for binary inputs), ``rows`` N (when checked against a spec), the requested
    outputs (name -> answer as binary, None for the default), the request ``id`` to echo,
    the ``timeout`` parameter in microseconds and the ``episode_id`` parameter (None when absent)."""

    inputs: dict[str, np.ndarray]
    rows: int | None = None
    outputs: dict[str, bool | None] = field(default_factory=dict)
    binary_output_default: bool = False
    request_id: str | None = None
    timeout_us: int | None = None
    episode_id: str | None = None


def parse_header_length(raw: str | None, body_length: int, max_header_bytes: int) -> int | None:
    """The ``Inference-Header-Content-Length`` header: None (all JSON) or 0 < n <= body length.

    Raises BadRequest for a malformed value or one past the body, PayloadTooLarge for a JSON
    header over ``max_header_bytes``.
    """
    length = positive_header(raw, HEADER_LENGTH)
    if length is None:
        return None
    if length > max_header_bytes:
        raise PayloadTooLarge(f"JSON header of {length} bytes exceeds the limit of {max_header_bytes}")
    if length > body_length:
        raise BadRequest(f"{HEADER_LENGTH} {length} is past the end of the {body_length}-byte body")
    return length


def decode_request(
    body: bytes,
    header_length: int | None,
    max_header_bytes: int,
    spec: Sequence[TensorSpec] | None = None,
    max_rows: int | None = None,
) -> InferRequest:
    """Decode an inference request body: parse the JSON header, check every field's JSON type
    before it is used, check every ``binary_data_size`` against its datatype and shape and
    their sum against the bytes after the header, check the declared inputs against the
    model's ``spec`` when given (:func:`check_against_spec`, with ``max_rows``), and only then
    convert tensor data. Raises BadRequest / PayloadTooLarge on anything malformed, and what
    :func:`check_against_spec` raises.

    A header over :data:`BIG_JSON_BYTES` is decoded in the worker's one big-JSON section
    (:func:`policy_server.oip.json_data.big_json`), so the GIL is never held long and the
    worker's probes keep answering.
    """
    if header_length is None:
        if len(body) > max_header_bytes:
            raise PayloadTooLarge(f"JSON body of {len(body)} bytes exceeds the limit of {max_header_bytes}")
        header_bytes, binary = body, memoryview(b"")
    else:
        view = memoryview(body)
        header_bytes, binary = view[:header_length], view[header_length:]
    section = big_json() if len(header_bytes) > BIG_JSON_BYTES else contextlib.nullcontext()
    with section:
        header = _load_json(bytes(header_bytes))
        decoded = _decode_header(header, binary, spec, max_rows)
        del header  # the parsed JSON: its lists are gone before the section ends
    return decoded


def _decode_header(header: dict, binary: memoryview, spec, max_rows) -> InferRequest:
    params = _parameters(header, "request")
    request_id = header.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_ID_CHARS):
        raise BadRequest(f"'id' must be a string of at most {MAX_ID_CHARS} characters")
    timeout = params.get("timeout")
    if timeout is not None and (not _is_int(timeout) or not 0 < timeout <= MAX_TIMEOUT_US):
        raise BadRequest(f"parameter 'timeout' must be an integer in 1..{MAX_TIMEOUT_US} (microseconds)")
    episode_id = parse_episode_id(params.get("episode_id"), "parameter 'episode_id'")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs or len(raw_inputs) > MAX_TENSORS:
        raise BadRequest(f"'inputs' must be a list of 1 to {MAX_TENSORS} tensors")
    tensors, offset = [], 0
    for index, raw in enumerate(raw_inputs):
        tensor = _input_header(raw, index, offset)
        offset += tensor.size or 0
        tensors.append(tensor)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise BadRequest("an input name appears twice")
    if offset != len(binary):
        raise BadRequest(f"inputs declare {offset} bytes of binary data, the body has {len(binary)} after the header")
    outputs = _requested_outputs(header.get("outputs"))
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise BadRequest("parameter 'binary_data_output' must be a boolean")
    rows = None if spec is None else check_against_spec(tensors, spec, max_rows)
    inputs = {t.name: _tensor_array(t, binary) for t in tensors}
    return InferRequest(inputs, rows, outputs, binary_default, request_id, timeout, episode_id)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


def _input_header(tensor: Any, index: int, offset: int) -> TensorHeader:
    if not isinstance(tensor, dict):
        raise BadRequest(f"input {index} must be an object")
    name = tensor.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        raise BadRequest(f"input {index}: 'name' must be a string of 1 to {MAX_NAME_CHARS} characters")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or (datatype not in DATATYPES and datatype != BYTES):
        shown = datatype[:20] if isinstance(datatype, str) else type(datatype).__name__
        raise BadRequest(f"input {name!r}: unsupported datatype {shown!r}; supported: {sorted([*DATATYPES, BYTES])}")
    dtype = DATATYPES.get(datatype, np.dtype(np.uint8))  # BYTES: texts (oip_bytes); sizes are checked there
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(_is_int(d) and 0 <= d < 2**31 for d in shape)
    ):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of at most {MAX_RANK} non-negative integers")
    # The bytes the shape would need with its zero dimensions left out: an empty tensor whose
    # other dimensions overflow the address space is refused here, not inside numpy.
    if math.prod(d for d in shape if d) * dtype.itemsize > MAX_TENSOR_BYTES:
        raise BadRequest(f"input {name!r}: shape {shape} is larger than any tensor this server accepts")
    count = math.prod(shape)
    size = _parameters(tensor, f"input {name!r}").get("binary_data_size")
    has_data = "data" in tensor
    if size is not None:
        if not _is_int(size) or size < 0:
            raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
        if has_data:
            raise BadRequest(f"input {name!r}: both 'data' and binary_data_size")
        if datatype == BYTES and size < 4 * count:
            raise BadRequest(f"input {name!r}: binary_data_size {size} cannot hold {count} BYTES elements")
        if datatype != BYTES and size != count * dtype.itemsize:
            raise BadRequest(
                f"input {name!r}: binary_data_size {size} is not {count} x {dtype.itemsize} bytes "
                f"for {datatype} {shape}"
            )
    elif not has_data:
        raise BadRequest(f"input {name!r}: neither 'data' nor binary_data_size")
    elif not isinstance(tensor["data"], list):
        raise BadRequest(f"input {name!r}: 'data' must be an array")
    return TensorHeader(name, datatype, dtype, tuple(shape), tensor.get("data"), size, offset)


def _tensor_array(tensor: TensorHeader, binary: memoryview) -> np.ndarray | list[str]:
    if tensor.datatype == BYTES:  # texts: a list of one str per row
        if tensor.size is None:
            return json_texts(tensor.name, tensor.shape, tensor.data)
        return binary_texts(tensor.name, tensor.shape, binary[tensor.offset : tensor.offset + tensor.size])
    if tensor.size is None:
        return json_tensor(tensor.name, tensor.dtype, tensor.shape, tensor.data)
    raw = binary[tensor.offset : tensor.offset + tensor.size]
    if tensor.dtype.kind == "b" and tensor.size and np.frombuffer(raw, np.uint8).max() > 1:
        raise BadRequest(f"input {tensor.name!r}: BOOL bytes must be 0 or 1")
    return np.frombuffer(raw, dtype=tensor.dtype).reshape(tensor.shape)


def _requested_outputs(raw: Any) -> dict[str, bool | None]:
    if raw is None:
        return {}
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise BadRequest(f"'outputs' must be a list of at most {MAX_TENSORS} objects")
    outputs: dict[str, bool | None] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or len(item["name"]) > MAX_NAME_CHARS:
            raise BadRequest(f"output {index} must be an object with a 'name' of at most {MAX_NAME_CHARS} characters")
        binary = _parameters(item, f"output {item['name']!r}").get("binary_data", None)
        if binary is not None and not isinstance(binary, bool):
            raise BadRequest(f"output {item['name']!r}: binary_data must be a boolean")
        outputs[item["name"]] = binary
    return outputs


def check_against_spec(tensors: Sequence[TensorHeader], spec: Sequence[TensorSpec], max_rows: int | None) -> int:
    """The request's batch dimension N, after checking each declared input against the spec
    before any of its data is converted.

    Raises InvalidInput (422) naming the input: one the model does not have, a datatype
    other than the spec's, a shape other than ``[N, *spec shape]``, batch dimensions that
    disagree, N below 1; PayloadTooLarge (413) for N over ``max_rows`` (the worker's queue
    size: more rows than it could ever hold). Missing inputs are named by the vectorized
    path's check, which fills the optional ones.
    """
    by_name = {s.name: s for s in spec}
    rows = None
    for tensor in tensors:
        s = by_name.get(tensor.name)
        if s is None:
            raise InvalidInput(f"unexpected input {tensor.name!r}; expected {sorted(by_name)}")
        if is_text(s):
            if tensor.datatype != BYTES or tensor.ndim not in (1, 2) or tensor.shape[1:] not in ((), (1,)):
                raise InvalidInput(f"input {tensor.name!r}: expected datatype BYTES of shape [-1] or [-1, 1] (one "
                                   f"text per row), got {tensor.datatype} {list(tensor.shape)}")
        elif tensor.datatype == BYTES or tensor.dtype.newbyteorder("=") != s.np_dtype:
            raise InvalidInput(
                f"input {tensor.name!r}: expected datatype {datatype_of(s.dtype)}, got {tensor.datatype}"
            )
        elif tensor.ndim != len(s.shape) + 1 or tensor.shape[1:] != s.shape:
            raise InvalidInput(f"input {tensor.name!r}: expected shape {[-1, *s.shape]}, got {list(tensor.shape)}")
        if rows is None:
            rows = tensor.shape[0]
        elif tensor.shape[0] != rows:
            raise InvalidInput(f"input {tensor.name!r}: batch dimension {tensor.shape[0]}, another input has {rows}")
    if rows is None or rows < 1:
        raise InvalidInput("the batch dimension must be at least 1")
    if max_rows is not None and rows > max_rows:
        raise PayloadTooLarge(f"{rows} rows exceed the queue size {max_rows}")
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
    try:  # NaN and inf are not JSON: strict parsers fail on them, so they are never written
        encoded = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        raise NonFiniteOutput(f"model {model_name!r} version {version}: an output holds NaN or inf") from None
    if not chunks:
        return encoded, None
    return b"".join([encoded, *chunks]), len(encoded)
