"""Rotary embeddings with TeleChat2's dynamic NTK-aware base and mscale (spec §3).

L = max(total length, training_seqlen) picks alpha = 2^ceil(log2(L/base_seqlen) + 1) - 1, so
alpha only takes the values 1, 3, 7, 15, ...  In-graph, L is a Tensor (it grows while
decoding), so instead of evaluating pow/log2 in float32 we count how many doublings of
base_seqlen L exceeds (m) and gather row m of an inv_freq table computed once on the host
in float64: exact alpha, no recompilation when L changes.
"""
from __future__ import annotations

import functools
import math

import mindspore as ms
import numpy as np
from mindspore import ops

_MAX_DOUBLINGS = 24          # L up to base_seqlen * 2**24 (137M tokens at 8192)


def ntk_scaling(seq_len: int, *, base_seqlen: int, training_seqlen: int, head_dim: int,
                theta: float = 10000.0):
    """(alpha, base', mscale) for total length `seq_len`, in float64 on the host: the spec formula."""
    L = max(seq_len, training_seqlen)
    alpha = max(2 ** math.ceil(math.log2(L / base_seqlen) + 1) - 1, 1)
    base = theta * alpha ** (head_dim / (head_dim - 2))
    mscale = 1.0 if L <= training_seqlen else 0.1 * math.log(L / training_seqlen) + 1.0
    return alpha, base, mscale


@functools.lru_cache(maxsize=None)
def _inv_freq_table(head_dim: int, theta: float):
    """Row m: inv_freq for alpha = 2^(m+1) - 1 (row 0: alpha = 1). [M+1, D/2] float32."""
    m = np.arange(_MAX_DOUBLINGS + 1, dtype=np.float64)
    alpha = np.maximum(2.0 ** (m + 1) - 1, 1.0)
    alpha[0] = 1.0
    base = theta * alpha ** (head_dim / (head_dim - 2))
    inv = 1.0 / base[:, None] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return ms.Tensor(inv.astype(np.float32))


@functools.lru_cache(maxsize=None)
def _doubling_thresholds(base_seqlen: int):
    return ms.Tensor(np.array([base_seqlen * 2.0 ** j for j in range(_MAX_DOUBLINGS)], np.float32))


def rope_cos_sin(positions, seq_len, *, head_dim: int, base_seqlen: int, training_seqlen: int,
                 theta: float = 10000.0):
    """cos, sin [B, T, D] float32 (mscale folded in) for int `positions` [B, T].

    `seq_len` (int, scalar or [B] Tensor) is the GLOBAL total length L of each row: for a KV
    cache the cached plus new tokens, for ring attention the whole sequence, never the chunk.
    """
    if isinstance(seq_len, int):
        seq_len = ms.Tensor([seq_len], ms.float32)
    L = ops.maximum(seq_len.astype(ms.float32).reshape(-1, 1), float(training_seqlen))  # [B|1, 1]
    m = (L > _doubling_thresholds(base_seqlen)).astype(ms.int32).sum(axis=1)          # [B|1] doublings
    inv_freq = ops.gather(_inv_freq_table(head_dim, float(theta)), m, 0)               # [B|1, D/2]
    mscale = ops.where(L > training_seqlen, 0.1 * ops.log(L / training_seqlen) + 1.0,
                       ops.ones_like(L)).expand_dims(-1)                               # [B|1, 1, 1]
    angles = positions.astype(ms.float32).expand_dims(-1) * inv_freq.expand_dims(1)    # [B, T, D/2]
    emb = ops.concat((angles, angles), axis=-1)                                        # [B, T, D]
    return ops.cos(emb) * mscale, ops.sin(emb) * mscale


def apply_rope(x, cos, sin):
    """Half-split ("rotate_half") rotation of x [B, T, N, D] by cos/sin [B, T, D], in float32."""
    x32 = x.astype(ms.float32)
    half = x.shape[-1] // 2
    rotated = ops.concat((-x32[..., half:], x32[..., :half]), axis=-1)     # [B, T, N, D]
    cos, sin = cos.expand_dims(2), sin.expand_dims(2)                     # [B, T, 1, D]
    return (x32 * cos + rotated * sin).astype(x.dtype)


def rope(q, k, positions, seq_len, *, base_seqlen: int, training_seqlen: int,
         theta: float = 10000.0):
    """Rotate q [B, T, Nq, D] and k [B, T, Nkv, D] at `positions` for total length `seq_len`."""
    cos, sin = rope_cos_sin(positions, seq_len, head_dim=q.shape[-1], base_seqlen=base_seqlen,
                            training_seqlen=training_seqlen, theta=theta)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
