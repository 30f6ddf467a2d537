"""MindSpore `.ckpt` files, read and written one tensor at a time.

A `.ckpt` is a run of protobuf `Checkpoint` messages of one `Value` each (a tag and a
TensorProto: dims, type name, raw bytes; MindSpore cuts tensors above 512 MB into consecutive
values with the same tag, and may append a 17-byte `crc_num` trailer). `ms.load_checkpoint`
reads the whole file into memory and parses it (about twice the file in RAM), so here a file is
indexed once (offsets only) and each tensor is read with `readinto`, and writing emits the same
records tensor by tensor: a converter holds one tensor at a time. Tests check both directions
against `ms.save_checkpoint` / `ms.load_checkpoint` (tests/test_mindformers.py).

Arrays are raw, as in `tc2.checkpoint.safetensors`: bfloat16 as uint16 bits next to a dtype
name. The MindFormers naming, config inference and rank merging on top of this is
`tc2.checkpoint.mindformers`.
"""
from __future__ import annotations

import os
import zlib
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from tc2.checkpoint.reader import Reader
from tc2.checkpoint.safetensors import WEIGHT_DTYPES, encoded_blocks, nbytes, np_dtype
from tc2.files import atomic_file, naming_write_errors

_CKPT_TYPES = {"Float32": "float32", "Float16": "float16", "BFloat16": "bfloat16", "Float64": "float64",
               "Int8": "int8", "UInt8": "uint8", "Int16": "int16", "UInt16": "uint16", "Int32": "int32",
               "UInt32": "uint32", "Int64": "int64", "UInt64": "uint64", "Bool": "bool"}
_CKPT_TYPE_OF = {v: k for k, v in _CKPT_TYPES.items()}
RECORD_BYTES = 512 << 20                               # MindSpore's slice size for big tensors


# ---- .ckpt reading ----------------------------------------------------------------------------
def _read_varint(f, where: str) -> int:
    result = shift = 0
    while True:
        b = f.read(1)
        if not b:
            raise ValueError(f"{where}: truncated MindSpore checkpoint (ends inside a record)")
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError(f"{where}: corrupt MindSpore checkpoint (bad varint at byte {f.tell()})")


def _fields(f, start: int, end: int, where: str):
    """(field number, wire type, value) of the message at [start, end); a length-delimited
    value is given as its (offset, length) in the file, never read here."""
    pos = start
    while pos < end:
        f.seek(pos)
        key = _read_varint(f, where)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = _read_varint(f, where)
            pos = f.tell()
        elif wire == 2:
            n = _read_varint(f, where)
            value = (f.tell(), n)
            pos = f.tell() + n
        elif wire in (1, 5):
            value, pos = None, f.tell() + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"{where}: not a MindSpore checkpoint (protobuf wire type {wire} at byte "
                             f"{pos}; encrypted or another format?)")
        if pos > end:
            raise ValueError(f"{where}: truncated MindSpore checkpoint (a record at byte {pos} runs past "
                             f"the end)")
        yield field, wire, value


def _bytes(f, span) -> bytes:
    f.seek(span[0])
    return f.read(span[1])


