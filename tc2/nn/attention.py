"""Causal GQA attention whose mask comes from positions, computed by query blocks with a
hand-written backward.

Because the mask is `kv_pos <= q_pos` (plus optional segment ids), one function serves full
sequences, left-padded batches, a KV cache whose empty slots carry a huge position, and ring
chunks that carry their global positions. `attention_with_lse` also returns the log-sum-exp
so partial results over different K/V blocks can be merged exactly (`merge_partials`).

Why blocks and a custom backward (issue 14): autodiff of a plain softmax attention keeps a
float32 [B, Nq, Tq, Tk] mask, scores, probabilities and their cotangents per layer, and
MindSpore's CPU graphs keep every one of them to the end of the graph. Here the queries go
in blocks of BLOCK rows; with `index_causal` a block only meets the keys up to its own last
row (query i never sees a key j > i: true of every training row tc2 builds, whose positions
grow within a segment), so about half of the score matrix is never formed. The mask is one
bool [B, Tq, Tk] for all heads; GQA folds the g query heads of a KV head into the rows of one
matmul instead of repeating K and V g times. The backward (FlashAttention's) saves only the
output and the log-sum-exp and recomputes the probabilities block by block.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn, ops

from tc2.nn.take import take

_bmm_nt = ops.BatchMatMul(transpose_b=True)
_bmm_tn = ops.BatchMatMul(transpose_a=True)
_bmm = ops.BatchMatMul()
_softmax = ops.Softmax(axis=-1)        # the primitive: the functional form does not compile in bprop graphs
NEG = -1e30          # finite "minus infinity": keeps fully masked rows NaN-free
BLOCK = 128          # query rows per block: 512 rows -> 10 of 16 [128, 128] score tiles formed


def causal_mask(q_pos, kv_pos, q_segment=None, kv_segment=None):
    """bool [B, Tq, Tk]: query i sees key j iff kv_pos[j] <= q_pos[i] (and same segment)."""
    mask = kv_pos.expand_dims(1) <= q_pos.expand_dims(2)                     # [B, Tq, Tk]
    if q_segment is not None:
        mask = ops.logical_and(mask, q_segment.expand_dims(2) == kv_segment.expand_dims(1))
    return mask


def _fold_heads(x, n_kv):
    """[B, T, N, D] -> [B, n_kv, N / n_kv, T, D] float32: query head j*g+i lands in group j."""
    B, T, N, D = x.shape
    return x.astype(ms.float32).transpose(0, 2, 1, 3).reshape(B, n_kv, N // n_kv, T, D)


def _kv_heads(x):
    """[B, T, Nkv, D] -> [B, Nkv, T, D] float32."""
    return x.astype(ms.float32).transpose(0, 2, 1, 3)


class _BlockAttention(nn.Cell):
    """(q, k, v, mask) -> (out [B, Tq, Nq, D] float32, lse [B, Nq, Tq] float32) with the
    FlashAttention backward: ds = p * (dp - rowsum(do * out) + dlse)."""

    def __init__(self, block: int, index_causal: bool):
        super().__init__()
        self.block = block
        self.index_causal = index_causal

    def _bounds(self, tq, tk):
        """(first row, end row, keys seen) per query block."""
        out = []
        for s in range(0, tq, self.block):
            e = s + self.block if s + self.block < tq else tq      # (builtin min fails in bprop graphs)
            out.append((s, e, e if self.index_causal else tk))
        return out

    def _probs(self, qb, kb, mask_b):
        """Softmax of one block's scores [B, Nkv, g*Bq, Tb] (float32; masked keys exactly 0) and
        its row max. qb [B, Nkv, g, Bq, D] carries the 1/sqrt(D) scale already. A row that sees
        no key gets a uniform row here: callers zero what depends on it."""
        B, n_kv, g, bq, d = qb.shape
        tb = kb.shape[2]
        s = _bmm_nt(qb.reshape(B, n_kv, g * bq, d), kb).reshape(B, n_kv, g, bq, tb)
        s = s + ops.where(mask_b, 0.0, NEG).astype(ms.float32).reshape(B, 1, 1, bq, tb)
        s = s.reshape(B, n_kv, g * bq, tb)
        return _softmax(s), s

    def _inputs(self, q, k, v, mask):
        """Folded float32 heads (q pre-scaled), the block plan and each query row's 'sees a key'."""
        B, tq, nq, d = q.shape
        n_kv = k.shape[2]
        qh = _fold_heads(q, n_kv) * (1.0 / math.sqrt(d))                      # [B, Nkv, g, Tq, D]
        seen = mask.any(-1).astype(ms.float32).reshape(B, 1, 1, tq, 1)         # [B, 1, 1, Tq, 1]
        return qh, _kv_heads(k), _kv_heads(v), seen, self._bounds(tq, k.shape[1])

    def construct(self, q, k, v, mask):
        B, tq, nq, d = q.shape
        qh, kh, vh, seen, bounds = self._inputs(q, k, v, mask)
        n_kv, g = kh.shape[1], qh.shape[2]
        outs, lses = [], []
        for s, e, te in bounds:
            mask_b = take(take(mask, 1, s, e), 2, 0, te)
            p, sc = self._probs(take(qh, 3, s, e), take(kh, 2, 0, te), mask_b)      # [B, Nkv, g*Bq, Tb]
            outs.append(_bmm(p, take(vh, 2, 0, te)).reshape(B, n_kv, g, e - s, d))
            # log-sum-exp without another pass of exp: p_max = exp(s_max - lse)
            lse = sc.max(axis=-1, keepdims=True) - ops.log(p.max(axis=-1, keepdims=True))
            lses.append(lse.reshape(B, n_kv, g, e - s, 1))
        out = ops.concat(outs, axis=3) * seen                                  # [B, Nkv, g, Tq, D]
        lse = ops.where(seen > 0, ops.concat(lses, axis=3), NEG)               # [B, Nkv, g, Tq, 1]
        return out.reshape(B, nq, tq, d).transpose(0, 2, 1, 3), lse.reshape(B, nq, tq)

    def bprop(self, q, k, v, mask, out, dout):
        o, _ = out
        do, dlse = dout
        B, tq, nq, d = q.shape
        qh, kh, vh, seen, bounds = self._inputs(q, k, v, mask)
        n_kv, g, tk = kh.shape[1], qh.shape[2], kh.shape[2]
        doh = _fold_heads(do, n_kv) * seen                    # rows that see nothing: constant out
        # ds = p * (dp - rowsum(do * out) + dlse): the two row terms folded into one
        row = (doh * _fold_heads(o, n_kv)).sum(axis=-1, keepdims=True) \
            - dlse.astype(ms.float32).reshape(B, n_kv, g, tq, 1) * seen         # [B, Nkv, g, Tq, 1]
        dqs = []
        dk = ops.zeros((B, n_kv, tk, d), ms.float32)
        dv = ops.zeros((B, n_kv, tk, d), ms.float32)
        for s, e, te in bounds:
            rows = g * (e - s)
            qb, kb, vb = take(qh, 3, s, e), take(kh, 2, 0, te), take(vh, 2, 0, te)
            p, _ = self._probs(qb, kb, take(take(mask, 1, s, e), 2, 0, te))  # [B, Nkv, g*Bq, Tb]
            dob = take(doh, 3, s, e).reshape(B, n_kv, rows, d)
            ds = p * (_bmm_nt(dob, vb) - take(row, 3, s, e).reshape(B, n_kv, rows, 1))
            dqs.append(_bmm(ds, kb).reshape(B, n_kv, g, e - s, d))
            dk_b = _bmm_tn(ds, qb.reshape(B, n_kv, rows, d))                   # [B, Nkv, Tb, D]
            dv_b = _bmm_tn(p, dob)
            if te < tk:
                pad = ops.zeros((B, n_kv, tk - te, d), ms.float32)
                dk_b, dv_b = ops.concat((dk_b, pad), axis=2), ops.concat((dv_b, pad), axis=2)
            dk, dv = dk + dk_b, dv + dv_b
        dq = ops.concat(dqs, axis=3).reshape(B, nq, tq, d).transpose(0, 2, 1, 3) * (1.0 / math.sqrt(d))
        return (dq.astype(q.dtype), dk.transpose(0, 2, 1, 3).astype(k.dtype),
                dv.transpose(0, 2, 1, 3).astype(v.dtype), ops.zeros_like(mask))


