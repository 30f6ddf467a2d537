"""Layer kernels vs float64 numpy references, in PyNative and in graph mode (ms.jit)."""
import math

import mindspore as ms
import numpy as np
import pytest

import numpy_ref as ref
from tc2.nn import (apply_rope, attention, attention_with_lse, linear, merge_partials, ntk_scaling,
                    rms_norm, rope, rope_cos_sin, swiglu)

rng = np.random.default_rng(0)
T32 = lambda a: ms.Tensor(np.asarray(a, np.float32))  # noqa: E731
I32 = lambda a: ms.Tensor(np.asarray(a, np.int32))    # noqa: E731


@ms.jit
def _jit_rms(x, w):
    return rms_norm(x, w, 1e-5)


@ms.jit
def _jit_swiglu(x, g, u, d, b):
    return swiglu(x, g, u, d, b)


@ms.jit
def _jit_attention_lse(q, k, v, qp, kp):
    return attention_with_lse(q, k, v, qp, kp)


@ms.jit
def _jit_rope_cos_sin(pos, L):
    return rope_cos_sin(pos, L, head_dim=16, base_seqlen=32, training_seqlen=32)


@pytest.mark.parametrize("graph", [False, True])
def test_rms_norm(graph):
    x, w = rng.standard_normal((2, 5, 48)), rng.standard_normal(48)
    got = (_jit_rms if graph else lambda a, b: rms_norm(a, b, 1e-5))(T32(x), T32(w)).asnumpy()
    np.testing.assert_allclose(got, ref.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-5)


def test_rms_norm_keeps_float16_dtype_but_computes_in_float32():
    x = rng.standard_normal((3, 64)) * 300           # x^2 overflows float16 (max 65504)
    out = rms_norm(T32(x).astype(ms.float16), T32(np.ones(64)), 1e-5)
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy().astype(np.float64), ref.rms_norm(x, 1.0, 1e-5), rtol=2e-3, atol=2e-3)