class CkptFile(Reader):
    """One `.ckpt` indexed without reading its tensors: `entries[tag] = (shape, dtype, chunks)`."""

    def __init__(self, path: str, *, check_crc: bool = False):
        self.path = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MindSpore checkpoint not found: {path}")
        self._f = open(path, "rb")
        with self.closing_on_error():
            self.entries = self._index(check_crc)

    def _index(self, check_crc: bool) -> Dict[str, tuple]:
        f, size = self._f, os.fstat(self._f.fileno()).st_size
        end = size
        f.seek(max(size - 17, 0))
        tail = f.read(17)
        if len(tail) == 17 and tail[:7] == b"crc_num":
            end = size - 17
            if check_crc:
                f.seek(0)
                crc, left = 0, end
                while left:
                    chunk = f.read(min(left, 1 << 24))
                    crc, left = zlib.crc32(chunk, crc), left - len(chunk)
                if crc != int.from_bytes(tail[7:], "big"):
                    raise ValueError(f"{self.path}: CRC mismatch: the checkpoint file is corrupt")
        entries: Dict[str, list] = {}
        last = None
        for field, wire, span in _fields(f, 0, end, self.path):
            if field != 1 or wire != 2:
                raise ValueError(f"{self.path}: not a MindSpore checkpoint (field {field} at top level)")
            tag, tensor = None, None
            for vf, vw, vspan in _fields(f, span[0], span[0] + span[1], self.path):
                if vf == 1 and vw == 2:
                    tag = _bytes(f, vspan).decode("utf-8", "replace")
                elif vf == 2 and vw == 2:
                    tensor = vspan
            if tag is None:
                raise ValueError(f"{self.path}: corrupt MindSpore checkpoint (record at byte {span[0]} "
                                 f"has no name)")
            if tensor is None:                           # a MapTensor: not a TeleChat2 weight
                entries.setdefault(tag, [None, "map", []])
                last = tag
                continue
            dims, type_name, content = [], None, None
            for tf, tw, tval in _fields(f, tensor[0], tensor[0] + tensor[1], self.path):
                if tf == 1 and tw == 0:
                    dims.append(tval)
                elif tf == 1 and tw == 2:                # packed dims
                    dims.extend(self._packed(tval))
                elif tf == 2 and tw == 2:
                    type_name = _bytes(f, tval).decode("ascii", "replace")
                elif tf == 3 and tw == 2:
                    content = tval
            if type_name is None or content is None:
                raise ValueError(f"{self.path}: corrupt MindSpore checkpoint (tensor {tag!r} lacks its "
                                 f"type or data)")
            if tag == last:                              # MindSpore's continuation of a big tensor
                if (dims, type_name) != tuple(entries[tag][:2]):
                    raise ValueError(f"{self.path}: tensor {tag!r} is split into records that disagree on its "
                                     f"shape or type ({entries[tag][0]} {entries[tag][1]}, then {dims} "
                                     f"{type_name}): the file is corrupt")
                entries[tag][2].append(content)
            elif tag in entries:
                raise ValueError(f"{self.path}: tensor {tag!r} appears twice")
            else:
                entries[tag] = [dims, type_name, [content]]
            last = tag
        out = {}
        for tag, (dims, type_name, chunks) in entries.items():
            if type_name not in _CKPT_TYPES:             # strings, map tensors, Int4: kept by name
                out[tag] = (None, type_name, chunks)
                continue
            shape = () if dims == [0] else tuple(dims)
            dtype = _CKPT_TYPES[type_name]
            want = nbytes(shape, dtype)
            have = sum(n for _, n in chunks)
            if have != want:
                raise ValueError(f"{self.path}: tensor {tag!r} holds {have} bytes, but its shape "
                                 f"{shape} of {type_name} needs {want}: the file is truncated or corrupt")
            out[tag] = (shape, dtype, chunks)
        return out

    def _packed(self, span) -> List[int]:
        f, out = self._f, []
        f.seek(span[0])
        while f.tell() < span[0] + span[1]:
            out.append(_read_varint(f, self.path))
        return out

    def read(self, tag: str, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The tensor `tag` raw (bfloat16 as uint16 bits), read into `out` if given (contiguous)."""
        shape, dtype, chunks = self.entries[tag]
        if shape is None:
            raise ValueError(f"{self.path}: {tag!r} is a {dtype} entry, not a tensor")
        if out is None:
            out = np.empty(shape, np_dtype(dtype))
        buf, pos = memoryview(out.reshape(-1)).cast("B"), 0
        for off, n in chunks:
            self._f.seek(off)
            got = self._f.readinto(buf[pos:pos + n])
            if got != n:
                raise ValueError(f"{self.path}: truncated while reading tensor {tag!r}")
            pos += n
        return out

    def read_span(self, tag: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of tensor `tag`'s raw data (across its records)."""
        out, pos = bytearray(), 0
        for off, n in self.entries[tag][2]:
            lo, hi = max(start, pos), min(stop, pos + n)
            if lo < hi:
                self._f.seek(off + lo - pos)
                out += self._f.read(hi - lo)
            pos += n
        return bytes(out)

    def close(self):
        self._f.close()


# ---- .ckpt writing ----------------------------------------------------------------------------
def _close_quietly(f) -> None:
    try:
        f.close()
    except OSError:                                   # flushing onto a full disk: the file is dropped anyway
        pass


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(field: int, payload_len: int) -> bytes:
    """Key and length of a length-delimited field."""
    return _varint(field << 3 | 2) + _varint(payload_len)


def write_ckpt(path: str, tensors: Iterable[Tuple[str, np.ndarray, str]], *, dtype: str = "float32",
               record_bytes: int = RECORD_BYTES, on_tensor=None) -> None:
    """Stream (name, raw array, its dtype) into a `.ckpt` that `ms.load_checkpoint` reads.

    Tensors are stored as `dtype`; the file appears at `path` only once complete (temp + rename).
    `on_tensor(name, nbytes)` is called after each tensor (progress reporting).
    """
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
    item = np_dtype(dtype).itemsize
    per_record = max(record_bytes // item, 1)
    type_name = _CKPT_TYPE_OF[dtype].encode()
    with atomic_file(path) as tmp:
        with naming_write_errors(path):
            f = open(tmp, "wb")

        def put(data) -> None:
            with naming_write_errors(path):
                f.write(data)
        try:
            for name, raw, src in tensors:
                tag = name.encode()
                dims = b"".join(b"\x08" + _varint(d) for d in (raw.shape or (0,)))
                for start in range(0, max(raw.size, 1), per_record):
                    stop = min(start + per_record, raw.size)
                    n = (stop - start) * item
                    tensor_head = dims + _ld(2, len(type_name)) + type_name + _ld(3, n)
                    value_head = _ld(1, len(tag)) + tag + _ld(2, len(tensor_head) + n) + tensor_head
                    put(_ld(1, len(value_head) + n) + value_head)
                    for block in encoded_blocks(raw, src, dtype, start, stop):
                        put(memoryview(block).cast("B"))
                if on_tensor is not None:
                    on_tensor(name, raw.size * item)
        except BaseException:
            _close_quietly(f)
            raise
        with naming_write_errors(path):
            f.close()
