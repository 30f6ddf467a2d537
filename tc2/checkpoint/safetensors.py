"""Safetensors files read and written one tensor at a time; raw dtypes; atomic single files.

The one safetensors reader and writer of tc2 (HF directories, conversions, training and
tensor-parallel checkpoints all go through it), so peak memory is about the largest tensor:

- `SafetensorsFile` parses and checks the header, then reads each tensor with `readinto` into
  a fresh array. A memory map (`safetensors.safe_open`) would do no copy, but every page it
  touches counts toward the process's resident memory until the file is closed, so reading a
  whole checkpoint that way costs the checkpoint size again.
- `SafetensorsWriter` writes the header first (shapes are known up front), then each tensor in
  header order, converting dtypes in 16 MB blocks. `safetensors.serialize_file` needs every
  tensor's buffer at once; one writer for small and big files keeps one code path to test.

Arrays travel "raw": as stored, bfloat16 as uint16 bit patterns next to a dtype name
("float32", "bfloat16", ...). bfloat16 is converted with explicit bit arithmetic through
float32 rather than a numpy bfloat16 dtype, which exists only when MindSpore registered one.
The `.ckpt` writer (`tc2.checkpoint.ms_ckpt`) shares these conversions.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from tc2.checkpoint.reader import Reader
from tc2.files import atomic_file, naming_write_errors

# ---- raw dtypes -----------------------------------------------------------------------------
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
             "U8": "uint8", "BOOL": "bool"}
_ST_CODE = {v: k for k, v in ST_DTYPES.items()}
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
BLOCK_ELEMS = 1 << 22                                  # 16 MB of float32 per conversion block
MAX_HEADER_BYTES = 100_000_000                         # the format's cap (the safetensors library's)


def np_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a raw array of `dtype` has (bfloat16 -> uint16 bits)."""
    return np.dtype(np.uint16 if dtype == "bfloat16" else dtype)


def nbytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of an array of `shape` stored as `dtype` (exact: Python ints never overflow)."""
    return math.prod(int(d) for d in shape) * np_dtype(dtype).itemsize


def bf16_bits_from_f32(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), rounded)


def f32_from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A raw array as float32 (bfloat16 decoded from its bits; float32 returned as is)."""
    return f32_from_bf16_bits(raw) if dtype == "bfloat16" else raw.astype(np.float32, copy=False)


def encoded_blocks(raw: np.ndarray, src: str, dst: str, start: int = 0, stop: Optional[int] = None):
    """Contiguous 1-D blocks of `raw.reshape(-1)[start:stop]` (raw `src`) stored as `dst`.

    Converting block by block keeps the temporaries of a dtype change at ~16 MB whatever the
    tensor size; a same-dtype copy yields views of `raw` and allocates nothing.
    """
    if src != dst and dst not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {WEIGHT_DTYPES}, got {dst!r}")
    flat = np.ascontiguousarray(raw).reshape(-1)
    stop = flat.size if stop is None else stop
    for i in range(start, stop, BLOCK_ELEMS):
        block = flat[i:min(i + BLOCK_ELEMS, stop)]
        if src == dst:
            yield block
        elif dst == "bfloat16":
            yield bf16_bits_from_f32(to_float32(block, src))
        elif src == "bfloat16":
            yield to_float32(block, src).astype(dst)
        else:
            yield block.astype(dst)


def encode_tensor(a: np.ndarray, dtype: str) -> np.ndarray:
    """`a` converted for storage as `dtype`: a contiguous array (bf16 as uint16 bit patterns)."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(WEIGHT_DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16":
        return bf16_bits_from_f32(np.asarray(a, dtype=np.float32))
    return np.ascontiguousarray(np.asarray(a).astype(dtype))


# ---- reading --------------------------------------------------------------------------------
def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted(k for k in set(keys) if keys.count(k) > 1)
        raise ValueError(f"tensor {twice[0]!r} is listed twice")
    return dict(pairs)


def _read_header_json(f, path: str) -> Tuple[dict, int]:
    """The header object of the open file `f` and its byte length; its declared length is checked
    against the format's cap and the file size before anything is read."""
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError(f"{path}: truncated safetensors file (no header)")
    (n,) = struct.unpack("<Q", raw)
    size = os.fstat(f.fileno()).st_size
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: corrupt safetensors header (declared length {n} bytes is above the "
                         f"format's {MAX_HEADER_BYTES // 1_000_000} MB limit)")
    if n > size - 8:
        raise ValueError(f"{path}: corrupt safetensors header (length {n} > file size {size})")
    try:
        header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, n


