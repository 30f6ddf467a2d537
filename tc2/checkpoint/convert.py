"""Checkpoint conversion and comparison, streamed tensor by tensor.

Every format opens as the same kind of reader (a `tc2.checkpoint.reader.Reader`): `tensors`
({HF name: (full shape, stored dtype)} in tree order), `config`, and `read(name)` -> that one
tensor, raw (bfloat16 as uint16 bits). Formats: an HF directory (also a tc2 training checkpoint,
whose weights sit at its top level in HF layout), a lone `.safetensors`, a MindFormers `.ckpt`
or `rank_*/` directory (`tc2.checkpoint.mindformers`), and tc2's tensor-parallel directory:

    tp_layout.json            {"format": "tc2-tp", "tp": N, "tensors": {name: {shape, split_dim}}}
    config.json               the HF config of the full model
    rank_{r}/model.safetensors  rank r's slice of every tensor, HF names

split along `tc2.parallel.sharding.split_dim` (heads / ffn / vocab rows, dense / down_proj
columns); merged back by `tc2.checkpoint.reader.read_slices`.

Every tensor is read, converted (in 16 MB blocks) and written on its own, so peak memory is
about the largest tensor: safetensors go through `tc2.checkpoint.safetensors` (header-first
writer, `readinto` reader), `.ckpt` files through `tc2.checkpoint.ms_ckpt`, HF directories
through `tc2.checkpoint.hf.write_hf_tensors` (as `save_hf` does). Outputs are complete or
absent: files are written under temporary names and renamed in only when all are done
(`tc2.files.StagedDir`).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from tc2.checkpoint.hf import INDEX, SINGLE, check_hf_layout, hf_shapes, hf_tensor_files, write_hf_tensors
from tc2.checkpoint.mindformers import MindFormersCheckpoint, refuse_unknown, resolve_config
from tc2.checkpoint.ms_ckpt import write_ckpt
from tc2.checkpoint.names import mf_name
from tc2.checkpoint.reader import Reader, read_slices
from tc2.checkpoint.safetensors import (WEIGHT_DTYPES, SafetensorsFile, SafetensorsWriter, nbytes, np_dtype,
                                        parse_size, read_header, to_float32)
from tc2.config import ModelConfig
from tc2.files import StagedDir, make_dirs, remove_empty_dirs
from tc2.parallel.sharding import split_dim

LAYOUT = "tp_layout.json"


def _rank_shape(shape: Tuple[int, ...], dim: Optional[int], tp: int) -> Tuple[int, ...]:
    """The shape of one rank's slice of a tensor split `tp` ways along `dim` (None: replicated)."""
    return tuple(s // tp if d == dim else s for d, s in enumerate(shape))


# ---- reading ------------------------------------------------------------------------------------
def _weight(f: SafetensorsFile, name: str) -> Tuple[Tuple[int, ...], str]:
    """(shape, dtype) of a model weight in `f`: float32, float16 or bfloat16."""
    shape, dtype = f.shape_dtype(name)
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{f.path}: tensor {name} is {dtype}, not a float weight")
    return shape, dtype


class HFCheckpoint(Reader):
    """An HF TeleChat2 directory (or a tc2 training checkpoint, or one .safetensors file)."""

    kind = "hf"

    def __init__(self, path: str, *, config=None, n_head: Optional[int] = None, seq_length: Optional[int] = None,
                 **_):
        self.path = path
        single = os.path.isfile(path)
        files = {n: path for n in read_header(path)} if single else hf_tensor_files(path)
        self._files = {}
        with self.closing_on_error():
            for file in sorted(set(files.values())):
                self._files[file] = SafetensorsFile(file)
            self._where = {}
            for name, file in files.items():
                if name not in self._files[file].header:
                    raise KeyError(f"{file}: the index lists tensor {name}, but the file does not hold it")
                self._where[name] = self._files[file]
            shapes = {n: _weight(f, n)[0] for n, f in self._where.items()}
            if config is None and not single and os.path.isfile(os.path.join(path, "config.json")):
                config = path
            self.config, self.unknown = resolve_config(shapes, path, config=config, n_head=n_head,
                                                       seq_length=seq_length)
            self.tensors = {n: self._where[n].shape_dtype(n) for n in hf_shapes(self.config)}

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(name)

    def close(self):
        for f in self._files.values():
            f.close()


class TPCheckpoint(Reader):
    """tc2's tensor-parallel directory (see the module docstring), read back as full tensors."""

    kind = "tc2-tp"
    unknown = ()

    def __init__(self, path: str, **_):
        self.path = path
        layout_path = os.path.join(path, LAYOUT)
        tp, self._layout = _read_tp_layout(layout_path)
        self.config = ModelConfig.from_hf(path)
        check_hf_layout(self.config, {n: s for n, (s, _) in self._layout.items()}, layout_path)
        self._ranks: List[SafetensorsFile] = []
        with self.closing_on_error():
            for r in range(tp):
                rank = SafetensorsFile(os.path.join(path, f"rank_{r}", SINGLE))
                self._ranks.append(rank)
                if set(rank.header) != set(self._layout):
                    diff = sorted(set(rank.header) ^ set(self._layout))
                    raise KeyError(f"{rank.path}: tensor names differ from {LAYOUT}, e.g. {diff[0]}")
                for n, (shape, dim) in self._layout.items():
                    want = _rank_shape(shape, dim, tp)
                    if _weight(rank, n)[0] != want:
                        raise ValueError(f"{rank.path}: tensor {n} has shape {rank.shape_dtype(n)[0]}, but "
                                         f"{LAYOUT} implies {want} (1/{tp} of {shape} on dim {dim})")
            self.tensors = {n: (self._layout[n][0], self._ranks[0].shape_dtype(n)[1])
                            for n in hf_shapes(self.config)}

    def read(self, name: str) -> np.ndarray:
        shape, dim = self._layout[name]
        if dim is None:                       # replicated: every rank must agree
            first = self._ranks[0].read(name)
            for rank in self._ranks[1:]:
                if not np.array_equal(rank.read(name), first):
                    raise ValueError(f"{rank.path}: replicated tensor {name} differs from rank_0's")
            return first
        parts = [(rank, name) for rank in self._ranks]
        return read_slices(parts, shape, np_dtype(self.tensors[name][1]), dim)

    def close(self):
        for f in self._ranks:
            f.close()


def _read_tp_layout(layout_path: str) -> Tuple[int, Dict[str, Tuple[Tuple[int, ...], Optional[int]]]]:
    """(tp, {name: (full shape, split dim or None)}) of a tp_layout.json, every JSON type checked."""
    def bad(why):
        return ValueError(f"{layout_path}: not a tc2 tensor-parallel layout ({why})")
    try:
        with open(layout_path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(e) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), dict):
        raise bad('no "tensors" object')
    tp = doc.get("tp")
    if type(tp) is not int or tp < 1:
        raise bad(f'"tp" must be a positive int, got {tp!r}')
    layout = {}
    for name, spec in doc["tensors"].items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        dim = spec.get("split_dim") if isinstance(spec, dict) else None
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or
                not (dim is None or (type(dim) is int and 0 <= dim < len(shape)))):
            raise bad(f"tensor {name}: {spec!r}")
        layout[name] = (tuple(shape), dim)
    return tp, layout


