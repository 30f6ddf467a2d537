"""Explicit SPMD over msrun ranks: every rank runs the same jitted functions on its shard.

Collectives are written out (shard_map style) instead of left to an auto-parallel compiler:

* tensor parallel (Megatron): query / key_value / gate / up split by heads or ffn columns and
  dense / down by rows, whose partial products are summed by an all-reduce; the embedding and
  lm_head are vocab-parallel and the cross-entropy never gathers the full logits. The loss is
  replicated over tp, so the all-reduces are the custom-bprop pair f (identity forward,
  all-reduce backward) and g (all-reduce forward, identity backward): a plain AllReduce would
  make the gradients tp times too large (MINDSPORE_NOTES §3).
* context parallel: each cp rank holds a zigzag share of the sequence with its GLOBAL positions
  and the global length (RoPE, dynamic NTK and the causal mask are global); attention is
  `tc2.nn.ring.ring_attention` with the injected rotation; everything else is per token.
* data parallel: each rank's loss is its share of the global token mean (its loss sum divided
  by the global loss-token count), so summing gradients over dp x cp gives exactly the
  gradient of the single-process step on the global batch.

The per-rank forward reuses the tc2.nn kernels; with tp = cp = 1 it is `tc2.model.forward`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.ops import ReduceOp

from tc2.cache import PAD_POS
from tc2.config import ModelConfig
from tc2.model import IGNORE_INDEX, cross_entropy_sum
from tc2.nn import apply_rope, attention, linear, rms_norm, rope_cos_sin
from tc2.nn.ring import LAYOUTS, allreduce_rotation, fold_ranks, neighbor_rotation, ring_attention, roll_rotation
from tc2.parallel.sharding import Mesh

_DT = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


# ---------------------------------------------------------------------------------------------
# collectives with the right gradients
class CopyToGroup(nn.Cell):
    """Megatron f: identity forward; backward sums the gradient over the group."""

    def __init__(self, group: str):
        super().__init__()
        self.all_reduce = ops.AllReduce(ReduceOp.SUM, group)

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (self.all_reduce(dout),)


class ReduceFromGroup(nn.Cell):
    """Megatron g: all-reduce (sum) forward; identity backward (the loss is replicated)."""

    def __init__(self, group: str):
        super().__init__()
        self.all_reduce = ops.AllReduce(ReduceOp.SUM, group)

    def construct(self, x):
        return self.all_reduce(x)

    def bprop(self, x, out, dout):
        return (dout,)


class GatherFromGroup(nn.Cell):
    """All-gather along axis 0 for a replicated consumer; backward keeps this rank's slice.

    CPU AllGather works on the world group only and has no backward kernel (it would need
    ReduceScatter), so by default the gather is a sum-AllReduce of per-rank slots (R x the
    traffic) and the bprop is written out: the consumer is replicated, so every rank already
    holds the whole cotangent. `native=True` uses AllGather (Ascend, or the world group).
    """

    def __init__(self, group: str, size: int, rank: int, native: bool = False):
        super().__init__()
        self.all_gather = ops.AllGather(group)
        self.all_reduce = ops.AllReduce(ReduceOp.SUM, group)
        self.size, self.rank, self.native = size, rank, native

    def construct(self, x):
        if self.native:
            return self.all_gather(x)
        zeros = ops.zeros((1,) + x.shape, x.dtype)
        slots = ()
        for r in range(self.size):
            slots = slots + ((x.expand_dims(0) if r == self.rank else zeros),)
        buf = self.all_reduce(ops.concat(slots, axis=0))                         # [R, n, ...]
        return buf.reshape((self.size * x.shape[0],) + x.shape[1:])

    def bprop(self, x, out, dout):
        n = dout.shape[0] // self.size
        return (dout[self.rank * n:(self.rank + 1) * n],)


def _identity(x):
    return x


@dataclass(frozen=True)
class SpmdContext:
    """What one rank's jitted functions need: its coordinates and the collectives (identities
    on axes of size 1). Build with `spmd_context(mesh)` under msrun, or `local_context(cp)` for
    a single-process context-parallel simulation (ranks folded into the batch)."""
    mesh: Mesh
    rank: int
    tp_rank: int = 0
    cp_rank: int = 0
    layout: str = "zigzag"
    copy_tp: Any = _identity            # f
    reduce_tp: Any = _identity          # g
    gather_tp: Any = _identity          # all-gather over tp (axis 0), replicated consumer
    sum_tp: Any = _identity             # plain all-reduce over tp (no gradient semantics)
    sum_dpcp: Any = _identity           # plain all-reduce over dp x cp (gradients, loss sums)
    rotate: Any = None                  # ring rotation over cp
    max_tp: Any = None                  # [N] -> elementwise max over tp ranks (no gradient)

    @property
    def tp(self) -> int:
        return self.mesh.tp

    @property
    def cp(self) -> int:
        return self.mesh.cp


def local_context(cp: int = 1, layout: str = "zigzag") -> SpmdContext:
    """Single process: cp virtual ranks folded into the batch (`fold_ranks`), roll rotation."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return SpmdContext(mesh=Mesh(cp=cp), rank=0, layout=layout,
                       rotate=roll_rotation(cp) if cp > 1 else None)