def _parse_header(f, path: str) -> Tuple[dict, dict, int]:
    """(tensors, __metadata__, byte offset of the data) of the open file `f`, every entry
    checked against its shape, and the entries' byte ranges checked to tile the data block
    (from 0 to the end of the file, in some order, no overlap and no gap: what
    `safetensors.safe_open` accepts), so no tensor can alias another."""
    header, n = _read_header_json(f, path)
    size = os.fstat(f.fileno()).st_size
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: corrupt safetensors header (__metadata__ must map str to str)")
    spans = []
    for name, meta in header.items():
        try:
            dtype, shape, (start, stop) = meta["dtype"], meta["shape"], meta["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list) and
                  all(type(d) is int and d >= 0 for d in shape) and
                  type(start) is int and type(stop) is int and 0 <= start <= stop)
        except (TypeError, ValueError, KeyError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: corrupt safetensors header (entry {name!r}: {meta!r})")
        if dtype in ST_DTYPES:
            want = nbytes(shape, ST_DTYPES[dtype])
            if stop - start != want:
                raise ValueError(f"{path}: corrupt safetensors header (tensor {name} has {stop - start} "
                                 f"bytes for shape {tuple(shape)} {dtype})")
        spans.append((start, stop, name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            what = (f"overlaps the tensor before it (bytes {start}..{stop}, previous ends at {end})"
                    if start < end else f"starts at byte {start}, leaving bytes {end}..{start} unused")
            raise ValueError(f"{path}: corrupt safetensors header (tensor {name} {what}: tensor byte "
                             f"ranges must tile the data block)")
        end = stop
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})")
    if 8 + n + end < size:
        raise ValueError(f"{path}: corrupt safetensors file ({size - 8 - n - end} bytes after the last "
                         f"tensor that no header entry covers)")
    return header, metadata, 8 + n


def read_header(path: str) -> dict:
    """The JSON header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}}."""
    try:
        with open(path, "rb") as f:
            return _parse_header(f, path)[0]
    except FileNotFoundError:
        raise FileNotFoundError(f"safetensors file not found: {path}") from None


class SafetensorsFile(Reader):
    """One safetensors file: header parsed and checked, tensors read one at a time.

    `read(name)` gives the raw array (bfloat16 as uint16 bits), `get(name)` a usable one
    (bfloat16 decoded to float32). Use as a context manager or call `close()`.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._f = open(path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"safetensors file not found: {path}") from None
        with self.closing_on_error():
            self.header, self.metadata, self._data = _parse_header(self._f, path)

    def shape_dtype(self, name: str) -> Tuple[Tuple[int, ...], str]:
        """(shape, dtype name) of tensor `name`."""
        if name not in self.header:
            raise KeyError(f"{self.path}: no tensor {name}")
        meta = self.header[name]
        if meta["dtype"] not in ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} is {meta['dtype']}, which tc2 does not read")
        return tuple(meta["shape"]), ST_DTYPES[meta["dtype"]]

    def read(self, name: str, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Tensor `name` raw, read into `out` if given (C-contiguous, of the right size)."""
        shape, dtype = self.shape_dtype(name)
        start, end = self.header[name]["data_offsets"]
        if out is None:
            out = np.empty(shape, np_dtype(dtype))
        if out.nbytes != end - start or not out.flags.c_contiguous:
            raise ValueError(f"{self.path}: tensor {name} ({end - start} bytes, {shape} {dtype}) does not "
                             f"fit the given {out.shape} {out.dtype} buffer")
        self._f.seek(self._data + start)
        if self._f.readinto(memoryview(out.reshape(-1)).cast("B")) != end - start:
            raise ValueError(f"{self.path}: truncated while reading tensor {name}")
        return out

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as numpy: its stored dtype, except bfloat16 -> float32."""
        raw = self.read(name)
        return f32_from_bf16_bits(raw) if self.header[name]["dtype"] == "BF16" else raw

    def close(self) -> None:
        self._f.close()


# ---- writing --------------------------------------------------------------------------------
class SafetensorsWriter:
    """One safetensors file written header first, then tensor by tensor in header order.

    `entries`: [(name, shape, stored dtype name)]. Writes go straight to `path`: wrap it in
    `tc2.files.atomic_file` or a `tc2.files.StagedDir` so a failure leaves
    nothing behind. As a context manager it closes (checking completeness) or aborts.
    """

    def __init__(self, path: str, entries: Iterable[Tuple[str, Sequence[int], str]], *, metadata=None):
        self.path, self._entries = path, [(n, tuple(int(d) for d in s), dt) for n, s, dt in entries]
        meta = dict(metadata) if metadata else {"format": "pt"}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError(f"{path}: safetensors metadata must map str to str, got {meta!r}")
        header, off = {"__metadata__": meta}, 0
        for name, shape, dtype in self._entries:
            if dtype not in _ST_CODE:
                raise ValueError(f"{path}: tensor {name}: dtype must be one of {sorted(_ST_CODE)}, got {dtype!r}")
            if name in header:
                raise ValueError(f"{path}: tensor {name} listed twice")
            n = nbytes(shape, dtype)
            header[name] = {"dtype": _ST_CODE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        self.nbytes = off
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with naming_write_errors(path):
            self._f = open(path, "wb")
            try:
                self._f.write(struct.pack("<Q", len(raw)) + raw)
            except BaseException:
                self._f.close()
                raise
        self._next = 0

    def write(self, name: str, raw: np.ndarray, src: Optional[str] = None) -> None:
        """Append tensor `name` (the next one of the header): `raw` of dtype `src` (default:
        the stored dtype), converted block by block."""
        if self._next >= len(self._entries):
            raise ValueError(f"{self.path}: tensor {name} is not in the header (all "
                             f"{len(self._entries)} tensors already written)")
        want, shape, dtype = self._entries[self._next]
        if name != want:
            raise ValueError(f"{self.path}: tensors must come in header order: expected {want}, got {name}")
        if tuple(raw.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name} has shape {tuple(raw.shape)}, header says {shape}")
        for block in encoded_blocks(raw, src or dtype, dtype):
            with naming_write_errors(self.path):
                self._f.write(memoryview(block).cast("B"))
        self._next += 1

    def close(self) -> None:
        """Finish the file; it must hold every tensor of its header."""
        with naming_write_errors(self.path):
            self._f.close()
        if self._next != len(self._entries):
            raise RuntimeError(f"{self.path}: only {self._next}/{len(self._entries)} tensors written")

    def abort(self) -> None:
        try:
            self._f.close()
        except OSError:                               # flushing onto a full disk: the file is dropped anyway
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_safetensors(path: str, arrays: Dict[str, np.ndarray], metadata=None) -> None:
    """Write `encode_tensor` outputs (uint16 = bfloat16 bits) to `path`, never half-written."""
    entries = [(n, a.shape, "bfloat16" if a.dtype == np.uint16 else a.dtype.name) for n, a in arrays.items()]
    with atomic_file(path) as tmp, SafetensorsWriter(tmp, entries, metadata=metadata) as w:
        for n, a in arrays.items():
            w.write(n, a)


# ---- sharding -------------------------------------------------------------------------------
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


def parse_size(size) -> Optional[int]:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (HF's max_shard_size convention, decimal units);
    None stays None. Anything else (a word, a negative or zero size, NaN) is a ValueError
    naming the value."""
    if size is None:
        return None
    bad = ValueError(f"max_shard_size: cannot read {size!r} as a size (a positive number of bytes, or "
                     f"one with a unit: 5GB, 500MB, 2GiB)")
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise bad
    s, mult = str(size).strip().upper(), 1
    for unit, m in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                    ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            s, mult = s[: -len(unit)].strip(), m
            break
    try:
        value = float(s)
    except ValueError:
        raise bad from None
    if not math.isfinite(value) or int(value * mult) < 1:
        raise bad
    return int(value * mult)
