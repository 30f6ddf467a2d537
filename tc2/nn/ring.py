"""Ring attention: each context-parallel rank keeps its queries and passes K/V around the ring.

At step 0 a rank attends to its own K/V chunk; at each later step it receives the chunk the
previous rank held (K, V, their GLOBAL positions and segment ids travel together) and merges
the partial result with the running one through (out, lse) in float32 (`merge_partials`).
After ring_size - 1 rotations every query has seen every key, with the mask built from
global positions (kv_pos <= q_pos), so the result equals full causal attention.

The rotation is injected, so the same loop runs everywhere:
* `roll_rotation(R)`: single process, the R ranks folded into the batch dimension
  ([R*B, ...], rank-major); a rotation is a roll along that rank axis (tests, simulation).
* `allreduce_rotation(R, rank, all_reduce)`: across msrun ranks on CPU, where Send/Receive do
  not exist: write my block into my slot of a zero buffer, all-reduce (sum), read the previous
  rank's slot. Differentiable through AllReduce's own backward (R x the traffic of a shift).
* `neighbor_rotation(...)`: NeighborExchange for Ascend (not available on CPU).

Layouts (`sequence_index`, `fold_ranks`; host-side rearrangements written with einops, which
cannot run inside ms.jit): "contiguous" gives rank r the r-th of R equal chunks; "zigzag"
cuts the sequence into 2R chunks and gives rank r chunks r and 2R-1-r, so every rank does the
same causal work. Sequences are padded to a multiple of the chunk count with position PAD_POS,
which no real query attends to.
"""
from __future__ import annotations

from typing import Callable, Tuple

import mindspore as ms
import numpy as np
from einops import rearrange
from mindspore import ops

from tc2.nn.attention import attention_with_lse, merge_partials

LAYOUTS = ("contiguous", "zigzag")
_POS_SPLIT = 1 << 15          # positions travel as two exact float32 halves (CPU AllReduce is float only)


def ring_attention(q, k, v, q_pos, kv_pos, *, rotate: Callable, ring_size: int, q_segment=None,
                   kv_segment=None):
    """Local queries q [B, Tq, Nq, D] against the K/V [B, Tk, Nkv, D] of every ring rank.

    q_pos [B, Tq], kv_pos [B, Tk]: GLOBAL int32 positions. `rotate(block)` maps the tuple of
    tensors this rank holds to the tuple the previous rank held. Returns (out [B, Tq, Nq, D]
    float32, lse [B, Nq, Tq] float32), like `attention_with_lse` over the whole sequence.
    """
    out, lse = attention_with_lse(q, k, v, q_pos, kv_pos, q_segment=q_segment,
                                  kv_segment=kv_segment)
    d = k.shape[-1]
    kv = ops.concat((k, v), axis=-1)                                         # [B, Tk, Nkv, 2D]
    block = (kv, kv_pos) if kv_segment is None else (kv, kv_pos, kv_segment)
    for _ in range(ring_size - 1):
        block = rotate(block)
        seg = None if kv_segment is None else block[2]
        o, l = attention_with_lse(q, block[0][..., :d], block[0][..., d:], q_pos, block[1],
                                  q_segment=q_segment, kv_segment=seg)
        out, lse = merge_partials(out, lse, o, l)
    return out, lse


# ---------------------------------------------------------------------------------------------
# rotations
def roll_rotation(ring_size: int) -> Callable:
    """In-process rotation: tensors are [R*B, ...] with rank r in rows r*B .. r*B+B-1."""
    def rotate(block):
        out = ()
        for x in block:
            b = x.shape[0] // ring_size
            out = out + (ops.concat((x[(ring_size - 1) * b:], x[:(ring_size - 1) * b]), axis=0),)
        return out
    return rotate


def encode_exact(x):
    """Tensor -> float tensor a float-only AllReduce carries exactly (ints as two halves)."""
    if x.dtype in (ms.int32, ms.int64):
        x = x.astype(ms.int32)
        hi = ops.floor_divide(x, _POS_SPLIT)
        lo = x - hi * _POS_SPLIT
        return ops.stack((hi, lo), axis=-1).astype(ms.float32)               # [..., 2]
    return x


def decode_exact(y, like):
    if like.dtype in (ms.int32, ms.int64):
        y = ops.round(y).astype(ms.int32)
        return (y[..., 0] * _POS_SPLIT + y[..., 1]).astype(like.dtype)
    return y


def slot_all_reduce(x, size: int, rank: int, all_reduce):
    """[size, *x.shape]: every group member's x in its slot, through one sum-AllReduce.

    The CPU backend has no Send/Receive, no AllGather on sub-groups and no MAX reduction;
    writing x into this rank's slot of a zero buffer and summing gives all of them (size x the
    traffic), differentiably through AllReduce's own backward.
    """
    zeros = ops.zeros((1,) + x.shape, x.dtype)
    slots = ()
    for r in range(size):
        slots = slots + ((x.expand_dims(0) if r == rank else zeros),)
    return all_reduce(ops.concat(slots, axis=0))                                 # [R, ...]


def slot_shift(x, ring_size: int, ring_rank: int, all_reduce, offset: int = 1):
    """The value of x on ring rank (ring_rank - offset) % R, through one sum-AllReduce."""
    return slot_all_reduce(x, ring_size, ring_rank, all_reduce)[(ring_rank - offset) % ring_size]


