"""Sharding declared once: a device mesh, one rules table from logical axes to mesh axes.

Every parameter spec carries logical axes (`ParamSpec.axes`: "vocab", "embed", "q_heads",
"kv_heads", "mlp"; the per-layer tuple is the "layers" axis). `DEFAULT_RULES` maps them to the
mesh axes dp / cp / tp / pp (Megatron layout: heads, ffn columns and vocab over tp, layers over
pp, batch over dp, sequence over cp). From that single table this module derives

* the per-rank slice of every parameter, for explicit SPMD execution (`shard_params`) and for
  merging per-rank checkpoints back (`unshard_params`), plus `split_dim(name)` which a
  checkpoint splitter/merger keyed by tensor name can share;
* the divisibility and collision checks, with errors that say which tensor and which size.

Built on the same table: MindSpore `Layout`s / shard strategies for Ascend semi-auto parallel
(`tc2.parallel.layouts`) and the per-device memory plan (`tc2.parallel.memory`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tc2.checkpoint.names import leaf_key
from tc2.config import ModelConfig
from tc2.model import DEFAULT_RULES, ParamSpec, param_specs
from tc2.parallel.mesh import MESH_AXES, Mesh, ShardingError
from tc2.tree import tree_flatten_with_names, tree_map, tree_unflatten_from_names

def resolve_rules(rules) -> Mapping[str, Optional[str]]:
    """`rules`, or DEFAULT_RULES when None."""
    return DEFAULT_RULES if rules is None else rules


def mesh_axes(logical: Sequence[str], rules=None, *, where: str = "tensor") -> Tuple[Optional[str], ...]:
    """The mesh axis of each dim of a tensor with logical axes `logical` ("" = replicated).

    Raises if a logical axis has no rule or if one mesh axis would shard two dims of the same
    tensor (the collision check: a device cannot hold two different slices of one axis).
    """
    rules = resolve_rules(rules)
    out = []
    for ax in logical:
        if ax in ("", None):
            out.append(None)
            continue
        if ax not in rules:
            raise ShardingError(f"{where}: logical axis {ax!r} has no sharding rule "
                                f"(rules cover {sorted(rules)})")
        m = rules[ax]
        if m is not None and m not in MESH_AXES:
            raise ShardingError(f"{where}: rule {ax!r} -> {m!r} is not a mesh axis {MESH_AXES}")
        out.append(m)
    used = [m for m in out if m is not None]
    dup = sorted({m for m in used if used.count(m) > 1})
    if dup:
        raise ShardingError(f"{where}: mesh axis {dup[0]!r} would shard more than one dim of axes "
                            f"{tuple(logical)} -> {tuple(out)}")
    return tuple(out)


def param_mesh_axes(cfg: ModelConfig, rules=None) -> Dict[str, Tuple[Optional[str], ...]]:
    """{tc2 name ("layers.0.query"): mesh axis (or None) of each dim}."""
    flat = tree_flatten_with_names(param_specs(cfg))
    return {n: mesh_axes(s.axes, rules, where=n) for n, s in flat.items()}


# A head is the unit of q/kv rows: splitting inside a head would break attention.
_UNIT_NAMES = {"q_heads": "n_head", "kv_heads": "num_key_value_heads"}


def check_mesh(cfg: ModelConfig, mesh: Mesh, rules=None) -> None:
    """Raise a ShardingError naming the tensor and sizes if `cfg` cannot be laid out on `mesh`."""
    rules = resolve_rules(rules)
    layer_axis = rules.get("layers")
    n_stage = mesh.axis_size(layer_axis)
    if n_stage > 1 and cfg.n_layer % n_stage:
        raise ShardingError(f"n_layer={cfg.n_layer} is not divisible by {layer_axis}={n_stage} "
                            f"(every pipeline stage holds the same number of layers)")
    units = {"q_heads": cfg.n_head, "kv_heads": cfg.num_key_value_heads}
    specs = tree_flatten_with_names(param_specs(cfg))
    sharded = [(name, spec, dim, logical, m, mesh.axis_size(m))
               for name, spec in specs.items()
               for dim, (logical, m) in enumerate(zip(spec.axes, mesh_axes(spec.axes, rules, where=name)))
               if mesh.axis_size(m) > 1]
    for name, spec, dim, logical, m, n in sharded:       # whole heads first: the likelier mistake
        if logical in units and units[logical] % n:
            raise ShardingError(
                f"{name}: {_UNIT_NAMES[logical]}={units[logical]} is not divisible by "
                f"{m}={n}; each {m} rank must hold whole heads"
                + (f" ({m} may be at most {units[logical]})" if n > units[logical] else ""))
    for name, spec, dim, logical, m, n in sharded:
        if spec.shape[dim] % n:
            raise ShardingError(f"{name}: dim {dim} ({logical}) of size {spec.shape[dim]} is not "
                                f"divisible by {m}={n}")


def stage_layers(cfg: ModelConfig, mesh: Mesh, stage: int, rules=None) -> range:
    """Indices of the layers that pipeline stage `stage` holds (contiguous, equal counts)."""
    n = mesh.axis_size(resolve_rules(rules).get("layers"))
    per = cfg.n_layer // n
    return range(stage * per, (stage + 1) * per)


def _stage_of(mesh: Mesh, rank: int, rules) -> int:
    ax = resolve_rules(rules).get("layers")
    return 0 if ax is None else mesh.coords(rank)[ax]


def stage_top_keys(mesh: Mesh, stage: int, rules=None) -> Tuple[str, ...]:
    """Non-layer params a pipeline stage holds: the embedding on the first, ln_f/lm_head on the last."""
    n = mesh.axis_size(resolve_rules(rules).get("layers"))
    keys = ()
    if stage == 0:
        keys += ("word_embeddings",)
    if stage == n - 1:
        keys += ("ln_f", "lm_head")
    return keys


# ---------------------------------------------------------------------------------------------
# per-rank slices
@dataclass(frozen=True)
class Shard:
    """Where one rank's piece sits in the full tensor: `full[shard.index]` (a pytree leaf)."""
    index: Tuple[slice, ...]

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.index)

    @property
    def region(self) -> Tuple[Tuple[int, int], ...]:
        return tuple((s.start, s.stop) for s in self.index)