def spmd_context(mesh: Mesh, *, layout: str = "zigzag", rotation: str = "allreduce") -> SpmdContext:
    """This msrun rank's context: initialises communication and creates its dp/cp/tp groups.

    rotation: "allreduce" (CPU: slot all-reduce, differentiable) or "neighbor" (Ascend
    NeighborExchange). Pipeline parallelism is planned (layouts, memory) but not executed here.
    The same arguments give the same context (groups are created once per process).
    """
    return _spmd_context(mesh, layout, rotation)


@functools.lru_cache(maxsize=None)
def _spmd_context(mesh: Mesh, layout: str, rotation: str) -> SpmdContext:
    from mindspore.communication import create_group, get_group_size, get_rank, init
    from mindspore.communication.management import GlobalComm
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if mesh.pp > 1:
        raise NotImplementedError("pipeline parallel execution is not implemented: pp is used for "
                                  "layouts and the memory plan only (run with pp=1)")
    if not GlobalComm.INITED:
        init()
    rank, world = get_rank(), get_group_size()
    if world != mesh.size:
        raise ValueError(f"mesh {mesh} needs {mesh.size} processes, msrun started {world} "
                         f"(--worker_num)")
    c = mesh.coords(rank)

    def group(axes):
        name = mesh.group_name(axes, rank)
        create_group(name, list(mesh.group(axes, rank)))
        return name

    kw = {}
    if mesh.tp > 1:
        g = group("tp")
        kw.update(copy_tp=CopyToGroup(g), reduce_tp=ReduceFromGroup(g),
                  gather_tp=GatherFromGroup(g, mesh.tp, c["tp"]),
                  sum_tp=ops.AllReduce(ReduceOp.SUM, g))
        kw["max_tp"] = _slot_max(mesh.tp, c["tp"], kw["sum_tp"])
    if mesh.dp * mesh.cp > 1:
        kw["sum_dpcp"] = ops.AllReduce(ReduceOp.SUM, group(("dp", "cp")))
    if mesh.cp > 1:
        g = group("cp")
        if rotation == "allreduce":
            kw["rotate"] = allreduce_rotation(mesh.cp, c["cp"], ops.AllReduce(ReduceOp.SUM, g))
        elif rotation == "neighbor":
            kw["rotate"] = neighbor_rotation(mesh.cp, c["cp"], mesh.group("cp", rank), g)
        else:
            raise ValueError(f"rotation must be 'allreduce' or 'neighbor', got {rotation!r}")
    return SpmdContext(mesh=mesh, rank=rank, tp_rank=c["tp"], cp_rank=c["cp"], layout=layout, **kw)


def _slot_max(size: int, rank: int, all_reduce):
    """Elementwise max over the group from a sum-only AllReduce (CPU has no MAX all-reduce)."""
    def max_over_group(x):
        x = ops.stop_gradient(x)
        zeros = ops.zeros((1,) + x.shape, x.dtype)
        slots = ()
        for r in range(size):
            slots = slots + ((x.expand_dims(0) if r == rank else zeros),)
        return all_reduce(ops.concat(slots, axis=0)).max(axis=0)
    return max_over_group


# ---------------------------------------------------------------------------------------------
# the per-rank model
def _vocab_embedding(table, tokens, ctx: SpmdContext):
    """Rows [start, start + V/tp) of the embedding live here; others contribute zeros, g sums."""
    if ctx.tp == 1:
        return ops.gather(table, tokens, 0)
    n = table.shape[0]
    local = tokens - ctx.tp_rank * n
    inside = ops.logical_and(local >= 0, local < n)
    e = ops.gather(table, ops.where(inside, local, 0), 0)                        # [B, T, H]
    return ctx.reduce_tp(e * inside.expand_dims(-1).astype(e.dtype))