def allreduce_rotation(ring_size: int, ring_rank: int, all_reduce) -> Callable:
    """Rotation across processes from a sum-AllReduce over the ring's group (CPU path).

    `all_reduce` is e.g. `ops.AllReduce(ReduceOp.SUM, group)`; `ring_rank` is this process's
    index in the group (static: each process compiles its own graph). Integer tensors travel
    as two exact float halves, because the CPU AllReduce kernel is float-only.
    """
    def rotate(block):
        out = ()
        for x in block:
            out = out + (decode_exact(slot_shift(encode_exact(x), ring_size, ring_rank, all_reduce), x),)
        return out
    return rotate


def neighbor_rotation(ring_size: int, ring_rank: int, group_ranks: Tuple[int, ...], group: str) -> Callable:
    """Point-to-point rotation for Ascend (NeighborExchange: send to next, receive from previous).

    Not runnable on CPU (MindSpore has no CPU NeighborExchange kernel), so UNTESTED here: kept
    so production swaps only the injected function. `group_ranks` are the global ranks of the
    ring in order; check on Ascend whether NeighborExchange wants global or group-local ids.
    """
    nxt = group_ranks[(ring_rank + 1) % ring_size]
    prv = group_ranks[(ring_rank - 1) % ring_size]

    def rotate(block):
        out = ()
        for x in block:
            exchange = ops.NeighborExchange(send_rank_ids=[nxt], recv_rank_ids=[prv],
                                            recv_shapes=(list(x.shape),), send_shapes=(list(x.shape),),
                                            recv_type=x.dtype, group=group)
            out = out + (exchange((x,))[0],)
        return out
    return rotate


# ---------------------------------------------------------------------------------------------
# sequence layouts (host side)
def padded_length(seq_len: int, ring_size: int, layout: str = "zigzag") -> int:
    """Smallest length >= seq_len that splits into the layout's equal chunks."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if ring_size == 1:
        return seq_len
    n = 2 * ring_size if layout == "zigzag" else ring_size
    return -(-seq_len // n) * n


def sequence_index(seq_len: int, ring_size: int, rank: int, layout: str = "zigzag") -> np.ndarray:
    """Indices (into a sequence padded to `padded_length`) that ring rank `rank` holds, in order."""
    T = padded_length(seq_len, ring_size, layout)
    if not 0 <= rank < ring_size:
        raise ValueError(f"rank {rank} is outside a ring of {ring_size}")
    if layout == "contiguous" or ring_size == 1:
        c = T // ring_size
        return np.arange(rank * c, (rank + 1) * c)
    c = T // (2 * ring_size)
    late = 2 * ring_size - 1 - rank
    return np.concatenate([np.arange(rank * c, (rank + 1) * c), np.arange(late * c, (late + 1) * c)])


def ring_permutation(seq_len: int, ring_size: int, layout: str = "zigzag") -> np.ndarray:
    """All ranks' indices concatenated rank-major: padded[perm] is the ring-ordered sequence."""
    return np.concatenate([sequence_index(seq_len, ring_size, r, layout) for r in range(ring_size)])



def fold_ranks(x: np.ndarray, ring_size: int, layout: str = "zigzag", pad_value=0) -> np.ndarray:
    """Host side: [B, T, ...] -> [R*B, Tp/R, ...], padded and dealt out to the ranks (rank-major).

    The input of an in-process ring (`roll_rotation`); rank r's rows are what rank r of a real
    context-parallel group would hold: contiguous chunk r, or zigzag chunks r and 2R-1-r.
    """
    x = np.asarray(x)
    B, T = x.shape[:2]
    Tp = padded_length(T, ring_size, layout)
    if Tp > T:
        x = np.concatenate([x, np.full((B, Tp - T) + x.shape[2:], pad_value, x.dtype)], axis=1)
    if layout == "contiguous" or ring_size == 1:
        return rearrange(x, "b (r c) ... -> (r b) c ...", r=ring_size)
    chunks = rearrange(x, "b (n c) ... -> n b c ...", n=2 * ring_size)               # [2R, B, c, ...]
    pairs = np.stack([chunks[:ring_size], chunks[::-1][:ring_size]], axis=2)        # [R, B, 2, c, ...]
    return rearrange(pairs, "r b two c ... -> (r b) (two c) ...")


def unfold_ranks(y: np.ndarray, ring_size: int, seq_len: int, layout: str = "zigzag", axis: int = 1) -> np.ndarray:
    """Inverse of `fold_ranks` for a per-token result whose sequence axis is `axis` (padding dropped)."""
    y = np.moveaxis(np.asarray(y), axis, 1)                                          # [R*B, Tl, ...]
    if layout == "contiguous" or ring_size == 1:
        out = rearrange(y, "(r b) c ... -> b (r c) ...", r=ring_size)
    else:
        pairs = rearrange(y, "(r b) (two c) ... -> r b two c ...", r=ring_size, two=2)
        chunks = np.concatenate([pairs[:, :, 0], pairs[::-1, :, 1]], axis=0)        # [2R, B, c, ...]
        out = rearrange(chunks, "n b c ... -> b (n c) ...")
    return np.moveaxis(out[:, :seq_len], 1, axis)
