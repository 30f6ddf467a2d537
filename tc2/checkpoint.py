"""Official Hugging Face TeleChat2 directories: config.json + (sharded) safetensors.

The tc2 parameter tree keeps HF orientation and the interleaved key_value layout, so this is
a rename plus checks: every mismatch names the tensor, and a save never leaves a directory
half-written (each file goes through a temp name; stale shards are removed only at the end).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, Iterator, Tuple

import mindspore as ms
import numpy as np

from .config import ModelConfig
from .model import param_specs
from .safetensors_io import (encode_tensor, open_safetensors, parse_size, plan_shards, read_header,
                             write_safetensors)
from .tree import tree_flatten_with_names, tree_unflatten_from_names

_LAYER = {
    "input_layernorm": "input_layernorm.weight",
    "query": "self_attention.query.weight",
    "key_value": "self_attention.key_value.weight",
    "dense": "self_attention.dense.weight",
    "dense_bias": "self_attention.dense.bias",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
    "down_proj_bias": "mlp.down_proj.bias",
}
_TOP = {"word_embeddings": "transformer.word_embeddings.weight", "ln_f": "transformer.ln_f.weight",
        "lm_head": "lm_head.weight"}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def hf_name(tc2_name: str) -> str:
    """'layers.3.query' -> 'transformer.h.3.self_attention.query.weight'."""
    if tc2_name in _TOP:
        return _TOP[tc2_name]
    _, i, key = tc2_name.split(".")
    return f"transformer.h.{i}.{_LAYER[key]}"


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
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
        for file in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, file)):
                raise FileNotFoundError(f"{index} lists {file}, which is not in {path}")
        return {n: os.path.join(path, f) for n, f in weight_map.items()}
    single = os.path.join(path, SINGLE)
    if os.path.isfile(single):
        return {n: single for n in read_header(single)}
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*")))
    raise FileNotFoundError(f"{path}: neither {SINGLE} nor {INDEX} (found {found[:8]})")


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
            raise ValueError(f"{where}: tensor {name} has shape {tuple(found[name])}, but config.json "
                             f"(hidden_size={cfg.hidden_size}, n_head={cfg.n_head}, num_key_value_heads="
                             f"{cfg.num_key_value_heads}, ffn_hidden_size={cfg.ffn_hidden_size}, "
                             f"vocab_size={cfg.vocab_size}) implies {tuple(shape)}")


def iter_hf_tensors(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """(hf name, numpy array; bf16 given as float32) one tensor at a time, file by file."""
    by_file: Dict[str, list] = {}
    for name, file in hf_tensor_files(path).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with open_safetensors(file) as (header, get):
            for name in names:
                if name not in header:
                    raise KeyError(f"{file}: index lists tensor {name}, but the file does not hold it")
                yield name, get(name)


def load_hf(path: str, *, dtype=ms.float32, **config_overrides):
    """An official TeleChat2 HF directory -> (params pytree of ms.Tensor, ModelConfig)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    cfg = ModelConfig.from_hf(path, **config_overrides)
    files = hf_tensor_files(path)
    shapes = {}
    for file in sorted(set(files.values())):
        for name, meta in read_header(file).items():
            shapes[name] = meta["shape"]
    check_hf_layout(cfg, {n: shapes.get(n, ()) for n in files}, path)
    tc2_of = {h: n for h, (_, n) in hf_shapes(cfg).items()}
    flat = {tc2_of[n]: ms.Tensor(a.astype(np.float32)).astype(dtype) for n, a in iter_hf_tensors(path)}
    return tree_unflatten_from_names(param_specs(cfg), flat), cfg


def hf_arrays(params, cfg: ModelConfig) -> Iterator[Tuple[str, np.ndarray]]:
    """(hf name, float32 numpy) for each parameter, checked against cfg, one at a time."""
    flat = tree_flatten_with_names(params)
    check_hf_layout(cfg, {hf_name(n): tuple(t.shape) for n, t in flat.items()}, "params")
    for n, t in flat.items():
        yield hf_name(n), (t.astype(ms.float32).asnumpy() if isinstance(t, ms.Tensor) else np.asarray(t))


def save_hf(params, cfg: ModelConfig, path: str, *, dtype: str = "float32", max_shard_size=None) -> None:
    """Write config.json + model.safetensors (or shards + index) loadable by the official code."""
    write_hf_dir(hf_arrays(params, cfg), cfg, path, dtype=dtype, max_shard_size=max_shard_size,
                 sizes=[(hf_name(n), int(np.prod(t.shape)) * _itemsize(dtype))
                        for n, t in tree_flatten_with_names(params).items()])


def _itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def write_hf_dir(arrays: Iterator[Tuple[str, np.ndarray]], cfg: ModelConfig, path: str, *,
                 dtype: str = "float32", max_shard_size=None, sizes=None) -> None:
    """Stream (name, array) pairs into an HF directory; shards of at most max_shard_size bytes.

    With sharding, `sizes` [(name, nbytes)] (in the order `arrays` yields) plans the files up
    front, so only one shard's tensors are ever held in memory.
    """
    os.makedirs(path, exist_ok=True)
    limit = parse_size(max_shard_size)
    groups = plan_shards(sizes, limit) if limit else None
    written, weight_map, total = [], {}, 0
    try:
        if groups is None:
            tensors = {n: encode_tensor(a, dtype) for n, a in arrays}
            total = sum(t.nbytes for t in tensors.values())
            _write(os.path.join(path, SINGLE), tensors, written)
            files = [SINGLE]
        else:
            files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
            it = iter(arrays)
            for file, names in zip(files, groups):
                tensors = {}
                for expected in names:
                    n, a = next(it)
                    assert n == expected, f"sizes order {expected} != arrays order {n}"
                    tensors[n] = encode_tensor(a, dtype)
                    weight_map[n] = file
                total += sum(t.nbytes for t in tensors.values())
                _write(os.path.join(path, file), tensors, written)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write_json(os.path.join(path, INDEX), index, written)
        _write_json(os.path.join(path, "config.json"), {**cfg.to_hf(), "torch_dtype": dtype}, written)
    except BaseException:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for tmp, final in written:                       # everything is on disk: now swap it in
        os.replace(tmp, final)
    stale = set(glob.glob(os.path.join(path, "model*.safetensors"))) - {os.path.join(path, f) for f in files}
    if groups is None and os.path.exists(os.path.join(path, INDEX)):
        stale.add(os.path.join(path, INDEX))
    for p in stale:
        os.remove(p)


def _write(final: str, tensors: dict, written: list) -> None:
    tmp = f"{final}.partial-{os.getpid()}"
    write_safetensors(tmp, tensors)
    written.append((tmp, final))


def _write_json(final: str, obj, written: list) -> None:
    tmp = f"{final}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    written.append((tmp, final))