def _block(p, x, cos, sin, positions, segment_ids, cfg: ModelConfig, ctx: SpmdContext):
    """One decoder layer on this rank's heads / ffn columns / sequence share."""
    dt = _DT[cfg.dtype]
    B, T = positions.shape
    D = cfg.head_dim
    n_q, n_kv = p["query"].shape[0] // D, p["key_value"].shape[0] // (2 * D)    # local heads
    h = ctx.copy_tp(rms_norm(x, p["input_layernorm"], cfg.layer_norm_epsilon).astype(dt))
    q = apply_rope(linear(h, p["query"]).reshape(B, T, n_q, D), cos, sin)        # [B, T, nq, D]
    kv = linear(h, p["key_value"]).reshape(B, T, n_kv, 2 * D)                    # [B, T, nkv, 2D]
    k, v = apply_rope(kv[..., :D], cos, sin), kv[..., D:]
    if ctx.rotate is None:
        a = attention(q, k, v, positions, positions, q_segment=segment_ids, kv_segment=segment_ids)
    else:
        a, _ = ring_attention(q, k, v, positions, positions, rotate=ctx.rotate, ring_size=ctx.cp,
                              q_segment=segment_ids, kv_segment=segment_ids)
        a = a.astype(q.dtype)
    a = ctx.reduce_tp(linear(a.reshape(B, T, n_q * D), p["dense"]))              # [B, T, H]
    x = x + (a + p["dense_bias"].astype(dt)).astype(ms.float32)
    h = ctx.copy_tp(rms_norm(x, p["post_attention_layernorm"], cfg.layer_norm_epsilon).astype(dt))
    m = ops.silu(linear(h, p["gate_proj"])) * linear(h, p["up_proj"])            # [B, T, F/tp]
    m = ctx.reduce_tp(linear(m, p["down_proj"]))                                 # [B, T, H]
    return x + (m + p["down_proj_bias"].astype(dt)).astype(ms.float32)


def spmd_forward(params, tokens, cfg: ModelConfig, ctx: SpmdContext, *, positions=None, seq_len=None,
                 segment_ids=None):
    """This rank's logits [B, T, V/tp] (compute dtype) from its local params and token share.

    Under context parallelism `positions` (global, PAD_POS for padding) and `seq_len` ([B]
    global lengths, for dynamic NTK) are required: a chunk alone cannot know them.
    """
    B, T = tokens.shape
    if positions is None:
        positions = ops.arange(T, dtype=ms.int32).expand_dims(0).broadcast_to((B, T))
    if seq_len is None:
        seq_len = ops.where(positions < PAD_POS, positions, -1).max(axis=1) + 1         # [B]
    cos, sin = rope_cos_sin(positions, seq_len, head_dim=cfg.head_dim, base_seqlen=cfg.base_seqlen,
                            training_seqlen=cfg.training_seqlen, theta=cfg.rope_theta)  # [B, T, D]
    x = _vocab_embedding(params["word_embeddings"], tokens, ctx).astype(ms.float32)     # [B, T, H]
    for i in range(len(params["layers"])):
        x = _block(params["layers"][i], x, cos, sin, positions, segment_ids, cfg, ctx)
    x = rms_norm(x, params["ln_f"], cfg.layer_norm_epsilon).astype(_DT[cfg.dtype])
    return linear(ctx.copy_tp(x), params["lm_head"])                                   # [B, T, V/tp]


def vocab_parallel_cross_entropy_sum(logits, labels, ctx: SpmdContext):
    """(sum of token CE, loss-token count) from vocab-sharded logits [.., V/tp], never gathered.

    lse = log(sum over ranks of sum(exp(l - m))) + m with m the global max (constant for the
    gradient); the target logit comes from the rank owning it. Both sums use g, so the
    gradient w.r.t. the local logits is softmax - onehot on this rank's columns.
    """
    if ctx.tp == 1:
        return cross_entropy_sum(logits, labels)
    n = logits.shape[-1]
    logits = logits.reshape(-1, n).astype(ms.float32)                                  # [N, V/tp]
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    mx = ctx.max_tp(logits.max(axis=-1))                                               # [N]
    sumexp = ctx.reduce_tp(ops.exp(logits - mx.expand_dims(1)).sum(axis=-1))          # [N]
    local = labels - ctx.tp_rank * n
    mine = ops.logical_and(keep, ops.logical_and(local >= 0, local < n))
    picked = ops.gather_elements(logits, 1, ops.where(mine, local, 0).astype(ms.int32).expand_dims(1))
    picked = ctx.reduce_tp(picked.squeeze(1) * mine.astype(ms.float32))               # [N]
    keepf = keep.astype(ms.float32)
    return ((ops.log(sumexp) + mx - picked) * keepf).sum(), keepf.sum()


