"""The header of a safetensors file, parsed here so a reader can plan its byte ranges before reading any data.

The format (safetensors' own docs, https://github.com/huggingface/safetensors#format): 8 bytes, a little-endian
unsigned 64-bit N; N bytes of UTF-8 JSON mapping each tensor's name to ``{"dtype", "shape", "data_offsets":
[begin, end]}`` (``__metadata__`` holds free-form strings); then the data, row-major and little-endian, with
``begin``/``end`` counted from the first byte after the JSON. Everything a header says is checked against the
file before a byte of data is read: a truncated file or a header that lies about sizes fails here, naming the
file and the tensor, rather than as a short read or a garbled weight later. Pure Python (no torch): ``hpi run``
checks a checkpoint's headers before it starts any rank (``hpi.deployment``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["INDEX_NAME", "ITEMSIZE_BYTES", "SINGLE_NAME", "HeaderError", "TensorEntry", "check_files",
           "checkpoint_files", "read_header"]

INDEX_NAME = "model.safetensors.index.json"  # a sharded HF checkpoint's map of tensor name -> file
SINGLE_NAME = "model.safetensors"

# safetensors' dtype names (the Rust crate's ``Dtype``) -> bytes per element
ITEMSIZE_BYTES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                                  "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors refuses larger headers too (MAX_HEADER_SIZE)


class HeaderError(ValueError):
    """A safetensors file whose header cannot be trusted (the message names the file)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are (absolute file offsets) and how to view them."""

    name: str
    dtype: str  # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]
    start_byte: int
    stop_byte: int

    @property
    def nbytes(self) -> int:
        return self.stop_byte - self.start_byte

    @property
    def itemsize_bytes(self) -> int:
        return ITEMSIZE_BYTES[self.dtype]

    def block_bytes(self, dim: int) -> int:
        """Bytes of one index along ``dim``: the stride of ``dim`` in the row-major data."""
        return math.prod(self.shape[dim + 1:]) * self.itemsize_bytes


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of the safetensors file at ``path``, by name, in file order; checked against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError(f"{path}: {size} bytes, shorter than the 8-byte header length: not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise HeaderError(f"{path}: header length {n} + 8 > file size {size} (or > {_MAX_HEADER_BYTES}): "
                              "truncated or not a safetensors file")
        try:
            raw = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HeaderError(f"{path}: header is not JSON ({e}): not a safetensors file") from e
    if not isinstance(raw, dict):
        raise HeaderError(f"{path}: header is not a JSON object: not a safetensors file")
    data_start = 8 + n
    entries = [_entry(path, name, info, data_start, size) for name, info in raw.items() if name != "__metadata__"]
    return {e.name: e for e in sorted(entries, key=lambda e: e.start_byte)}


def _entry(path: Path, name: str, info, data_start: int, file_size: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        ITEMSIZE_BYTES[dtype]
    except (KeyError, TypeError, ValueError) as e:
        raise HeaderError(f"{path}: tensor {name!r} has no valid dtype/shape/data_offsets ({info!r}): "
                          f"dtypes are {', '.join(ITEMSIZE_BYTES)}") from e
    entry = TensorEntry(name, dtype, shape, data_start + int(begin), data_start + int(end))
    want = math.prod(shape) * entry.itemsize_bytes
    if entry.nbytes != want or begin < 0:
        raise HeaderError(f"{path}: tensor {name!r}: data_offsets {begin}..{end} hold {entry.nbytes} bytes but "
                          f"shape {list(shape)} x {dtype} needs {want}: the header lies about its sizes")
    if entry.stop_byte > file_size:
        raise HeaderError(f"{path}: tensor {name!r} ends at byte {entry.stop_byte} but the file has {file_size} "
                          "bytes: the file is truncated (copy or download it again)")
    return entry


def check_files(paths: Iterable[str | os.PathLike]) -> int:
    """Read every file's header (raising ``HeaderError`` at the first that cannot be trusted); the tensors' bytes."""
    return sum(e.nbytes for path in paths for e in read_header(path).values())


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory: those its index names, else model.safetensors, else all."""
    path = Path(path)
    if (path / INDEX_NAME).is_file():
        return [path / f for f in sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))]
    files = [path / SINGLE_NAME] if (path / SINGLE_NAME).is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors file")
    return files
