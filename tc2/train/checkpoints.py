"""Train-state checkpoints: a directory per step that the official HF code can also load.

    out_dir/step_00000200/
        config.json, model.safetensors (or shards + index)   -- the HF layout, float32
        optimizer.safetensors                                 -- optimizer state, by tree name
        state.json                                            -- step, loss scale, data cursor,
                                                                 configs, file sizes
One format at every scale: under msrun each process holding a part nobody else holds (a tp
slice or pipeline stage: its dp = cp = 0 replica; under ZeRO-1 each rank's optimizer rows)
writes it to `.shards-step_N/rank_{r}/` with a `shard.json` saying which part, and rank 0
merges them tensor by tensor into the same full directory a single process writes, so `load_hf`,
`predict.py` and the official code read it, and a run resumes from it under any layout (each
process reads every tensor and keeps its slice). A checkpoint is written into a hidden temp
directory next to its final name, flushed, and renamed into place, so a crash never leaves a
`step_*` directory half-written. `state.json` lists every file with its size;
`validate_checkpoint` checks those and every safetensors header, so a truncated or tampered
directory is refused with an error that names it, and `latest_checkpoint` falls back to the
newest complete one. Weights stay float32: resuming continues bit-exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import mindspore as ms
import numpy as np

from tc2.checkpoint.convert import convert_checkpoint
from tc2.checkpoint.hf import load_hf, write_hf_dir
from tc2.checkpoint.names import hf_name
from tc2.checkpoint.reader import Reader, read_slices
from tc2.checkpoint.safetensors import SafetensorsFile, SafetensorsWriter, np_dtype, read_header
from tc2.config import ModelConfig
from tc2.context import LOCAL, ParallelContext
from tc2.files import atomic_file, fsync_path, left_by_dead_writer, write_json_atomic, writer_tag
from tc2.model import param_specs
from tc2.optim import GradientTransformation
from tc2.parallel.sharding import first_layer, global_name, leaf_slice, local_slices, shadowed_param
from tc2.step import TrainState
from tc2.update import zero_rows, zero_slice
from tc2.tree import tree_flatten_with_names, tree_unflatten_from_names

FORMAT = "tc2.train_state"
VERSION = 1
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
SHARD_INFO = "shard.json"   # in a process's shard directory: its tp rank and ZeRO rank
LEGACY_PREFIX = "1."        # tc2 <= 0.1 saved chain(clip_by_global_norm, adamw): AdamW's state was leaf 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^\.(?:tmp|old)-step_\d+-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


class CheckpointError(ValueError):
    """A checkpoint directory that is incomplete, corrupt, or does not match the run."""


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{int(step):08d}")


# --------------------------------------------------------------------------- save


def save_checkpoint(directory: str, state: TrainState, cfg: ModelConfig, *, ctx: ParallelContext = LOCAL,
                    meta: Optional[Dict[str, Any]] = None, keep: Optional[int] = None,
                    max_shard_size=None) -> str:
    """Write `state` as `directory/step_{step:08d}` (atomically) -> its path. Under msrun every
    process calls this with its local state (see the module docstring).

    `meta`: JSON-serialisable extras stored in state.json (data-iterator cursor, train
    config, last metrics, ...). `keep`: afterwards delete all but the newest `keep` complete
    checkpoints in `directory`. An existing checkpoint of the same step is replaced.
    """
    step = int(state.step.asnumpy()) if isinstance(state.step, ms.Tensor) else int(state.step)
    tensors = _Tensors(tree_flatten_with_names(state.params), tree_flatten_with_names(state.opt_state), cfg)
    if ctx.size == 1:
        return _commit(directory, step, cfg, tensors, state.loss_scale, meta, keep, max_shard_size)
    shards = os.path.join(directory, f".shards-step_{step:08d}")
    mine = os.path.join(shards, f"rank_{ctx.rank}")
    offset = first_layer(cfg, ctx)
    if ctx.writes_shard or ctx.zero_size > 1:
        os.makedirs(mine, exist_ok=True)
        write_json_atomic(os.path.join(mine, SHARD_INFO), {"tp": ctx.tp_rank, "zero": ctx.zero_rank})
        if ctx.writes_shard:                  # one replica of each tp slice of each stage's weights
            _write_flat(os.path.join(mine, "params.safetensors"), _global(tensors.params, offset))
        _write_flat(os.path.join(mine, OPTIMIZER_FILE), _global(tensors.opt, offset))   # ZeRO: its rows
    ctx.barrier()
    if ctx.is_main:
        with _MergedShards(shards, cfg, ctx) as tensors:
            _commit(directory, step, cfg, tensors, state.loss_scale, meta, keep, max_shard_size)
        shutil.rmtree(shards, ignore_errors=True)
    ctx.barrier()
    return checkpoint_path(directory, step)


def _global(flat: Dict[str, ms.Tensor], offset: int) -> Dict[str, ms.Tensor]:
    """A pipeline stage's names as the model's (layer indices + the stage's first layer)."""
    return {global_name(n, offset): t for n, t in flat.items()}


class _Tensors:
    """The tensors of one checkpoint, copied to the host one at a time as they are written:
    model weights by tc2 name, optimizer leaves by tree name."""

    def __init__(self, params: Dict[str, ms.Tensor], opt: Dict[str, ms.Tensor], cfg: ModelConfig):
        self.params, self.opt, self.cfg = params, opt, cfg

    def hf_arrays(self):
        for n in tree_flatten_with_names(param_specs(self.cfg)):
            yield hf_name(n), _numpy(self.params[n])

    def opt_entries(self):
        return _entries(self.opt)

    def opt_array(self, name: str) -> np.ndarray:
        return _numpy(self.opt[name])


def _entries(flat: Dict[str, ms.Tensor]):
    return [(n, tuple(t.shape), "int32" if t.dtype == ms.int32 else "float32") for n, t in flat.items()]


def _write_flat(path: str, flat: Dict[str, ms.Tensor], metadata=None) -> None:
    """A flat dict of float32/int32 Tensors as one safetensors file, a tensor at a time, atomically."""
    entries = _entries(flat)
    with atomic_file(path) as part, SafetensorsWriter(part, entries, metadata=metadata) as w:
        for name, _, _ in entries:
            w.write(name, _numpy(flat[name]))


class _MergedShards(_Tensors, Reader):
    """Full tensors assembled from every process's shard files, one tensor at a time.

    Each file holds some tensors (a pipeline stage's layers), a tp slice of each (heads, ffn
    columns, vocabulary rows) and, for optimizer state under ZeRO-1, a rank's rows of that
    slice. A tensor is put together rows first (ZeRO ranks, in order), then tp slices along the
    dimension where a tp slice's shape differs from the full one.
    """

    def __init__(self, shards: str, cfg: ModelConfig, ctx: ParallelContext):
        self.cfg, self.files = cfg, []
        self.full = {n: tuple(s.shape) for n, s in tree_flatten_with_names(param_specs(cfg)).items()}
        self.tp_shape = {n: s.shape for n, s in
                         local_slices(cfg, ParallelContext(tp=ctx.tp, rank=0)).items()}   # tp rank 0, pp 1
        self.where: Dict[str, Dict[str, Dict[Tuple[int, int], SafetensorsFile]]] = {"params": {}, "opt": {}}
        with self.closing_on_error():
            for d in sorted(os.listdir(shards)):
                with open(os.path.join(shards, d, SHARD_INFO), encoding="utf-8") as f:
                    info = json.load(f)
                for kind, file in (("params", "params.safetensors"), ("opt", OPTIMIZER_FILE)):
                    path = os.path.join(shards, d, file)
                    if os.path.isfile(path):
                        sf = SafetensorsFile(path)
                        self.files.append(sf)
                        for n in sf.header:
                            self.where[kind].setdefault(n, {})[(info["tp"], info["zero"])] = sf

    def _assemble(self, kind: str, name: str) -> np.ndarray:
        held = self.where[kind][name]
        param = shadowed_param(name, self.full)
        tp_ranks = sorted({t for t, _ in held})
        per_tp = []
        for t in tp_ranks:
            parts = [(held[k], name) for k in sorted(k for k in held if k[0] == t)]
            local, dtype = parts[0][0].shape_dtype(name)
            want = local if param is None else tuple(self.tp_shape[param])
            if local[:1] != want[:1]:                    # ZeRO rows of this tp slice
                per_tp.append(read_slices(parts, want, np_dtype(dtype), 0))
            else:
                per_tp.append(parts[0][0].read(name))
        full = per_tp[0].shape if param is None else self.full[param]
        diff = [d for d, (a, b) in enumerate(zip(per_tp[0].shape, full)) if a != b]
        return per_tp[0] if not diff else np.concatenate(per_tp, axis=diff[0])

    def hf_arrays(self):
        for n in self.full:
            yield hf_name(n), self._assemble("params", n)

    def opt_entries(self):
        out = []
        for n, held in self.where["opt"].items():
            local, dtype = next(iter(held.values())).shape_dtype(n)
            param = shadowed_param(n, self.full)
            out.append((n, local if param is None else self.full[param], dtype))
        return out

    def opt_array(self, name: str) -> np.ndarray:
        return self._assemble("opt", name)

    def close(self) -> None:
        for f in self.files:
            f.close()


def _commit(directory: str, step: int, cfg: ModelConfig, tensors: _Tensors, loss_scale, meta, keep,
            max_shard_size) -> str:
    """Write the step directory from full tensors into a temp dir, then rename it into place."""
    os.makedirs(directory, exist_ok=True)
    _remove_stale_temps(directory)
    final = checkpoint_path(directory, step)
    tmp = os.path.join(directory, f".tmp-step_{step:08d}-{writer_tag()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        write_hf_dir(tensors.hf_arrays(), cfg, tmp, dtype="float32", max_shard_size=max_shard_size)
        entries = tensors.opt_entries()
        with atomic_file(os.path.join(tmp, OPTIMIZER_FILE)) as part:
            with SafetensorsWriter(part, entries, metadata={"format": FORMAT}) as w:
                for name, _, _ in entries:
                    w.write(name, tensors.opt_array(name))               # one tensor at a time
        files = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
        record = {
            "format": FORMAT, "version": VERSION, "step": step,
            "loss_scale": None if loss_scale is None else {
                "scale": float(loss_scale["scale"].asnumpy()),
                "good_steps": int(loss_scale["good_steps"].asnumpy())},
            "model_config": dataclasses.asdict(cfg),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
            **(meta or {}),
        }
        write_json_atomic(os.path.join(tmp, STATE_FILE), record)
        for f in os.listdir(tmp):
            fsync_path(os.path.join(tmp, f))
        fsync_path(tmp)
        trash = None
        if os.path.exists(final):
            trash = os.path.join(directory, f".old-step_{step:08d}-{writer_tag()}")
            os.replace(final, trash)
        os.replace(tmp, final)
        fsync_path(directory)
        if trash:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune_checkpoints(directory, keep)
    return final


def _numpy(t) -> np.ndarray:
    a = t.asnumpy() if isinstance(t, ms.Tensor) else np.asarray(t)
    if a.dtype not in (np.float32, np.int32):
        raise TypeError(f"train-state leaves must be float32 or int32, got {a.dtype}")
    return np.array(a, order="C", copy=True)           # (ascontiguousarray makes 0-d 1-d)


def _remove_stale_temps(directory: str) -> None:
    """Temp (and replaced-checkpoint) dirs left by a crashed writer of this host whose pid is gone."""
    for name in os.listdir(directory):
        m = _TMP_DIR.match(name)
        if m and left_by_dead_writer(m.group("host"), int(m.group("pid"))):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


# --------------------------------------------------------------------------- inspect


def validate_checkpoint(path: str) -> dict:
    """The parsed state.json of a complete checkpoint, or CheckpointError naming the problem."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no checkpoint directory")
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise CheckpointError(f"{path}: incomplete checkpoint ({STATE_FILE} is missing)")
    try:
        with open(state_file, encoding="utf-8") as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_file}: corrupt ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{state_file}: not a tc2 train-state file (format "
                              f"{record.get('format') if isinstance(record, dict) else None!r})")
    if record.get("version", 0) > VERSION:
        raise CheckpointError(f"{state_file}: written by a newer tc2 (version {record['version']})")
    for key in ("step", "files", "model_config"):
        if key not in record:
            raise CheckpointError(f"{state_file}: missing key {key!r}")
    for name, size in record["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: incomplete checkpoint ({name} is missing)")
        actual = os.path.getsize(file)
        if actual != size:
            raise CheckpointError(f"{file}: {actual} bytes, state.json recorded {size} "
                                  "(truncated or modified)")
        if name.endswith(".safetensors"):
            try:
                read_header(file)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
    for needed in ("config.json", OPTIMIZER_FILE):
        if needed not in record["files"]:
            raise CheckpointError(f"{state_file}: lists no {needed}")
    return record


def list_checkpoints(directory: str) -> List[Tuple[int, str]]:
    """[(step, path)] of every `step_*` directory (complete or not), oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(directory, name)):
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


def latest_checkpoint(directory: str) -> Tuple[Optional[str], List[str]]:
    """(path of the newest complete checkpoint or None, [why each newer one was refused])."""
    refused = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            validate_checkpoint(path)
            return path, refused
        except CheckpointError as e:
            refused.append(str(e))
    return None, refused


def prune_checkpoints(directory: str, keep: int) -> List[str]:
    """Delete all but the newest `keep` complete checkpoints -> deleted paths. Incomplete
    directories are left for the user to inspect."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    complete = []
    for _, path in list_checkpoints(directory):
        try:
            validate_checkpoint(path)
            complete.append(path)
        except CheckpointError:
            continue
    doomed = complete[:-keep]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def export_training_checkpoint(src: str, dest: str, **kwargs):
    """The weights of a tc2 training checkpoint -> an HF directory (`kwargs`: dtype,
    max_shard_size, progress of `convert_checkpoint`). `src` is a `step_*` directory, or a run
    directory whose newest complete one is taken; either is first checked against the file
    sizes in its state.json."""
    path = src
    if list_checkpoints(src):
        path, refused = latest_checkpoint(src)
        if path is None:
            raise ValueError(f"{src}: no complete step_* checkpoint ({refused[0]})")
    validate_checkpoint(path)
    return convert_checkpoint(path, dest, to="hf", expect=("hf",), **kwargs)


# --------------------------------------------------------------------------- load


def load_checkpoint(path: str, optimizer: GradientTransformation, *,
                    expect_config: Optional[ModelConfig] = None,
                    ctx: ParallelContext = LOCAL) -> Tuple[TrainState, ModelConfig, dict]:
    """-> (TrainState of this process's shards, ModelConfig, state.json record). The optimizer
    gives the state's structure (its `init` runs once on the loaded params); names, shapes and
    dtypes must match. `expect_config`: refuse a checkpoint of a different architecture (dtype
    may differ). A checkpoint written at any scale loads at any scale."""
    record = validate_checkpoint(path)
    saved = record["model_config"]
    try:
        cfg = ModelConfig(**saved)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/{STATE_FILE}: bad model_config ({e})") from None
    if expect_config is not None:
        diff = {k: (v, getattr(expect_config, k)) for k, v in dataclasses.asdict(cfg).items()
                if k != "dtype" and getattr(expect_config, k) != v}
        if diff:
            raise CheckpointError(f"{path}: model config differs from this run's "
                                  f"(saved, expected): {diff}")
        cfg = cfg.replace(dtype=expect_config.dtype)
    try:
        params, _ = load_hf(path, ctx=ctx)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise CheckpointError(f"{path}: weights do not load ({e})") from None
    like = optimizer.init(zero_slice(params, ctx))                 # this process's state structure
    opt_state = tree_unflatten_from_names(like, _read_state(path, tree_flatten_with_names(like), cfg, ctx))
    ls = record.get("loss_scale")
    loss_scale = None if ls is None else {"scale": ms.Tensor(float(ls["scale"]), ms.float32),
                                          "good_steps": ms.Tensor(int(ls["good_steps"]), ms.int32)}
    state = TrainState(params=params, opt_state=opt_state, step=ms.Tensor(int(record["step"]), ms.int32),
                       loss_scale=loss_scale)
    return state, cfg, record


def _read_state(path: str, like_flat: Dict[str, ms.Tensor], cfg: ModelConfig, ctx: ParallelContext) -> dict:
    """This process's optimizer-state leaves from the full state in the checkpoint: its stage's
    tensors, cut to its tp slice, then to its ZeRO rows; names, shapes and dtypes checked."""
    slices = local_slices(cfg, ctx) if ctx.tp > 1 or ctx.pp > 1 else {}
    offset = first_layer(cfg, ctx)
    file = os.path.join(path, OPTIMIZER_FILE)
    flat = {}
    with SafetensorsFile(file) as f:
        stored = {n: global_name(n, offset) for n in like_flat}
        if all(LEGACY_PREFIX + g in f.header and g not in f.header for g in stored.values()):
            stored = {n: LEGACY_PREFIX + g for n, g in stored.items()}     # chain(clip, adamw) state
        missing = sorted(set(stored.values()) - set(f.header))
        if missing or (ctx.size == 1 and set(f.header) != set(stored.values())):
            extra = sorted(set(f.header) - set(stored.values()))
            raise CheckpointError(f"{file}: optimizer state does not match this optimizer "
                                  f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for name, ref in like_flat.items():
            a = f.get(stored[name])
            shard = leaf_slice(name, slices)
            if shard is not None:
                a = a[shard.index]
            if zero_rows(a.shape, ctx):
                n = a.shape[0] // ctx.zero_size
                a = a[ctx.zero_rank * n:(ctx.zero_rank + 1) * n]
            if tuple(a.shape) != tuple(ref.shape) or np.dtype(a.dtype) != _np_dtype(ref):
                raise CheckpointError(f"{file}: {stored[name]} is {a.dtype}{list(a.shape)}, expected "
                                      f"{_np_dtype(ref)}{list(ref.shape)}")
            flat[name] = ms.Tensor(np.array(a, order="C", copy=True))
    return flat


def _np_dtype(t) -> np.dtype:
    return np.dtype(np.int32) if t.dtype == ms.int32 else np.dtype(np.float32)
