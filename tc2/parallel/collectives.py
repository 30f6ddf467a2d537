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


def spmd_context(mesh: Mesh, *, layout: str = "zigzag", rotation: str = "allreduce") -> ParallelContext:
    """This msrun rank's context: initialises communication and creates its dp/cp/tp groups.

    rotation: "allreduce" (CPU: slot all-reduce, differentiable) or "neighbor" (Ascend
    NeighborExchange, untested here). The same arguments give the same context (groups are
    created once per process). A mesh of one process gives `LOCAL`'s equal.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if rotation not in ("allreduce", "neighbor"):
        raise ValueError(f"rotation must be 'allreduce' or 'neighbor', got {rotation!r}")
    if mesh.pp > 1:
        raise ValueError(f"mesh {mesh}: pipeline stages are not executed yet (pp must be 1)")
    if mesh.size == 1:
        return ParallelContext(layout=layout)
    if "MS_ROLE" not in os.environ:
        raise ValueError(f"the layout {mesh} needs {mesh.size} processes: start it with MindSpore's "
                         f"launcher, e.g. msrun --worker_num={mesh.size} --local_worker_num={mesh.size} "
                         "--master_port=8118 --log_dir=logs --join=True <script> <args>")
    return _spmd_context(mesh, layout, rotation)


@functools.lru_cache(maxsize=None)
def _spmd_context(mesh: Mesh, layout: str, rotation: str) -> ParallelContext:
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
    if mesh.cp > 1:
        g = group("cp")
        if rotation == "allreduce":
            kw["rotate"] = allreduce_rotation(mesh.cp, c["cp"], ops.AllReduce(ReduceOp.SUM, g))
        else:
            kw["rotate"] = neighbor_rotation(mesh.cp, c["cp"], mesh.group("cp", rank), g)
    return ParallelContext(dp=mesh.dp, cp=mesh.cp, tp=mesh.tp, rank=rank, dp_rank=c["dp"], cp_rank=c["cp"],
                           tp_rank=c["tp"], layout=layout, barrier=barrier, host_sum=host_sum, **kw)


def mesh_of(ctx: ParallelContext) -> Mesh:
    """The mesh a context belongs to (for slicing parameters and checkpoints on the host)."""
    return Mesh(dp=ctx.dp, cp=ctx.cp, tp=ctx.tp)


def context_for(parallel: ParallelConfig, layout: str = "zigzag") -> ParallelContext:
    """The context of this process for a requested layout (ValueError for what does not execute)."""
    return spmd_context(parallel.executable().mesh(), layout=layout)


def local_params(params, cfg, ctx: ParallelContext):
    """This process's shards of `params`: the full model is sliced (host side, tensor by
    tensor); params that already have this process's shapes are returned as they are."""
    from tc2.parallel.sharding import local_slices, shard_params
    if ctx.tp == 1:
        return params
    if tuple(params["word_embeddings"].shape) == (cfg.vocab_size, cfg.hidden_size):
        return shard_params(params, cfg, mesh_of(ctx), ctx.rank)
    want = local_slices(cfg, ctx)["word_embeddings"].shape
    if tuple(params["word_embeddings"].shape) != tuple(want):
        raise ValueError(f"params are neither the full model nor the tp={ctx.tp} shards of rank {ctx.rank} "
                         f"(word_embeddings {tuple(params['word_embeddings'].shape)})")
    return params
