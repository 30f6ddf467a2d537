"""This process's `ParallelContext` under msrun: process groups and collectives with the right gradients.

Collectives are written out (shard_map style) instead of left to an auto-parallel compiler,
which does not run on CPU (MINDSPORE_NOTES §7). The loss is replicated over tp, so the
Megatron all-reduces are custom-bprop pairs: f (`CopyToGroup`: identity forward, all-reduce
backward) and g (`ReduceFromGroup`: all-reduce forward, identity backward); a plain AllReduce
would make the gradients tp times too large (MINDSPORE_NOTES §3). Sub-group gathers, the
ring rotation and the max are built from one sum-AllReduce of per-rank slots
(`tc2.nn.ring.slot_all_reduce`), because the CPU backend has nothing else that works in graphs.
"""
from __future__ import annotations

import functools
import os

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.ops import ReduceOp

from tc2.context import ParallelContext
from tc2.nn.ring import LAYOUTS, allreduce_rotation, neighbor_rotation, roll_rotation, slot_all_reduce
from tc2.parallel.mesh import Mesh, ParallelConfig


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
    """Concatenate the group's tensors along axis 0 for a replicated consumer; the backward
    keeps this rank's slice of the cotangent (every rank holds the whole of it already).

    CPU AllGather works on the world group only and has no backward kernel (it would need
    ReduceScatter), hence the slot all-reduce; `native=True` uses AllGather (Ascend).
    """

    def __init__(self, group: str, size: int, rank: int, native: bool = False):
        super().__init__()
        self.all_gather = ops.AllGather(group)
        self.all_reduce = ops.AllReduce(ReduceOp.SUM, group)
        self.size, self.rank, self.native = size, rank, native

    def construct(self, x):
        if self.native:
            return self.all_gather(x)
        buf = slot_all_reduce(x, self.size, self.rank, self.all_reduce)             # [R, n, ...]
        return buf.reshape((self.size * x.shape[0],) + x.shape[1:])

    def bprop(self, x, out, dout):
        n = dout.shape[0] // self.size
        return (dout[self.rank * n:(self.rank + 1) * n],)


def _max_over(size: int, rank: int, all_reduce):
    """Elementwise max over a group from a sum-only AllReduce (no gradient)."""
    def max_over_group(x):
        return slot_all_reduce(ops.stop_gradient(x), size, rank, all_reduce).max(axis=0)
    return max_over_group


@functools.lru_cache(maxsize=None)
def _world_sum():
    return ops.AllReduce(ReduceOp.SUM)


def host_sum(x) -> np.ndarray:
    """A numpy array summed over every process of the msrun job, returned to every process
    (an eager AllReduce; float32, so integers are exact below 2^24)."""
    return _world_sum()(ms.Tensor(np.asarray(x, np.float32))).asnumpy()


def barrier() -> None:
    """Wait for every process of the msrun job (host side).

    An eager all-reduce of one number, read back on the host: `mint.distributed.barrier()`
    returns at once on the CPU backend (measured on MindSpore 2.10: rank 0 "waited" 0.00 s
    while rank 1 slept 5 s), so it cannot order file writes between processes.
    """
    host_sum(np.ones(1))


def local_context(cp: int = 1, layout: str = "zigzag") -> ParallelContext:
    """One process simulating a context-parallel ring: the cp ranks' shares stacked in the batch
    dimension (`ctx.local_batch` folds them), K/V rotated by a roll. For tests and debugging."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return ParallelContext(cp=cp, layout=layout, folded=True, rotate=roll_rotation(cp) if cp > 1 else None)


def spmd_context(mesh: Mesh, *, layout: str = "zigzag", rotation: str = "allreduce",
                 zero: int = 0) -> ParallelContext:
    """This msrun rank's context: initialises communication and creates its dp/cp/tp/pp groups.

    rotation: "allreduce" (CPU: slot all-reduce, differentiable) or "neighbor" (Ascend
    NeighborExchange, untested here). zero=1: ZeRO-1 over the dp x cp group. The same arguments
    give the same context (groups are created once per process). A mesh of one process gives
    `LOCAL`'s equal.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if rotation not in ("allreduce", "neighbor"):
        raise ValueError(f"rotation must be 'allreduce' or 'neighbor', got {rotation!r}")
    if zero not in (0, 1):
        raise ValueError(f"zero must be 0 or 1 (ZeRO-1: optimizer state sharded), got {zero}")
    if mesh.size == 1:
        return ParallelContext(layout=layout)
    if "MS_ROLE" not in os.environ:
        raise ValueError(f"the layout {mesh} needs {mesh.size} processes: start it with MindSpore's "
                         f"launcher, e.g. msrun --worker_num={mesh.size} --local_worker_num={mesh.size} "
                         "--master_port=8118 --log_dir=logs --join=True <script> <args>")
    return _spmd_context(mesh, layout, rotation, zero)


