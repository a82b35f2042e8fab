"""The Open Inference Protocol (KServe v2) tensor format, with its binary tensor extension, as
plain functions over bytes and numpy arrays: what our workers, our router, our HTTP service and any
v2 server or client (Triton, KServe, `tritonclient`) exchange.

A request or response body is JSON, optionally followed by raw tensor bytes: then the HTTP header
`Inference-Header-Content-Length` gives the JSON's length, and every tensor sent in binary carries
`"parameters": {"binary_data_size": <bytes>}` instead of `"data"` (row-major, little-endian,
in the order the tensors are listed). A client asks for binary outputs per output
(`"parameters": {"binary_data": true}`) or for all (`"parameters": {"binary_data_output": true}`).

Nothing here trusts its input: every length, shape, datatype and byte count is checked, and a
body that does not add up is a `ProtocolError` (HTTP 400) naming what is wrong.
"""
from __future__ import annotations

import json
import math
from typing import Iterable, Mapping, Optional

import numpy as np

from anyorder.errors import InputError

HEADER_LENGTH = "Inference-Header-Content-Length"
# v2 datatype -> numpy dtype (little-endian, as the protocol's binary format is). BYTES and BF16
# exist in the protocol but no block graph of ours takes them: they are refused, by name.
DATATYPES = {"BOOL": np.dtype("bool"), "UINT8": np.dtype("<u1"), "INT8": np.dtype("<i1"),
             "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
             "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
NUMPY_TO_DATATYPE = {dtype: name for name, dtype in DATATYPES.items()}
MAX_ELEMENTS = 1 << 28  # a shape claiming more than this is refused before any allocation


class ProtocolError(InputError):
    """A request or response that does not follow the protocol; the message names the field."""


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype name of a numpy array's dtype; ProtocolError if it has none."""
    try:
        return NUMPY_TO_DATATYPE[array.dtype.newbyteorder("<")]
    except KeyError:
        raise ProtocolError(f"dtype {array.dtype} has no v2 datatype "
                            f"({', '.join(DATATYPES)})") from None


# -- decoding ---------------------------------------------------------------------------------

def split_body(body: bytes, header_length: Optional[str]) -> tuple[dict, bytes]:
    """A body and its Inference-Header-Content-Length header (None: all JSON) -> (JSON object,
    the binary bytes after it)."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} {header_length!r}: not an integer") from None
        if not 0 < length <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {length}: the body has {len(body)} bytes; the "
                                f"header must give the length of the JSON part")
        json_part, binary = body[:length], body[length:]
    try:
        message = json.loads(json_part)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the JSON part is not valid JSON ({exc})") from None
    if not isinstance(message, dict):
        raise ProtocolError("the JSON part must be an object with an \"inputs\" or \"outputs\" "
                            "list")
    return message, binary


def _shape(entry: dict, where: str) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                              and d >= 0 for d in shape):
        raise ProtocolError(f"{where}: \"shape\" must be a list of non-negative integers, got "
                            f"{shape!r}")
    if math.prod(shape) > MAX_ELEMENTS:
        raise ProtocolError(f"{where}: shape {shape} has more than {MAX_ELEMENTS} elements")
    return tuple(shape)


def decode_tensors(entries: object, binary: bytes, what: str) -> dict[str, np.ndarray]:
    """The tensors of an "inputs" or "outputs" list, their binary data taken from `binary` in
    order; every byte of `binary` must belong to a tensor."""
    if not isinstance(entries, list) or not entries:
        raise ProtocolError(f"\"{what}\" must be a non-empty list of tensors")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for position, entry in enumerate(entries):
        where = f"{what}[{position}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ProtocolError(f"{where}: a tensor needs a \"name\", \"datatype\" and \"shape\"")
        name = entry["name"]
        where = f"{what}[{position}] ({name!r})"
        if name in tensors:
            raise ProtocolError(f"{where}: the name appears twice")
        dtype = DATATYPES.get(entry.get("datatype"))
        if dtype is None:
            raise ProtocolError(f"{where}: datatype {entry.get('datatype')!r} is not supported; "
                                f"use one of {', '.join(DATATYPES)}")
        shape = _shape(entry, where)
        count = math.prod(shape)
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ProtocolError(f"{where}: \"parameters\" must be an object")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize:
                raise ProtocolError(f"{where}: binary_data_size {size!r}, but shape {list(shape)} "
                                    f"of {entry['datatype']} takes {count * dtype.itemsize} bytes")
            if offset + size > len(binary):
                raise ProtocolError(f"{where}: the binary part ends after {len(binary)} bytes, "
                                    f"this tensor needs bytes {offset}..{offset + size}")
            array = np.frombuffer(binary, dtype, count, offset).reshape(shape)
            offset += size
        else:
            if "data" not in entry:
                raise ProtocolError(f"{where}: neither \"data\" nor a binary_data_size parameter")
            try:
                array = np.asarray(entry["data"], dtype=dtype)
            except (ValueError, TypeError, OverflowError) as exc:
                raise ProtocolError(f"{where}: \"data\" is not {entry['datatype']} ({exc})"
                                    ) from None
            if array.size != count:
                raise ProtocolError(f"{where}: \"data\" has {array.size} elements, shape "
                                    f"{list(shape)} needs {count}")
            array = array.reshape(shape)
        tensors[name] = array
    if offset != len(binary):
        raise ProtocolError(f"the binary part has {len(binary) - offset} bytes that belong to "
                            f"no tensor (check each binary_data_size)")
    return tensors


def decode_request(body: bytes, header_length: Optional[str]) -> tuple[dict, dict]:
    """An infer request -> (its JSON, {input name: array})."""
    message, binary = split_body(body, header_length)
    return message, decode_tensors(message.get("inputs"), binary, "inputs")


def decode_response(body: bytes, header_length: Optional[str]) -> tuple[dict, dict]:
    """An infer response -> (its JSON, {output name: array})."""
    message, binary = split_body(body, header_length)
    return message, decode_tensors(message.get("outputs"), binary, "outputs")


def wants_binary(request: dict, output: str) -> bool:
    """Whether a request asks for `output` in binary: the output's own binary_data parameter,
    else the request's binary_data_output, else JSON (the protocol's default)."""
    for entry in request.get("outputs") or []:
        if isinstance(entry, dict) and entry.get("name") == output:
            flag = (entry.get("parameters") or {}).get("binary_data")
            if flag is not None:
                return bool(flag)
    return bool((request.get("parameters") or {}).get("binary_data_output", False))


def requested_outputs(request: dict, available: Iterable[str]) -> list[str]:
    """The outputs a request names (all of `available` when it names none); ProtocolError for
    a name the model does not have."""
    available = list(available)
    names = [entry.get("name") for entry in request.get("outputs") or []
             if isinstance(entry, dict)]
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ProtocolError(f"outputs {unknown}: this model's outputs are {available}")
    return names or available


# -- encoding ---------------------------------------------------------------------------------

def _encode(key: str, tensors: Mapping[str, np.ndarray], binary: Mapping[str, bool],
            message: dict) -> tuple[bytes, dict]:
    entries, chunks = [], []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        entry = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if binary.get(name, False):
            raw = (array if array.dtype.byteorder != ">" else array.astype(
                array.dtype.newbyteorder("<"))).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    header = json.dumps({**message, key: entries}, separators=(",", ":")).encode()
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *chunks]), {HEADER_LENGTH: str(len(header)),
                                          "Content-Type": "application/octet-stream"}


def encode_request(inputs: Mapping[str, np.ndarray], outputs: Iterable[str] = (),
                   binary: bool = True, parameters: Optional[dict] = None,
                   request_id: str = "") -> tuple[bytes, dict]:
    """{name: array} -> (body, headers) of an infer request; `binary` sends the inputs and asks
    for the outputs in binary."""
    message: dict = {}
    if request_id:
        message["id"] = request_id
    message["outputs"] = [{"name": name, "parameters": {"binary_data": binary}}
                          for name in outputs]
    if not message["outputs"]:
        del message["outputs"]
        parameters = {**(parameters or {}), "binary_data_output": binary}
    if parameters:
        message["parameters"] = parameters
    return _encode("inputs", inputs, {name: binary for name in inputs}, message)


def encode_response(model: str, outputs: Mapping[str, np.ndarray], request: dict,
                    parameters: Optional[dict] = None, version: str = "1"
                    ) -> tuple[bytes, dict]:
    """{name: array} -> (body, headers) of an infer response, each output binary or JSON as
    `request` asked."""
    message: dict = {"model_name": model, "model_version": version}
    if request.get("id"):
        message["id"] = str(request["id"])
    if parameters:
        message["parameters"] = parameters
    return _encode("outputs", outputs, {name: wants_binary(request, name) for name in outputs},
                   message)


def error_body(message: str) -> bytes:
    """The protocol's error object."""
    return json.dumps({"error": message}).encode()
