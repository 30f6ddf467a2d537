"""Safetensors files tensor by tensor, bfloat16 through float32, and atomic writes.

Reading goes through `safe_open` (memory-mapped, one tensor at a time) so a converter never
holds a whole checkpoint twice. bfloat16 is converted with explicit bit arithmetic rather than
relying on a numpy bfloat16 dtype, which exists only when MindSpore registered one.
"""
from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from typing import Dict, Iterable, Tuple

import numpy as np
from safetensors import SafetensorError, TensorSpec, safe_open, serialize_file

_ST_DTYPES = ("float32", "float16", "bfloat16")


def bf16_bits_from_f32(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), rounded)


def f32_from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_header(path: str) -> dict:
    """The JSON header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}}."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise ValueError(f"{path}: corrupt safetensors header (length {n} > file size {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise FileNotFoundError(f"safetensors file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})")
    return header


@contextmanager
def open_safetensors(path: str):
    """A reader whose `get(name)` returns a float32/float16/... numpy array (bf16 -> float32)."""
    header = read_header(path)
    try:
        f = safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read safetensors ({e})") from None

    def get(name: str) -> np.ndarray:
        if header[name]["dtype"] == "BF16":
            return f32_from_bf16_bits(_raw_bits(path, header, name))
        try:
            return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: cannot read tensor {name!r} ({e})") from None

    try:
        yield header, get
    finally:
        del f


def _raw_bits(path: str, header: dict, name: str) -> np.ndarray:
    """A bf16 tensor's uint16 bit patterns straight from the file (memory-mapped)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    start, end = header[name]["data_offsets"]
    shape = tuple(header[name]["shape"])
    mm = np.memmap(path, dtype=np.uint16, mode="r", offset=8 + n + start, shape=((end - start) // 2,))
    return np.array(mm).reshape(shape)


def encode_tensor(a: np.ndarray, dtype: str) -> np.ndarray:
    """`a` converted for storage as `dtype`: a contiguous array (bf16 as uint16 bit patterns)."""
    if dtype not in _ST_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_ST_DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16":
        return bf16_bits_from_f32(np.asarray(a, dtype=np.float32))
    return np.ascontiguousarray(np.asarray(a).astype(dtype))


def write_safetensors(path: str, arrays: Dict[str, np.ndarray], metadata=None) -> None:
    """Write `encode_tensor` outputs to `path` via a temp file + rename (never half-written)."""
    specs = {n: TensorSpec(dtype="bfloat16" if a.dtype == np.uint16 else a.dtype.name,
                           shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
             for n, a in arrays.items()}                     # `arrays` keeps the buffers alive
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        serialize_file(specs, tmp, metadata=metadata or {"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plan_shards(sizes: Iterable[Tuple[str, int]], max_shard_bytes) -> list:
    """Split (name, nbytes) in order into groups of at most max_shard_bytes (one big tensor alone)."""
    shards, cur, cur_bytes = [], [], 0
    for name, nbytes in sizes:
        if cur and max_shard_bytes and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    return shards


def parse_size(size) -> int:
    """'5GB' / '500MB' / 1000 -> bytes (HF's max_shard_size convention, decimal units)."""
    if size is None or isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)
