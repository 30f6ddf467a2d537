"""MindSpore semi-auto parallel data for Ascend, from the rules of `tc2.parallel.sharding`.

`param_layouts` (mindspore.parallel.Layout per parameter), `param_strategies` (classic shard
tuples), `pipeline_stages` and `op_strategies` (in-strategies of the block's primitives).
Pure data here: semi-auto parallel refuses to run on CPU (MINDSPORE_NOTES §7), so these are
built and unit-tested as data and applied on Ascend (`Primitive.shard`, `ms.parallel.shard`'s
parameter_plan).
"""
from __future__ import annotations

from typing import Dict, Tuple

from tc2.config import ModelConfig
from tc2.parallel.sharding import Mesh, resolve_rules, check_mesh, param_mesh_axes

STAGE_AXES = ("dp", "cp", "tp")      # one pipeline stage's device matrix (pp: pipeline_stage)


def param_strategies(cfg: ModelConfig, mesh: Mesh, rules=None) -> Dict[str, Tuple[int, ...]]:
    """{tc2 name: strategy tuple} e.g. query -> (tp, 1): how many slices along each dim."""
    check_mesh(cfg, mesh, rules)
    flat = param_mesh_axes(cfg, rules)
    return {n: tuple(mesh.axis_size(m) if m != "pp" else 1 for m in axes) for n, axes in flat.items()}


def param_layouts(cfg: ModelConfig, mesh: Mesh, rules=None) -> dict:
    """{tc2 name: mindspore.parallel.Layout} over the stage device matrix (dp, cp, tp).

    Pass as `parameter_plan` to `mindspore.parallel.shard` / use with `reshard` on Ascend.
    Layers of pipeline stage s go to `pipeline_stages(cfg, mesh)[i] == s`.
    """
    from mindspore.parallel import Layout
    check_mesh(cfg, mesh, rules)
    names = STAGE_AXES
    layout = Layout(tuple(getattr(mesh, a) for a in names), names)
    flat = param_mesh_axes(cfg, rules)
    out = {}
    for n, axes in flat.items():
        out[n] = layout(*[a if a in names and mesh.axis_size(a) > 1 else "None" for a in axes])
    return out


def pipeline_stages(cfg: ModelConfig, mesh: Mesh, rules=None) -> Dict[int, int]:
    """{layer index: pipeline stage} (embedding on stage 0, ln_f/lm_head on the last)."""
    n = mesh.axis_size(resolve_rules(rules).get("layers"))
    per = cfg.n_layer // n
    return {i: i // per for i in range(cfg.n_layer)}


def op_strategies(cfg: ModelConfig, mesh: Mesh, *, sequence_parallel: bool = True) -> Dict[str, tuple]:
    """In-strategies of the block's primitives for `Primitive.shard` (Megatron layout).

    Activations enter matmuls as 2D [B*S, H] (tokens first), so data and context parallel
    both split the token dim; column-parallel matmuls split weight rows by tp, row-parallel
    ones split the contraction dim (their output is summed over tp: AllReduce, or
    ReduceScatter over tokens under sequence parallelism, where norms then split tokens by tp).
    """
    check_mesh(cfg, mesh)
    dp, cp, tp = mesh.dp, mesh.cp, mesh.tp
    tok = dp * cp
    norm_tok = tok * tp if sequence_parallel else tok
    col = ((tok, 1), (tp, 1))                  # x [N, H] @ W[out/tp, H].T
    row = ((tok, tp), (1, tp))                 # x [N, in/tp] @ W[H, in/tp].T, summed over tp
    return {
        "embedding": ((tp, 1), (dp, cp)),      # Gather(table [V/tp, H], ids [B, S])
        "rms_norm": ((norm_tok, 1), (1,)),
        "query": col, "key_value": col, "gate_proj": col, "up_proj": col, "lm_head": col,
        "dense": row, "down_proj": row,
        "dense_out": ((norm_tok, 1),),         # out-strategy of the row-parallel sums
        "bias_add": ((norm_tok, 1), (1,)),
        "attention_scores": ((dp, tp, cp, 1), (dp, tp, 1, 1)),   # BatchMatMul q k^T, [B, N, S, D]
        "attention_values": ((dp, tp, cp, 1), (dp, tp, 1, 1)),   # BatchMatMul p v
        "flash_attention": ((dp, tp, cp, 1), (dp, tp, 1, 1), (dp, tp, 1, 1)),   # BNSD
        "swiglu_mul": ((tok, tp), (tok, tp)),
        "cross_entropy": ((tok, tp), (tok,)),  # vocab-parallel logits, labels by token
    }
