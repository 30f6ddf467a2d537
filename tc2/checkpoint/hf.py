"""Official Hugging Face TeleChat2 directories: config.json + (sharded) safetensors.

The tc2 parameter tree keeps HF orientation and the interleaved key_value layout, so this is
a rename (`tc2.checkpoint.names`) plus checks: every mismatch names the tensor. Reads and writes
go one tensor at a time through `tc2.checkpoint.safetensors` (a save never holds the model's
encoded bytes), and a save never leaves a directory half-written: `tc2.files.StagedDir` writes
each file under a temp name, renames them in together and only then removes stale shards.
`tc2.checkpoint.convert` writes HF and tensor-parallel directories with the same two pieces.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np

from tc2.checkpoint.names import hf_name, tc2_from_hf
from tc2.checkpoint.safetensors import (ST_DTYPES, WEIGHT_DTYPES, SafetensorsFile, SafetensorsWriter,
                                        nbytes, parse_size, plan_shards, read_header)
from tc2.config import ModelConfig
from tc2.files import StagedDir
from tc2.model import param_specs
from tc2.tree import tree_flatten_with_names, tree_unflatten_from_names

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def hf_shapes(cfg: ModelConfig) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{hf name: (shape, tc2 name)} in the tree's order."""
    flat = tree_flatten_with_names(param_specs(cfg))
    return {hf_name(n): (spec.shape, n) for n, spec in flat.items()}