def open_checkpoint(path: str, **hints):
    """A reader for any supported format, detected from what `path` holds.

    hints: n_head, mf_yaml, config (ModelConfig or config.json), pattern (per-rank .ckpt glob),
    seq_length (the sequence lengths of a non-release size when no yaml or config gives them).
    """
    if os.path.isfile(path):
        if path.endswith(".ckpt"):
            return MindFormersCheckpoint(path, **hints)
        if path.endswith(".safetensors"):
            return HFCheckpoint(path, **hints)
        raise ValueError(f"{path}: not a .ckpt or .safetensors file")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    entries = sorted(os.listdir(path))
    if LAYOUT in entries:
        return TPCheckpoint(path)
    if SINGLE in entries or INDEX in entries:
        return HFCheckpoint(path, **hints)
    if any(e.startswith("rank_") for e in entries) or any(e.endswith(".ckpt") for e in entries):
        return MindFormersCheckpoint(path, **hints)
    raise FileNotFoundError(f"{path}: no checkpoint found (expected {SINGLE}, {INDEX}, {LAYOUT}, "
                            f"rank_*/ or *.ckpt; found {entries[:8]})")


# ---- writing --------------------------------------------------------------------------------------
class Progress:
    """A one-line progress report on stderr: tensors, MB, MB/s, ETA (redrawn on a terminal,
    a line every few seconds in a log)."""

    def __init__(self, label: str, total_bytes: int, total_tensors: int, *, stream=None, enabled=True):
        self.label, self.total, self.count = label, total_bytes, total_tensors
        self.stream = stream or sys.stderr
        self.enabled, self.tty = enabled, getattr(self.stream, "isatty", lambda: False)()
        self.done = self.n = 0
        self.t0 = self._last = time.perf_counter()

    def update(self, name: str, nbytes: int) -> None:
        self.n, self.done = self.n + 1, self.done + nbytes
        now = time.perf_counter()
        if self.enabled and (self.tty or now - self._last >= 5.0 or self.n == self.count):
            self._last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            line = (f"{self.label}: {self.n}/{self.count} tensors  {self.done / 1e6:,.1f}/"
                    f"{self.total / 1e6:,.1f} MB  {rate / 1e6:,.1f} MB/s  ETA {eta:.0f}s")
            end = "\n" if not self.tty or self.n == self.count else ""
            print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """tp must divide the heads (whole q and k/v heads per rank), the ffn and the vocab."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive int, got {tp!r}")
    for what, n in (("n_head", cfg.n_head), ("num_key_value_heads", cfg.num_key_value_heads),
                    ("ffn_hidden_size", cfg.ffn_hidden_size), ("vocab_size", cfg.vocab_size)):
        if n % tp:
            raise ValueError(f"tp={tp} does not divide {what}={n}: each rank must hold whole heads / "
                             f"equal slices")


def _write_tp(ck, dest: str, tp: int, dtype: str, progress: Progress) -> None:
    cfg = ck.config
    check_tp(cfg, tp)
    dims = {n: split_dim(n) for n in ck.tensors}
    entries = [(n, _rank_shape(shape, dims[n], tp), dtype) for n, (shape, _) in ck.tensors.items()]
    with StagedDir(dest) as stage, contextlib.ExitStack() as files:
        writers = [files.enter_context(SafetensorsWriter(stage.file(f"rank_{r}/{SINGLE}"), entries))
                   for r in range(tp)]
        for n, (shape, src) in ck.tensors.items():
            raw = ck.read(n)
            slices = [raw] * tp if dims[n] is None else np.split(raw, tp, axis=dims[n])     # views
            for w, piece in zip(writers, slices):
                w.write(n, piece, src)
            del raw, slices
            progress.update(n, nbytes(shape, dtype))
        files.close()                                 # completes every rank's file (or raises)
        stage.json(LAYOUT, {"format": "tc2-tp", "version": 1, "tp": tp, "dtype": dtype,
                            "files": f"rank_{{rank}}/{SINGLE}",
                            "tensors": {n: {"shape": list(s), "split_dim": dims[n]} for n, (s, _) in
                                        ck.tensors.items()}})
        stage.json("config.json", {**cfg.to_hf(), "torch_dtype": dtype})
        stage.commit(stale=[os.path.join(e, SINGLE) for e in stage.existing()
                            if e.startswith("rank_") and e[5:].isdigit() and int(e[5:]) >= tp])


# ---- the conversions ---------------------------------------------------------------------------------
FORMATS = ("hf", "mf", "tp")


@dataclass(frozen=True)
class Converted:
    """What `convert_checkpoint` did: the model config, the source kind, tensors and bytes
    written, and the source entries that were not weights (e.g. MindFormers optimizer state)."""
    config: ModelConfig
    source: str
    source_kind: str
    tensors: int
    nbytes: int
    seconds: float
    ignored: Tuple[str, ...] = ()


def convert_checkpoint(src: str, dest: str, *, to: str, dtype: str = "float32", max_shard_size=None,
                       tp: Optional[int] = None, expect: Tuple[str, ...] = (), progress: bool = True,
                       **hints) -> Converted:
    """Convert checkpoint `src` (any format, detected) into `dest` as `to`:

    "hf": an HF directory (config.json + model.safetensors, or shards of at most
          `max_shard_size` ("5GB", bytes) + model.safetensors.index.json);
    "mf": a MindFormers `.ckpt` file; "tp": a tc2 tensor-parallel directory of `tp` ranks.
    `expect`: source kinds accepted ("hf", "mindformers", "tc2-tp"); `hints` as `open_checkpoint`.
    Reads and writes one tensor at a time; `dest` ends up complete or untouched.
    """
    if to not in FORMATS:
        raise ValueError(f"to must be one of {FORMATS}, got {to!r}")
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
    parse_size(max_shard_size)                      # a bad size fails before any work
    if os.path.exists(dest) and os.path.realpath(dest) == os.path.realpath(src):
        raise ValueError(f"destination {dest} is the source: write to a new path")
    with open_checkpoint(src, **hints) as ck:
        if expect and ck.kind not in expect:
            raise ValueError(f"{src} is a {ck.kind} checkpoint; this conversion reads {' or '.join(expect)}")
        if to in ("hf", "tp"):                          # these write a config.json
            refuse_unknown(ck.unknown, ck.config, src)
        total = sum(nbytes(s, dtype) for s, _ in ck.tensors.values())
        prog = Progress(f"{ck.kind} -> {to} {os.path.basename(os.path.normpath(dest))}", total,
                        len(ck.tensors), enabled=progress)
        if to == "mf":
            if not dest.endswith(".ckpt"):
                raise ValueError(f"a MindFormers checkpoint is one file: {dest} should end with .ckpt")
            created = make_dirs(os.path.dirname(dest)) if os.path.dirname(dest) else []
            try:
                write_ckpt(dest, ((mf_name(n), ck.read(n), d) for n, (_, d) in ck.tensors.items()),
                           dtype=dtype, on_tensor=prog.update)
            except BaseException:
                remove_empty_dirs(created)               # a failed conversion leaves no new directories
                raise
        elif to == "hf":
            write_hf_tensors(((n, ck.read(n), src) for n, (_, src) in ck.tensors.items()), ck.config, dest,
                             dtype=dtype, max_shard_size=max_shard_size, order=list(ck.tensors),
                             on_tensor=prog.update)
        else:
            if tp is None:
                raise ValueError("to='tp' needs tp (the number of tensor-parallel ranks)")
            _write_tp(ck, dest, tp, dtype, prog)
        return Converted(ck.config, src, ck.kind, len(ck.tensors), total, time.perf_counter() - prog.t0,
                         tuple(getattr(ck, "ignored", ())))


# ---- verify -------------------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    """The comparison of two checkpoints: per-tensor max |a - b| and what does not line up."""
    a: str
    b: str
    atol: float
    diffs: Dict[str, float] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)            # in a, not in b
    extra: List[str] = field(default_factory=list)              # in b, not in a
    shapes: Dict[str, Tuple[tuple, tuple]] = field(default_factory=dict)

    @property
    def mismatched(self) -> List[str]:
        return [n for n, d in self.diffs.items() if not d <= self.atol]        # NaN counts as a mismatch

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.shapes or self.mismatched)

    def lines(self) -> List[str]:
        out = [f"{'tensor':<56} {'max|a-b|':>12}"]
        out += [f"{n:<56} {d:>12.6g}{'  MISMATCH' if not d <= self.atol else ''}" for n, d in self.diffs.items()]
        out += [f"{n:<56} shape {sa} vs {sb}  MISMATCH" for n, (sa, sb) in self.shapes.items()]
        out += [f"missing from {self.b}: {n}" for n in self.missing]
        out += [f"extra in {self.b}: {n}" for n in self.extra]
        worst = max(self.diffs.values(), default=0.0)
        out.append(f"{'OK' if self.ok else 'MISMATCH'}: {len(self.diffs)} tensors compared, max |a-b| "
                   f"{worst:.6g} (atol {self.atol:g}), {len(self.mismatched)} over, {len(self.shapes)} "
                   f"misshaped, {len(self.missing)} missing, {len(self.extra)} extra")
        return out


def max_abs_diff(a: np.ndarray, dtype_a: str, b: np.ndarray, dtype_b: str) -> float:
    """max |a - b| in float64, block by block; NaN where both are NaN counts as equal, else inf."""
    worst = 0.0
    fa, fb = a.reshape(-1), b.reshape(-1)
    step = 1 << 22
    for i in range(0, fa.size, step):
        x = to_float32(fa[i:i + step], dtype_a).astype(np.float64)
        y = to_float32(fb[i:i + step], dtype_b).astype(np.float64)
        with np.errstate(invalid="ignore"):
            d = np.abs(x - y)
        both_nan, same_inf = np.isnan(x) & np.isnan(y), (x == y)
        d = np.where(both_nan | same_inf, 0.0, np.where(np.isnan(d), np.inf, d))
        worst = max(worst, float(d.max(initial=0.0)))
    return worst


def verify_checkpoints(a: str, b: str, *, atol: float = 0.0, **hints) -> VerifyReport:
    """Compare two checkpoints of any formats tensor by tensor (HF names); `hints` go to both."""
    report = VerifyReport(a, b, atol)
    with open_checkpoint(a, **hints) as ca, open_checkpoint(b, **hints) as cb:
        report.missing = [n for n in ca.tensors if n not in cb.tensors]
        report.extra = [n for n in cb.tensors if n not in ca.tensors]
        for n, (shape, da) in ca.tensors.items():
            if n not in cb.tensors:
                continue
            sb, db = cb.tensors[n]
            if tuple(shape) != tuple(sb):
                report.shapes[n] = (tuple(shape), tuple(sb))
                continue
            report.diffs[n] = max_abs_diff(ca.read(n), da, cb.read(n), db)
    return report