def _slices(spec: ParamSpec, rules, mesh: Mesh, coords) -> Shard:
    axes = mesh_axes(spec.axes, rules)
    out = []
    for size, m in zip(spec.shape, axes):
        n = mesh.axis_size(m)
        if n == 1:
            out.append(slice(0, size))
        else:
            part = size // n
            out.append(slice(coords[m] * part, (coords[m] + 1) * part))
    return Shard(tuple(out))


def param_slices(cfg: ModelConfig, mesh: Mesh, rank: int, rules=None) -> dict:
    """Pytree of `Shard`s (per-dim slices) into the full params, for what `rank` holds: the layers of its
    pipeline stage, the embedding on the first stage and ln_f/lm_head on the last."""
    check_mesh(cfg, mesh, rules)
    specs = param_specs(cfg)
    coords = mesh.coords(rank)
    stage = _stage_of(mesh, rank, rules)
    layers = stage_layers(cfg, mesh, stage, rules)
    out = {k: _slices(specs[k], rules, mesh, coords) for k in stage_top_keys(mesh, stage, rules)}
    out["layers"] = tuple({k: _slices(specs["layers"][i][k], rules, mesh, coords)
                           for k in specs["layers"][i]} for i in layers)
    return out


def local_param_specs(cfg: ModelConfig, mesh: Mesh, rank: int, rules=None) -> dict:
    """`param_specs` as one rank holds them: shapes of the slices, layers of its stage only."""
    specs = param_specs(cfg)
    sl = param_slices(cfg, mesh, rank, rules)
    layers = stage_layers(cfg, mesh, _stage_of(mesh, rank, rules), rules)

    def local(spec, s):
        return ParamSpec(s.shape, spec.axes, spec.init, spec.dtype)
    out = {k: local(specs[k], sl[k]) for k in sl if k != "layers"}
    out["layers"] = tuple({k: local(specs["layers"][i][k], sl["layers"][j][k]) for k in sl["layers"][j]}
                          for j, i in enumerate(layers))
    return out


def local_slices(cfg: ModelConfig, ctx) -> Dict[str, Shard]:
    """{tc2 name: Shard} of the parameters process `ctx` holds (flat). Names are those of its
    own tree: under pipeline parallelism "layers.0" is the first layer of its stage
    (`global_name` gives the model's name)."""
    mesh = Mesh(dp=ctx.dp, cp=ctx.cp, tp=ctx.tp, pp=ctx.pp)
    return tree_flatten_with_names(param_slices(cfg, mesh, 0 if ctx.folded else ctx.rank))


def first_layer(cfg: ModelConfig, ctx) -> int:
    """The model's index of the first layer of this process's pipeline stage."""
    return ctx.pp_rank * (cfg.n_layer // ctx.pp)


_LAYER_INDEX = re.compile(r"(^|\.)layers\.(\d+)\.")


def global_name(name: str, offset: int) -> str:
    """A stage's tensor or state name ("layers.0.query", "mu.layers.0.query") as the model's
    (its layer index + `offset`); names without a layer stay as they are."""
    if not offset:
        return name
    return _LAYER_INDEX.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + offset}.", name, count=1)


def shadowed_param(name: str, params) -> Optional[str]:
    """The parameter a state leaf shadows: `name` itself, or the parameter name it ends with (an
    optimizer moment "mu.layers.0.query" has the shape and the slice of "layers.0.query");
    None when it shadows none (e.g. the optimizer's step count). `params`: the names."""
    if name in params:
        return name
    return next((p for p in params if name.endswith("." + p)), None)


def leaf_slice(name: str, slices: Dict[str, Shard]) -> Optional[Shard]:
    """The Shard of parameter `name`, or of the parameter a state leaf shadows (None: replicated)."""
    param = shadowed_param(name, slices)
    return None if param is None else slices[param]


