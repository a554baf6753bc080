"""A streaming reader and writer of the safetensors format, with errors that name the file.

Format: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
raw little-endian tensor bytes, offsets relative to the end of the header.

The reader memory-maps the file and hands out one tensor at a time as a NumPy view, so a
checkpoint is never held twice in memory; bf16 is read through `ml_dtypes` (NumPy lacks it).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

from qdlm_jax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """Lazy, memory-mapped view of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes; "
                                      "expected at least an 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: truncated or corrupt safetensors file "
                                      f"(header claims {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries = {}
        for name, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                      f"{info.get('dtype')!r}; expected one of {sorted(DTYPES)}")
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != expected:
                raise CheckpointError(f"{self.path}: tensor {name!r} spans {end - begin} bytes "
                                      f"but shape {shape} {info['dtype']} needs {expected}")
            if end > data_size:
                raise CheckpointError(f"{self.path}: truncated safetensors file: tensor {name!r} "
                                      f"needs bytes up to {end} but the file has only "
                                      f"{data_size} bytes of data")
            self._entries[name] = (dtype, shape, begin, end)
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """A read-only NumPy view of one tensor (no copy)."""
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        dtype, shape, begin, end = self._entries[name]
        buf = memoryview(self._mmap)[self._data_start + begin:self._data_start + end]
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def drop_resident(self):
        """Lets the kernel drop the pages of this file that reads have made resident. They
        are clean file pages: the process's resident set stops counting them, and views
        handed out stay valid (a later access reads the file again). A streaming pass calls
        this after each block, so its resident memory does not grow with the blocks read."""
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED)

    def close(self):
        # Views handed out keep the mapping alive; dropping our reference is enough.
        self._mmap = None


def _header(entries, metadata, path) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, shape, dtype in entries:
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise CheckpointError(f"{path}: cannot store tensor {name!r} of dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    return struct.pack("<Q", len(blob)) + blob


def _little_endian_bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def write_safetensors(path: str | os.PathLike, tensors: Iterator[tuple[str, np.ndarray]] | dict,
                      metadata: dict[str, str] | None = None) -> None:
    """Writes tensors (name -> array) to `path`. Arrays are written in the given order."""
    items = [(name, np.asarray(arr)) for name, arr in
             (tensors.items() if isinstance(tensors, dict) else tensors)]
    with open(path, "wb") as f:
        f.write(_header([(n, a.shape, a.dtype) for n, a in items], metadata, path))
        for _, arr in items:
            f.write(_little_endian_bytes(arr))


def write_safetensors_chunked(path: str | os.PathLike,
                              entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                              chunks: Callable[[str], Iterable[np.ndarray]],
                              metadata: dict[str, str] | None = None) -> None:
    """Writes the tensors `entries` lists (name, shape, dtype), in that order, whose data
    `chunks(name)` yields as arrays of that dtype: consecutive pieces along the first axis,
    concatenated in C order. One chunk is held at a time, so a file larger than memory can
    be written (real-shape random checkpoints)."""
    with open(path, "wb") as f:
        f.write(_header(entries, metadata, path))
        for name, shape, dtype in entries:
            want = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            written = 0
            for piece in chunks(name):
                piece = np.asarray(piece)
                if piece.dtype != np.dtype(dtype):
                    raise CheckpointError(f"{path}: chunk of {name!r} has dtype {piece.dtype}, "
                                          f"expected {np.dtype(dtype)}")
                f.write(_little_endian_bytes(piece))
                written += piece.nbytes
            if written != want:
                raise CheckpointError(f"{path}: tensor {name!r} got {written} bytes, its shape "
                                      f"{list(shape)} needs {want}")