# Stateless kernels (their block plans are Python ints, fixed per input shape at trace time).
_ANY_ORDER = _BlockAttention(BLOCK, index_causal=False)
_INDEX_CAUSAL = _BlockAttention(BLOCK, index_causal=True)


def attention_with_lse(q, k, v, q_pos, kv_pos, *, q_segment=None, kv_segment=None, index_causal=False):
    """q [B, Tq, Nq, D], k/v [B, Tk, Nkv, D] -> out [B, Tq, Nq, D] float32, lse [B, Nq, Tq] float32.

    KV head j serves query heads j*g .. j*g+g-1 (each KV head repeated g times, never tiled).
    A query row that sees no key gives out 0 and lse NEG, the identity of `merge_partials`.
    index_causal: the caller promises query i never sees a key j > i (needs Tq == Tk); key
    blocks past each query block are then skipped.
    """
    if index_causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"index_causal needs as many queries as keys, got {q.shape[1]} and {k.shape[1]}")
    mask = causal_mask(q_pos, kv_pos, q_segment, kv_segment)                  # [B, Tq, Tk]
    kernel = _INDEX_CAUSAL if index_causal else _ANY_ORDER
    return kernel(q, k, v, mask)


def attention(q, k, v, q_pos, kv_pos, *, q_segment=None, kv_segment=None, index_causal=False):
    """Softmax attention in float32; output [B, Tq, Nq, D] in q's dtype."""
    out, _ = attention_with_lse(q, k, v, q_pos, kv_pos, q_segment=q_segment,
                                kv_segment=kv_segment, index_causal=index_causal)
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