@functools.lru_cache(maxsize=None)
def _spmd_context(mesh: Mesh, layout: str, rotation: str, zero: int) -> ParallelContext:
    from mindspore.communication import create_group, get_group_size, get_rank, init
    from mindspore.communication.management import GlobalComm
    if not GlobalComm.INITED:
        init()
    rank, world = get_rank(), get_group_size()
    if world != mesh.size:
        raise ValueError(f"mesh {mesh} needs {mesh.size} processes, msrun started {world} (--worker_num)")
    c = mesh.coords(rank)

    def group(axes):
        name = mesh.group_name(axes, rank)
        create_group(name, list(mesh.group(axes, rank)))
        return name

    kw = {}
    if mesh.tp > 1:
        g = group("tp")
        sum_tp = ops.AllReduce(ReduceOp.SUM, g)
        kw.update(copy_tp=CopyToGroup(g), reduce_tp=ReduceFromGroup(g), sum_tp=sum_tp,
                  gather_tp=GatherFromGroup(g, mesh.tp, c["tp"]), max_tp=_max_over(mesh.tp, c["tp"], sum_tp))
    if mesh.dp * mesh.cp > 1:
        kw["sum_dpcp"] = ops.AllReduce(ReduceOp.SUM, group(("dp", "cp")))
        if zero:
            kw.update(zero_size=mesh.dp * mesh.cp, zero_rank=mesh.group(("dp", "cp"), rank).index(rank))
    if mesh.cp > 1:
        g = group("cp")
        if rotation == "allreduce":
            kw["rotate"] = allreduce_rotation(mesh.cp, c["cp"], ops.AllReduce(ReduceOp.SUM, g))
        else:
            kw["rotate"] = neighbor_rotation(mesh.cp, c["cp"], mesh.group("cp", rank), g)
    if mesh.pp > 1:
        kw.update(sum_pp=ops.AllReduce(ReduceOp.SUM, group("pp")), pp_pass=_stage_pairs(mesh, rank, create_group))
    return ParallelContext(dp=mesh.dp, cp=mesh.cp, tp=mesh.tp, pp=mesh.pp, rank=rank, dp_rank=c["dp"],
                           cp_rank=c["cp"], tp_rank=c["tp"], pp_rank=c["pp"], layout=layout, barrier=barrier,
                           host_sum=host_sum, **kw)


def _stage_pairs(mesh: Mesh, rank: int, create_group):
    """pp_pass(lower stage s, x): the sum of x over this rank and its neighbour in the pair of
    stages (s, s+1) (same dp / cp / tp coordinates). The sender passes its tensor and the
    receiver zeros of the same shape, so both get the sender's: a point-to-point transfer
    from the sum-AllReduce the CPU backend has (no Send/Receive). Every pair a rank belongs to
    is created up front, in stage order, the same on every rank of the group."""
    c = mesh.coords(rank)
    sums = {}
    for s in range(mesh.pp - 1):
        ranks = sorted(mesh.rank(dp=c["dp"], cp=c["cp"], tp=c["tp"], pp=t) for t in (s, s + 1))
        if rank in ranks:
            name = f"tc2_pp{s}_" + "_".join(map(str, ranks))
            create_group(name, ranks)
            sums[s] = ms.jit(_sum_over(ops.AllReduce(ReduceOp.SUM, name)))

    def pp_pass(lower_stage: int, x):
        return sums[lower_stage](x)
    return pp_pass


def _sum_over(all_reduce):
    def pair_sum(x):
        return all_reduce(x)
    return pair_sum


def mesh_of(ctx: ParallelContext) -> Mesh:
    """The mesh a context belongs to (for slicing parameters and checkpoints on the host)."""
    return Mesh(dp=ctx.dp, cp=ctx.cp, tp=ctx.tp, pp=ctx.pp)


def context_for(parallel: ParallelConfig, layout: str = "zigzag") -> ParallelContext:
    """The context of this process for a requested layout (ValueError for what does not execute)."""
    return spmd_context(parallel.executable().mesh(), layout=layout, zero=parallel.zero)


def local_params(params, cfg, ctx: ParallelContext):
    """This process's shards of `params`: the full model is sliced (host side, tensor by
    tensor: its tp slices, the layers of its pipeline stage); params that already have this
    process's layout are returned as they are."""
    from tc2.parallel.sharding import local_slices, shard_params
    if ctx.tp == 1 and ctx.pp == 1:
        return params
    want = local_slices(cfg, ctx)
    full = (len(params["layers"]) == cfg.n_layer and "lm_head" in params and "word_embeddings" in params
            and tuple(params["word_embeddings"].shape) == (cfg.vocab_size, cfg.hidden_size))
    if full:
        return shard_params(params, cfg, mesh_of(ctx), ctx.rank)
    got = {n: tuple(x.shape) for n, x in _flat(params).items()}
    if got != {n: tuple(s.shape) for n, s in want.items()}:
        raise ValueError(f"params are neither the full model nor the shards of rank {ctx.rank} "
                         f"(tp={ctx.tp}, pp={ctx.pp})")
    return params


def _flat(tree):
    from tc2.tree import tree_flatten_with_names
    return tree_flatten_with_names(tree)