def hf_tensor_files(path: str) -> Dict[str, str]:
    """{tensor name: file} for an HF dir (single file or sharded with an index)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        weight_map = _read_weight_map(index)
        for file in sorted(set(weight_map.values())):
            _check_shard_inside(index, path, file)
            if not os.path.isfile(os.path.join(path, file)):
                raise FileNotFoundError(f"{index} lists {file}, which is not in {path}")
        return {n: os.path.join(path, f) for n, f in weight_map.items()}
    single = os.path.join(path, SINGLE)
    if os.path.isfile(single):
        return {n: single for n in read_header(single)}
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*")))
    raise FileNotFoundError(f"{path}: neither {SINGLE} nor {INDEX} (found {found[:8]})")


def _read_weight_map(index: str) -> Dict[str, str]:
    """The index's weight_map {tensor name: shard file name}, its JSON types checked."""
    try:
        with open(index, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({e})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: not a safetensors index (no \"weight_map\" object)")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise ValueError(f"{index}: weight_map[{name!r}] is {file!r}, not a file name")
    return weight_map


def _check_shard_inside(index: str, path: str, file: str) -> None:
    """A shard the index names must be a file inside the checkpoint directory: no absolute path,
    no `..`, no symlink leading out of it (an index is data, not a way to open any file)."""
    root = os.path.realpath(path)
    target = os.path.realpath(os.path.join(path, file))
    if os.path.isabs(file) or target == root or os.path.commonpath([root, target]) != root:
        raise ValueError(f"{index} lists shard {file!r}, which is outside {path}: shards must be "
                         f"files inside the checkpoint directory (symlinks included)")


def check_weight_dtype(file: str, name: str, code: str) -> None:
    """Refuse a tensor stored as anything but a float weight dtype (an int64 `lm_head` would
    otherwise be cast to float and loaded as if it were weights)."""
    if ST_DTYPES.get(code) not in WEIGHT_DTYPES:
        what = f"{code} ({ST_DTYPES[code]})" if code in ST_DTYPES else repr(code)
        raise ValueError(f"{file}: tensor {name} is stored as {what}, not as a float weight "
                         f"({', '.join(WEIGHT_DTYPES)})")


def check_hf_layout(cfg: ModelConfig, found: Dict[str, Tuple[int, ...]], where: str) -> None:
    """Raise naming the first missing / unexpected / misshaped tensor against `cfg`."""
    expected = hf_shapes(cfg)
    missing = [n for n in expected if n not in found]
    extra = sorted(n for n in found if n not in expected)
    if missing:
        raise KeyError(f"{where}: missing tensor {missing[0]}" +
                       (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise KeyError(f"{where}: unexpected tensor {extra[0]} for a {cfg.n_layer}-layer config" +
                       (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, (shape, _) in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ValueError(f"{where}: tensor {name} has shape {tuple(found[name])}, but the config "
                             f"(hidden_size={cfg.hidden_size}, n_head={cfg.n_head}, num_key_value_heads="
                             f"{cfg.num_key_value_heads}, ffn_hidden_size={cfg.ffn_hidden_size}, "
                             f"vocab_size={cfg.vocab_size}) implies {tuple(shape)}")


def iter_hf_tensors(path: str, names=None) -> Iterator[Tuple[str, np.ndarray]]:
    """(hf name, numpy array; bf16 given as float32) one tensor at a time, file by file
    (only `names`, a set of hf names, when given)."""
    by_file: Dict[str, list] = {}
    for name, file in hf_tensor_files(path).items():
        if names is None or name in names:
            by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with SafetensorsFile(file) as f:
            for name in names:
                if name not in f.header:
                    raise KeyError(f"{file}: index lists tensor {name}, but the file does not hold it")
                yield name, f.get(name)


def load_hf(path: str, *, dtype=ms.float32, ctx=None, **config_overrides):
    """An official TeleChat2 HF directory -> (params pytree of ms.Tensor, ModelConfig).

    ctx: a `tc2.context.ParallelContext` under tensor parallelism: only this process's shards
    are kept (each tensor is read, sliced and dropped, so a rank never holds the whole model).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    cfg = ModelConfig.from_hf(path, **config_overrides)
    files = hf_tensor_files(path)
    shapes = {}
    for file in sorted(set(files.values())):
        for name, meta in read_header(file).items():
            shapes[name] = meta["shape"]
            if files.get(name) == file:
                check_weight_dtype(file, name, meta["dtype"])
    check_hf_layout(cfg, {n: shapes.get(n, ()) for n in files}, path)
    if ctx is None or (ctx.tp == 1 and ctx.pp == 1):
        flat = {tc2_from_hf(n): ms.Tensor(a.astype(np.float32, copy=False)).astype(dtype)
                for n, a in iter_hf_tensors(path)}
        return tree_unflatten_from_names(param_specs(cfg), flat), cfg
    return _load_shards(path, cfg, ctx, dtype), cfg


def _load_shards(path: str, cfg: ModelConfig, ctx, dtype) -> dict:
    """This process's tree: its pipeline stage's tensors, each cut to its tp slice as it is read."""
    from tc2.parallel.sharding import first_layer, global_name, local_slices
    local = local_slices(cfg, ctx)                                   # {name in its tree: Shard}
    offset = first_layer(cfg, ctx)
    mine = {global_name(n, offset): n for n in local}
    flat = {}
    for n, a in iter_hf_tensors(path, names=set(hf_name(g) for g in mine)):
        name = mine[tc2_from_hf(n)]
        a = np.ascontiguousarray(a[local[name].index])
        flat[name] = ms.Tensor(a.astype(np.float32, copy=False)).astype(dtype)
    return tree_unflatten_from_names(_tree_like(local), flat)


def _tree_like(flat_names) -> dict:
    """The params-shaped tree (leaves None) whose names are `flat_names` ("layers.0.query", ...)."""
    tree = {}
    layers = {}
    for n in flat_names:
        parts = n.split(".")
        if parts[0] == "layers":
            layers.setdefault(int(parts[1]), {})[parts[2]] = None
        else:
            tree[n] = None
    out = {k: tree[k] for k in ("word_embeddings",) if k in tree}
    out["layers"] = tuple(layers[i] for i in sorted(layers))
    out.update({k: tree[k] for k in ("ln_f", "lm_head") if k in tree})
    return out


def hf_arrays(params, cfg: ModelConfig) -> Iterator[Tuple[str, np.ndarray]]:
    """(hf name, float32 numpy) for each parameter, checked against cfg, one at a time."""
    flat = tree_flatten_with_names(params)
    check_hf_layout(cfg, {hf_name(n): tuple(t.shape) for n, t in flat.items()}, "params")
    for n, t in flat.items():
        yield hf_name(n), (t.astype(ms.float32).asnumpy() if isinstance(t, ms.Tensor) else np.asarray(t))


def save_hf(params, cfg: ModelConfig, path: str, *, dtype: str = "float32", max_shard_size=None) -> None:
    """Write config.json + model.safetensors (or shards + index) loadable by the official code."""
    write_hf_dir(hf_arrays(params, cfg), cfg, path, dtype=dtype, max_shard_size=max_shard_size)


def write_hf_dir(arrays: Iterator[Tuple[str, np.ndarray]], cfg: ModelConfig, path: str, *,
                 dtype: str = "float32", max_shard_size=None, sizes=None) -> None:
    """Stream (name, array) pairs into an HF directory; shards of at most max_shard_size bytes.

    `arrays` yields cfg's tensors in `hf_shapes(cfg)` order, or in the order of `sizes`
    [(name, nbytes)] when given (only that order is used: shapes and sizes come from cfg).
    """
    def with_dtypes():
        for name, a in arrays:
            a = np.asarray(a)
            yield name, a, a.dtype.name
    write_hf_tensors(with_dtypes(), cfg, path, dtype=dtype, max_shard_size=max_shard_size,
                     order=None if sizes is None else [n for n, _ in sizes])


def write_hf_tensors(tensors: Iterable[Tuple[str, np.ndarray, str]], cfg: ModelConfig, path: str, *,
                     dtype: str = "float32", max_shard_size=None, order: Optional[Sequence[str]] = None,
                     on_tensor=None) -> None:
    """Stream (hf name, raw array, its dtype name; bfloat16 as uint16 bits) into an HF directory.

    The tensors are cfg's, in `order` (default `hf_shapes(cfg)` order): the shard plan and every
    file's header are fixed up front, so each tensor is written as it arrives and dropped.
    One shard (no `max_shard_size`, or all fits) is model.safetensors without an index, as HF
    writes it. `on_tensor(name, stored nbytes)` is called after each tensor (progress).
    """
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
    shapes = {n: shape for n, (shape, _) in hf_shapes(cfg).items()}
    names = list(shapes) if order is None else list(order)
    if sorted(names) != sorted(shapes):
        odd = sorted(set(names) ^ set(shapes)) or ["(a name listed twice)"]
        raise KeyError(f"{path}: the tensor order does not list the tensors of the config: {odd[0]}")
    sizes = {n: nbytes(shapes[n], dtype) for n in names}
    limit = parse_size(max_shard_size)
    groups = plan_shards([(n, sizes[n]) for n in names], limit) if limit else [names]
    files = [SINGLE] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                                                for i in range(len(groups))]
    it = iter(tensors)
    with StagedDir(path) as stage:
        weight_map = {}
        for file, group in zip(files, groups):
            with SafetensorsWriter(stage.file(file), [(n, shapes[n], dtype) for n in group]) as w:
                for want in group:
                    name, raw, src = next(it, (None, None, None))
                    if name != want:
                        raise ValueError(f"{path}: expected tensor {want} next, got "
                                         f"{'the end of the tensors' if name is None else name}")
                    if tuple(raw.shape) != tuple(shapes[name]):
                        raise ValueError(f"{path}: tensor {name} has shape {tuple(raw.shape)}, but the config "
                                         f"implies {tuple(shapes[name])}")
                    w.write(name, raw, src)
                    del raw
                    weight_map[name] = file
                    if on_tensor is not None:
                        on_tensor(name, sizes[name])
        extra = next(it, None)
        if extra is not None:
            raise ValueError(f"{path}: unexpected tensor {extra[0]} after the {len(names)} of the config")
        if len(files) > 1:
            stage.json(INDEX, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
        stage.json("config.json", {**cfg.to_hf(), "torch_dtype": dtype})
        stage.commit(stale=[f for f in stage.existing() if f == INDEX or
                            (f.startswith("model") and f.endswith(".safetensors"))])