def test_linear_with_and_without_bias():
    x, w, b = rng.standard_normal((2, 3, 8)), rng.standard_normal((5, 8)), rng.standard_normal(5)
    np.testing.assert_allclose(linear(T32(x), T32(w), T32(b)).asnumpy(), x @ w.T + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(linear(T32(x), T32(w)).asnumpy(), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("graph", [False, True])
def test_swiglu(graph):
    x = rng.standard_normal((2, 4, 16))
    g, u, d, b = (rng.standard_normal(s) * 0.3 for s in [(24, 16), (24, 16), (16, 24), (16,)])
    want = (ref.silu(x @ g.T) * (x @ u.T)) @ d.T + b
    fn = _jit_swiglu if graph else swiglu
    np.testing.assert_allclose(fn(*map(T32, (x, g, u, d, b))).asnumpy(), want, rtol=1e-4, atol=1e-5)


# ---- RoPE ------------------------------------------------------------------------------------

@pytest.mark.parametrize("L,alpha,base,mscale", [
    (8192, 1, 10000.0, 1.0),
    (8193, 3, 30527.7, 0.1 * math.log(8193 / 8192) + 1),
    (16384, 3, 30527.7, 1.06931),
    (16385, 7, 72195.9, 0.1 * math.log(16385 / 8192) + 1),
    (32768, 7, 72195.9, 1.13863),
    (40000, 15, 156588.3, 0.1 * math.log(40000 / 8192) + 1),
    (65536, 15, 156588.3, 1.20794),
    (131072, 31, 327366.4, 1.27726),
    (100, 1, 10000.0, 1.0),
])
def test_ntk_scaling_matches_spec_table(L, alpha, base, mscale):
    a, b, m = ntk_scaling(L, base_seqlen=8192, training_seqlen=8192, head_dim=128)
    assert a == alpha
    assert b == pytest.approx(base, abs=0.06)        # the table prints one decimal
    assert m == pytest.approx(mscale, abs=5e-6)      # the table prints five decimals


@pytest.mark.parametrize("L", [8192, 8193, 16384, 16385, 32768, 40000])
def test_in_graph_rope_uses_the_formula_for_total_length(L):
    """cos/sin computed in graph (L a Tensor) == the float64 formula at real 128-dim scale."""
    pos = np.array([[0, 1, 7, 1000, L - 1]])
    cos, sin = rope_cos_sin(I32(pos), ms.Tensor([L], ms.int32), head_dim=128, base_seqlen=8192,
                            training_seqlen=8192)
    _, base, mscale = ntk_scaling(L, base_seqlen=8192, training_seqlen=8192, head_dim=128)
    ang = pos[0][:, None] * (1.0 / base ** (np.arange(0, 128, 2) / 128))[None]
    emb = np.concatenate([ang, ang], -1)
    # float32 angles: |angle| <= 4e4 rad has an ulp of 4e-3, so compare the rotation per position
    np.testing.assert_allclose(cos.asnumpy()[0], mscale * np.cos(emb), atol=4e-3 * mscale)
    np.testing.assert_allclose(sin.asnumpy()[0], mscale * np.sin(emb), atol=4e-3 * mscale)
    # small positions are exact to float32 rounding
    np.testing.assert_allclose(cos.asnumpy()[0, :3], mscale * np.cos(emb[:3]), rtol=1e-5, atol=1e-6)


def test_rope_graph_L_changes_without_recompiling_and_matches_pynative():
    pos = I32([[0, 3, 40, 70]])
    for L in (10, 33, 64, 65, 200):
        g = _jit_rope_cos_sin(pos, ms.Tensor([L], ms.int32))
        e = rope_cos_sin(pos, L, head_dim=16, base_seqlen=32, training_seqlen=32)
        for a, b in zip(g, e):
            np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-6, atol=1e-6)


def test_apply_rope_matches_reference_half_split():
    x = rng.standard_normal((1, 6, 3, 16))
    pos = np.array([0, 1, 2, 50, 51, 99])
    for L in (6, 40, 100):                             # training_seqlen 32: 40 and 100 scale
        cos, sin = rope_cos_sin(I32(pos[None]), L, head_dim=16, base_seqlen=32, training_seqlen=32)
        base, mscale = ref.ntk(L, type("C", (), dict(training_seqlen=32, base_seqlen=32, rope_theta=1e4, head_dim=16)))
        got = apply_rope(T32(x), cos, sin).asnumpy()[0]
        np.testing.assert_allclose(got, ref.rope(x[0], pos, base, mscale), rtol=1e-5, atol=1e-5)


def test_rope_beyond_training_seqlen_changes_rotation_exactly_as_formula():
    q = rng.standard_normal((1, 4, 2, 16))
    k = rng.standard_normal((1, 4, 1, 16))
    pos = I32([[0, 5, 31, 32]])
    q1, _ = rope(T32(q), T32(k), pos, 32, base_seqlen=32, training_seqlen=32)
    q2, _ = rope(T32(q), T32(k), pos, 33, base_seqlen=32, training_seqlen=32)   # one past: alpha 3
    assert not np.allclose(q1.asnumpy(), q2.asnumpy())
    cfg = type("C", (), dict(training_seqlen=32, base_seqlen=32, rope_theta=1e4, head_dim=16))
    base, mscale = ref.ntk(33, cfg)
    assert mscale == pytest.approx(0.1 * math.log(33 / 32) + 1)
    np.testing.assert_allclose(q2.asnumpy()[0], ref.rope(q[0], np.array([0, 5, 31, 32]), base, mscale),
                               rtol=1e-5, atol=1e-5)
    # position 0 is never rotated, only scaled by mscale
    np.testing.assert_allclose(q2.asnumpy()[0, 0], q[0, 0] * mscale, rtol=1e-5, atol=1e-6)


def test_rope_per_row_total_length():
    """Rows of one batch may have different total lengths (a KV cache with ragged rows)."""
    pos = I32([[0, 1, 2, 40], [0, 1, 2, 40]])
    cos, _ = rope_cos_sin(pos, ms.Tensor([41, 100], ms.int32), head_dim=16, base_seqlen=32, training_seqlen=32)
    one, _ = rope_cos_sin(pos[:1], 100, head_dim=16, base_seqlen=32, training_seqlen=32)
    np.testing.assert_allclose(cos.asnumpy()[1], one.asnumpy()[0], rtol=1e-6)
    assert not np.allclose(cos.asnumpy()[0], cos.asnumpy()[1])


# ---- attention -------------------------------------------------------------------------------

def _attention_inputs(B=2, T=7, S=7, nq=8, nkv=2, d=16):
    return (rng.standard_normal((B, T, nq, d)), rng.standard_normal((B, S, nkv, d)),
            rng.standard_normal((B, S, nkv, d)))


@pytest.mark.parametrize("graph", [False, True])
def test_gqa_causal_attention_vs_reference(graph):
    q, k, v = _attention_inputs()
    pos = np.tile(np.arange(7), (2, 1))
    fn = _jit_attention_lse if graph else attention_with_lse
    out, lse = fn(T32(q), T32(k), T32(v), I32(pos), I32(pos))
    for b in range(2):
        want = ref.attention(q[b], k[b], v[b], pos[b][None, :] <= pos[b][:, None])
        np.testing.assert_allclose(out.asnumpy()[b], want, rtol=1e-5, atol=1e-5)
        g = 4
        s = np.einsum("tnd,snd->nts", q[b], np.repeat(k[b], g, 1)) / 4.0
        s = np.where((pos[b][None, :] <= pos[b][:, None])[None], s, -np.inf)
        want_lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
        np.testing.assert_allclose(lse.asnumpy()[b], want_lse, rtol=1e-5, atol=1e-5)


def test_gqa_repeats_each_kv_head_consecutively_never_tiles():
    """Query head i must use KV head i // g: make KV heads distinguishable and check."""
    B, T, d = 1, 3, 4
    q = np.ones((B, T, 4, d))
    k = np.zeros((B, T, 2, d))
    v = np.stack([np.full((B, T, d), 1.0), np.full((B, T, d), 2.0)], axis=2)     # head j has value j+1
    pos = np.arange(T)[None]
    out = attention(T32(q), T32(k), T32(v), I32(pos), I32(pos)).asnumpy()
    np.testing.assert_allclose(out[0, :, :, 0], [[1, 1, 2, 2]] * T)


def test_mask_comes_from_positions_not_indices():
    """Shuffling the key order (with its positions) and padding keys with a huge position change nothing."""
    q, k, v = _attention_inputs(B=1, T=4, S=6)
    qpos = np.array([[2, 3, 4, 5]])
    kpos = np.arange(6)[None]
    base = attention(T32(q), T32(k), T32(v), I32(qpos), I32(kpos)).asnumpy()
    perm = np.array([3, 0, 5, 1, 4, 2])
    shuffled = attention(T32(q), T32(k[:, perm]), T32(v[:, perm]), I32(qpos), I32(kpos[:, perm])).asnumpy()
    np.testing.assert_allclose(shuffled, base, rtol=1e-5, atol=1e-6)
    kp = np.concatenate([k, rng.standard_normal((1, 2, 2, 16)) * 50], 1)
    vp = np.concatenate([v, rng.standard_normal((1, 2, 2, 16)) * 50], 1)
    padded = attention(T32(q), T32(kp), T32(vp), I32(qpos),
                       I32(np.concatenate([kpos, [[1 << 30, 1 << 30]]], 1))).asnumpy()
    np.testing.assert_allclose(padded, base, rtol=1e-5, atol=1e-6)


def test_segments_stop_attention_across_documents():
    q, k, v = _attention_inputs(B=1, T=6, S=6)
    pos = np.array([[0, 1, 2, 0, 1, 2]])                 # two packed documents
    seg = np.array([[1, 1, 1, 2, 2, 2]])
    out = attention(T32(q), T32(k), T32(v), I32(pos), I32(pos), q_segment=I32(seg), kv_segment=I32(seg))
    for lo in (0, 3):
        sl = slice(lo, lo + 3)
        p = np.arange(3)
        want = ref.attention(q[0, sl], k[0, sl], v[0, sl], p[None, :] <= p[:, None])
        np.testing.assert_allclose(out.asnumpy()[0, sl], want, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_give_zero_and_neg_lse_without_nan():
    q, k, v = _attention_inputs(B=1, T=2, S=3)
    out, lse = attention_with_lse(T32(q), T32(k), T32(v), I32([[0, 1]]), I32([[5, 6, 7]]))
    assert np.all(out.asnumpy() == 0) and np.all(lse.asnumpy() < -1e29)


@pytest.mark.parametrize("split", [1, 3, 5])
def test_merge_partials_equals_attention_over_all_keys(split):
    q, k, v = _attention_inputs(B=2, T=4, S=7)
    qpos = np.tile([3, 4, 5, 6], (2, 1))
    kpos = np.tile(np.arange(7), (2, 1))
    full, full_lse = attention_with_lse(T32(q), T32(k), T32(v), I32(qpos), I32(kpos))
    a = attention_with_lse(T32(q), T32(k[:, :split]), T32(v[:, :split]), I32(qpos), I32(kpos[:, :split]))
    b = attention_with_lse(T32(q), T32(k[:, split:]), T32(v[:, split:]), I32(qpos), I32(kpos[:, split:]))
    out, lse = merge_partials(*a, *b)
    np.testing.assert_allclose(out.asnumpy(), full.asnumpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse.asnumpy(), full_lse.asnumpy(), rtol=1e-5, atol=1e-5)


def test_merge_partials_with_an_empty_side_is_identity():
    q, k, v = _attention_inputs(B=1, T=2, S=3)
    seen = attention_with_lse(T32(q), T32(k), T32(v), I32([[5, 6]]), I32([[0, 1, 2]]))
    empty = attention_with_lse(T32(q), T32(k), T32(v), I32([[5, 6]]), I32([[7, 8, 9]]))
    for order in ((seen, empty), (empty, seen)):
        out, lse = merge_partials(*order[0], *order[1])
        np.testing.assert_allclose(out.asnumpy(), seen[0].asnumpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(lse.asnumpy(), seen[1].asnumpy(), rtol=1e-6)


# ---- blockwise kernel: gradients and block skipping -----------------------------------------

def _packed_row_inputs(T=7, nq=4, nkv=2, d=4, seed=1):
    """One training-like row: two packed documents (positions restart) and two trailing pads."""
    r = np.random.default_rng(seed)
    q, k, v = (r.standard_normal((1, T, n, d)) for n in (nq, nkv, nkv))
    pos = np.array([[0, 1, 2, 0, 1, 5, 6]])[:, :T]
    seg = np.array([[1, 1, 1, 2, 2, 0, 0]])[:, :T]
    w_out, w_lse = r.standard_normal((1, T, nq, d)), r.standard_normal((1, nq, T))
    return q, k, v, pos, seg, w_out, w_lse


def _ref_loss(q, k, v, pos, seg, w_out, w_lse):
    """float64: sum(out * w_out) + sum(lse * w_lse) of masked softmax attention (row 0)."""
    ok = (pos[0][None, :] <= pos[0][:, None]) & (seg[0][None, :] == seg[0][:, None])
    out = ref.attention(q[0], k[0], v[0], ok)
    g = q.shape[2] // k.shape[2]
    s = np.einsum("tnd,snd->nts", q[0], np.repeat(k[0], g, 1)) / math.sqrt(q.shape[-1])
    s = np.where(ok[None], s, -np.inf)
    mx = s.max(-1, keepdims=True)
    lse = (np.log(np.exp(s - mx).sum(-1, keepdims=True)) + mx)[..., 0]          # [N, T]
    return (out * w_out[0]).sum() + (lse * w_lse[0]).sum()


def _finite_difference(f, arrays, eps=1e-6):
    grads = []
    for i, a in enumerate(arrays):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            hi = [x.copy() for x in arrays]
            lo = [x.copy() for x in arrays]
            hi[i][idx] += eps
            lo[i][idx] -= eps
            g[idx] = (f(*hi) - f(*lo)) / (2 * eps)
        grads.append(g)
    return grads


def _kernel_loss(kernel):
    def loss(q, k, v, mask, w_out, w_lse):
        out, lse = kernel(q, k, v, mask)
        return (out * w_out).sum() + (lse * w_lse).sum()
    return loss


@pytest.mark.parametrize("index_causal", [False, True])
@pytest.mark.parametrize("graph", [False, True])
def test_block_attention_gradients_vs_float64(index_causal, graph):
    """Blocks of 3 rows over 7 (3 + 3 + 1): the hand-written backward (dq, dk, dv, through out
    AND lse) against central differences of the float64 reference."""
    from tc2.nn.attention import _BlockAttention, causal_mask
    q, k, v, pos, seg, w_out, w_lse = _packed_row_inputs()
    kernel = _BlockAttention(3, index_causal=index_causal)
    grad = ms.grad(_kernel_loss(kernel), grad_position=(0, 1, 2))
    grad = ms.jit(grad) if graph else grad
    mask = causal_mask(I32(pos), I32(pos), I32(seg), I32(seg))
    got = grad(T32(q), T32(k), T32(v), mask, T32(w_out), T32(w_lse))
    want = _finite_difference(lambda a, b, c: _ref_loss(a, b, c, pos, seg, w_out, w_lse), [q, k, v])
    for g_, w_, name in zip(got, want, "qkv"):
        np.testing.assert_allclose(g_.asnumpy(), w_, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")
    out, lse = kernel(T32(q), T32(k), T32(v), mask)
    assert abs(((out.asnumpy() * w_out).sum() + (lse.asnumpy() * w_lse).sum())
               - _ref_loss(q, k, v, pos, seg, w_out, w_lse)) < 1e-4


def test_index_causal_skips_blocks_without_changing_results():
    """Blocks over 300 rows (128 + 128 + 44) with document masking: skipping the key blocks past
    each query block gives the same output, lse and gradients as visiting every key."""
    r = np.random.default_rng(2)
    B, T, nq, nkv, d = 2, 300, 4, 2, 8
    q, k, v = (T32(r.standard_normal((B, T, n, d))) for n in (nq, nkv, nkv))
    pos = np.tile(np.arange(T), (B, 1))
    pos[1, 170:] -= 170                                   # row 1: a second document from 170
    seg = np.ones((B, T), np.int64)
    seg[1, 170:] = 2
    seg[0, 280:] = 0                                      # row 0: trailing pads
    w = T32(r.standard_normal((B, T, nq, d)))

    def loss(index_causal):
        def f(q, k, v, pos, seg, w):
            out, lse = attention_with_lse(q, k, v, pos, pos, q_segment=seg, kv_segment=seg,
                                          index_causal=index_causal)
            return (out * w).sum() + lse.sum()
        return f

    def run(index_causal):
        f = loss(index_causal)

        @ms.jit
        def both(q, k, v, pos, seg, w):
            return f(q, k, v, pos, seg, w), ms.grad(f, grad_position=(0, 1, 2))(q, k, v, pos, seg, w)
        return both(q, k, v, I32(pos), I32(seg), w)
    (la, a), (lb, b) = run(False), run(True)
    np.testing.assert_allclose(lb.asnumpy(), la.asnumpy(), rtol=1e-5)
    for x, y in zip(a, b):
        np.testing.assert_allclose(y.asnumpy(), x.asnumpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="as many queries as keys"):
        attention_with_lse(q[:, :5], k, v, I32(pos[:, :5]), I32(pos), index_causal=True)