def spmd_loss_sums(params, tokens, labels, cfg: ModelConfig, ctx: SpmdContext, *, positions=None,
                   seq_len=None, segment_ids=None):
    """(this rank's sum of token losses, its loss-token count); replicated over tp."""
    logits = spmd_forward(params, tokens, cfg, ctx, positions=positions, seq_len=seq_len,
                          segment_ids=segment_ids)
    return vocab_parallel_cross_entropy_sum(logits, labels, ctx)


def gather_logits(logits, ctx: SpmdContext):
    """Full-vocab logits [B, T, V] from the vocab shards (for sampling/eval; costs V per token)."""
    if ctx.tp == 1:
        return logits
    parts = ctx.gather_tp(logits.swapaxes(0, 2))                                   # [V, T, B]
    return parts.swapaxes(0, 2)


# ---------------------------------------------------------------------------------------------
# host side: this rank's share of a global batch
def shard_batch(batch: dict, mesh: Mesh, rank: int, *, layout: str = "zigzag", pad_id: int = 3) -> dict:
    """The rows (dp) and sequence share (cp) of a global batch that `rank` computes on.

    batch: numpy-like [B, T] "tokens", "labels" (shifted, -100 = no loss), optional
    "positions" (default arange) and "segment_ids". Returns int32 arrays plus "seq_len" [B/dp]
    (the global length of each row, for dynamic NTK). Sequences are padded to the layout's
    chunk multiple with pad_id / label -100 / position PAD_POS / segment -1.
    """
    tokens = np.asarray(batch["tokens"])
    B, T = tokens.shape
    if B % mesh.dp:
        raise ValueError(f"a batch of {B} rows does not split over dp={mesh.dp}")
    c = mesh.coords(rank)
    rows = slice(c["dp"] * (B // mesh.dp), (c["dp"] + 1) * (B // mesh.dp))
    positions = batch.get("positions")
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)) if positions is None else np.asarray(positions)
    seq_len = np.where(positions < PAD_POS, positions, -1).max(axis=1) + 1
    fields = {"tokens": (tokens, pad_id), "labels": (np.asarray(batch["labels"]), IGNORE_INDEX),
              "positions": (positions, PAD_POS)}
    if batch.get("segment_ids") is not None:
        fields["segment_ids"] = (np.asarray(batch["segment_ids"]), -1)
    out = {}
    for name, (a, pad) in fields.items():
        a = a[rows]
        if a.shape != (B // mesh.dp, T):
            raise ValueError(f"batch[{name!r}] has shape {np.asarray(batch[name]).shape}, tokens {tokens.shape}")
        if mesh.cp > 1:
            folded = fold_ranks(a, mesh.cp, layout, pad)
            n = folded.shape[0] // mesh.cp
            a = folded[c["cp"] * n:(c["cp"] + 1) * n]
        out[name] = np.ascontiguousarray(a, dtype=np.int32)
    out["seq_len"] = seq_len[rows].astype(np.int32)
    return out


def fold_batch(batch: dict, cp: int, *, layout: str = "zigzag", pad_id: int = 3) -> dict:
    """Single process: the whole cp group's shares stacked rank-major ([cp*B, T/cp]), for
    `local_context(cp)`; "seq_len" repeated per virtual rank."""
    parts = [shard_batch(batch, Mesh(cp=cp), r, layout=layout, pad_id=pad_id) for r in range(cp)]
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}


__all__ = ["CopyToGroup", "ReduceFromGroup", "GatherFromGroup", "SpmdContext", "spmd_context",
           "local_context", "spmd_forward", "spmd_loss_sums", "vocab_parallel_cross_entropy_sum",
           "gather_logits", "shard_batch", "fold_batch"]
