"""KV cache: a pytree with a static max length, so prefill and decode compile once.

cache = {"k": (per layer [B, Tmax, Nkv, D]), "v": (same), "pos": [B, Tmax] int32,
         "length": [B] int32 (slots written so far)}
Keys are stored after rotation (as the official code does), so each key keeps the dynamic-NTK
rotation of the length at which it was written. Empty and padding slots hold position PAD_POS,
which the causal mask (kv_pos <= q_pos) never admits: no separate validity mask is needed.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

PAD_POS = 1 << 30


def init_cache(cfg, batch: int, max_len: int, dtype=None, *, ctx=None) -> dict:
    """An empty cache for `batch` rows of `max_len` slots, in the compute dtype by default.
    Under tensor parallelism (`ctx.tp` > 1) a rank caches only its own KV heads."""
    dtype = dtype or cfg.compute_dtype
    tp = 1 if ctx is None else ctx.tp
    shape = (batch, max_len, cfg.num_key_value_heads // tp, cfg.head_dim)
    return {
        "k": tuple(ops.zeros(shape, dtype) for _ in range(cfg.n_layer)),
        "v": tuple(ops.zeros(shape, dtype) for _ in range(cfg.n_layer)),
        "pos": ops.full((batch, max_len), PAD_POS, dtype=ms.int32),
        "length": ops.zeros((batch,), ms.int32),
    }


def cache_slots(length, new_len: int, max_len: int):
    """For each slot s of each row: which new token lands there (idx [B, Tmax]) and whether one does.

    Tokens that would land past Tmax are dropped: graph mode cannot raise on tensor values, so
    callers size the cache up front (tc2.generate checks prompt + budget <= max_len on the host).
    """
    idx = ops.arange(max_len, dtype=ms.int32).expand_dims(0) - length.expand_dims(1)   # [B, Tmax]
    hit = ops.logical_and(idx >= 0, idx < new_len)
    return ops.clip(idx, 0, new_len - 1), hit


def write_slots(buf, new, idx, hit):
    """buf [B, Tmax, ...] with new [B, T, ...] written at the slots `cache_slots` chose."""
    moved = ops.gather(new, idx, 1, batch_dims=1)                                       # [B, Tmax, ...]
    while hit.ndim < buf.ndim:
        hit = hit.expand_dims(-1)
    return ops.where(hit, moved, buf)