def _as_numpy(x):
    return x if isinstance(x, np.ndarray) else x.asnumpy()


def shard_params(params, cfg: ModelConfig, mesh: Mesh, rank: int, rules=None, *, to_tensor=True):
    """The slice of full `params` that `rank` holds (host side), as ms.Tensor (or numpy)."""
    import mindspore as ms
    sl = param_slices(cfg, mesh, rank, rules)
    layers = stage_layers(cfg, mesh, _stage_of(mesh, rank, rules), rules)
    if len(params["layers"]) != cfg.n_layer:
        raise ShardingError(f"params have {len(params['layers'])} layers, config says {cfg.n_layer}")
    full = {k: params[k] for k in sl if k != "layers"}
    full["layers"] = tuple(params["layers"][i] for i in layers)

    def cut(x, s):
        a = np.ascontiguousarray(_as_numpy(x)[s.index])
        return ms.Tensor(a) if to_tensor else a
    return tree_map(cut, full, sl)


def unshard_params(shards: Mapping[int, dict], cfg: ModelConfig, mesh: Mesh, rules=None, *,
                   check_replicas: bool = True, to_tensor: bool = True):
    """Full params from every rank's local params ({rank: local params}); inverse of shard_params.

    Replicated copies (e.g. norms under tp, everything across dp) must agree: with
    `check_replicas`, copies that differ by more than float rounding raise, naming the tensor
    and ranks (a sign that gradients were not reduced the same way on every rank).
    """
    import mindspore as ms
    missing = sorted(set(range(mesh.size)) - set(shards))
    if missing:
        raise ShardingError(f"unshard_params: shards of ranks {missing} are missing (mesh {mesh})")
    specs = tree_flatten_with_names(param_specs(cfg))
    out: Dict[str, np.ndarray] = {}
    filled: Dict[str, Dict[tuple, int]] = {}          # name -> {region: first rank that wrote it}
    for rank in range(mesh.size):
        local = tree_flatten_with_names(shards[rank])
        sl = tree_flatten_with_names(param_slices(cfg, mesh, rank, rules))
        layers = list(stage_layers(cfg, mesh, _stage_of(mesh, rank, rules), rules))
        if set(local) != set(sl):
            raise ShardingError(f"rank {rank}: shard tensors differ from the mesh {mesh} plan: missing "
                                f"{sorted(set(sl) - set(local))[:5]}, unexpected "
                                f"{sorted(set(local) - set(sl))[:5]}")
        for lname, x in local.items():
            parts = lname.split(".")
            if parts[0] == "layers":
                parts[1] = str(layers[int(parts[1])])
            gname = ".".join(parts)
            a, s = _as_numpy(x), sl[lname]
            want = s.shape
            if a.shape != want:
                raise ShardingError(f"rank {rank}: {gname} has shape {a.shape}, the mesh {mesh} "
                                    f"gives it {want}")
            if gname not in out:
                out[gname] = np.zeros(specs[gname].shape, a.dtype)
                filled[gname] = {}
            region = s.region
            if region in filled[gname]:
                prev = out[gname][s.index]
                if check_replicas and not np.allclose(prev, a, rtol=1e-6, atol=1e-7):
                    raise ShardingError(
                        f"{gname}: the replicas on ranks {filled[gname][region]} and {rank} differ "
                        f"(max |diff| {np.abs(prev - a).max():.3g})")
                continue
            out[gname][s.index] = a
            filled[gname][region] = rank
    absent = sorted(set(specs) - set(out))
    if absent:
        raise ShardingError(f"unshard_params: no rank holds {absent[:5]}")
    conv = (lambda a: ms.Tensor(a)) if to_tensor else (lambda a: a)
    return tree_unflatten_from_names(param_specs(cfg), {n: conv(a) for n, a in out.items()})


# ---------------------------------------------------------------------------------------------
# tensor names -> split dims
def _leaf_axes() -> Dict[str, Tuple[str, ...]]:
    specs = param_specs(ModelConfig(vocab_size=8, hidden_size=8, n_layer=1, n_head=2,
                                    num_key_value_heads=1, ffn_hidden_size=8))
    out = {k: specs[k].axes for k in specs if k != "layers"}
    out.update({k: s.axes for k, s in specs["layers"][0].items()})
    return out


_AXES_BY_LEAF = _leaf_axes()


def split_dim(name: str, axis: str = "tp", rules=None) -> Optional[int]:
    """Which dim of tensor `name` the mesh axis `axis` splits (None: replicated along it).

    Shared by SPMD slicing and by name-keyed checkpoint split/merge tools: `name` is in any
    spelling `tc2.checkpoint.names.leaf_key` reads (tc2, HF, MindFormers); with the default
    rules, split_dim("transformer.h.0.self_attention.query.weight") == 0 (column parallel),
    split_dim("model.layers.0.attention.wo.weight") == 1 (row parallel), norms/biases None.
    """
    key = leaf_key(name)
    m = mesh_axes(_AXES_BY_LEAF[key], rules, where=name)
    return m.index(axis) if axis in m else None
