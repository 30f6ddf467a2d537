"""Causal GQA attention whose mask comes from positions, not array indices.

Because the mask is `kv_pos <= q_pos` (plus optional segment ids), one function serves full
sequences, left-padded batches, a KV cache whose empty slots carry a huge position, and ring
chunks that carry their global positions. `attention_with_lse` also returns the log-sum-exp
so partial results over different K/V blocks can be merged exactly (`merge_partials`).
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import ops

_bmm_nt = ops.BatchMatMul(transpose_b=True)
_bmm = ops.BatchMatMul()
NEG = -1e30          # finite "minus infinity": keeps fully masked rows NaN-free


def causal_mask(q_pos, kv_pos, q_segment=None, kv_segment=None):
    """bool [B, 1, Tq, Tk]: query i sees key j iff kv_pos[j] <= q_pos[i] (and same segment)."""
    mask = kv_pos.expand_dims(1) <= q_pos.expand_dims(2)                     # [B, Tq, Tk]
    if q_segment is not None:
        mask = ops.logical_and(mask, q_segment.expand_dims(2) == kv_segment.expand_dims(1))
    return mask.expand_dims(1)


def attention_with_lse(q, k, v, q_pos, kv_pos, *, q_segment=None, kv_segment=None, scale=None):
    """q [B, Tq, Nq, D], k/v [B, Tk, Nkv, D] -> out [B, Tq, Nq, D] float32, lse [B, Nq, Tq] float32.

    KV head j serves query heads j*g .. j*g+g-1 (repeat each KV head g times, never tile).
    A query row that sees no key gives out 0 and lse NEG, the identity of `merge_partials`.
    """
    n_q, n_kv, d = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh = q.transpose(0, 2, 1, 3)                                             # [B, Nq, Tq, D]
    kh = k.transpose(0, 2, 1, 3)                                             # [B, Nkv, Tk, D]
    vh = v.transpose(0, 2, 1, 3)
    if n_q != n_kv:
        kh = ops.repeat_interleave(kh, n_q // n_kv, axis=1)                  # [B, Nq, Tk, D]
        vh = ops.repeat_interleave(vh, n_q // n_kv, axis=1)
    s = _bmm_nt(qh, kh).astype(ms.float32) * scale                          # [B, Nq, Tq, Tk]
    # Full-shape mask and fill, fused softmax: on CPU graphs, broadcasting inside where/sub/div
    # over [B, N, Tq, Tk] kept extra buffers alive (7.9 -> 4.x GB for a 57M model at 4x512).
    mask = causal_mask(q_pos, kv_pos, q_segment, kv_segment).broadcast_to(s.shape)
    s = ops.select(mask, s, ops.full_like(s, NEG))
    p = ops.softmax(s, -1)
    lse = ops.logsumexp(s, -1, True)                                         # [B, Nq, Tq, 1]
    seen = mask.any(-1, keep_dims=True)                                      # [B, Nq, Tq, 1]
    out = _bmm(p.astype(v.dtype), vh).astype(ms.float32)                    # [B, Nq, Tq, D]
    out = ops.where(seen, out, 0.0)
    lse = ops.where(seen, lse, NEG)
    return out.transpose(0, 2, 1, 3), lse.squeeze(-1)


def attention(q, k, v, q_pos, kv_pos, *, q_segment=None, kv_segment=None, scale=None):
    """Softmax attention in float32; output [B, Tq, Nq, D] in q's dtype."""
    out, _ = attention_with_lse(q, k, v, q_pos, kv_pos, q_segment=q_segment,
                                kv_segment=kv_segment, scale=scale)
    return out.astype(q.dtype)


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Combine attention over two disjoint key blocks: out [B, T, N, D], lse [B, N, T], float32.

    The sigmoid form `out_a - sigmoid(lse_b - lse_a) * (out_a - out_b)` stays exact when one
    side is empty (lse = NEG) and never forms exp of a large number.
    """
    w_b = ops.sigmoid(lse_b - lse_a).transpose(0, 2, 1).expand_dims(-1)    # [B, T, N, 1]
    out = out_a - w_b * (out_a - out_b)
    hi = ops.maximum(lse_a, lse_b)
    lse = hi + ops.log(1.0 + ops.exp(-ops.abs(lse_a - lse_b)))
    return out, lse
