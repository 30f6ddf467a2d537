"""Ring attention with an in-process rotation == full causal attention (forward and gradients)."""
import math

import mindspore as ms
import numpy as np
import pytest

from tc2.cache import PAD_POS
from tc2.nn import attention_with_lse
from tc2.nn.ring import (decode_exact, encode_exact, fold_ranks, padded_length, ring_attention, ring_permutation,
                         roll_rotation, sequence_index, unfold_ranks)

B, T, NQ, NKV, D = 2, 21, 4, 2, 8       # GQA: 2 query heads per KV head; T divides no ring evenly


def _inputs(seed=0, offset=100_000):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, NQ, D)).astype(np.float32)
    k = rng.standard_normal((B, T, NKV, D)).astype(np.float32)
    v = rng.standard_normal((B, T, NKV, D)).astype(np.float32)
    pos = np.stack([offset + np.arange(T), np.arange(T) - 3]).astype(np.int32)   # row 1: 3 left pads
    pos[1, :3] = PAD_POS
    seg = np.stack([np.repeat([0, 1, 2], [8, 6, 7]), np.zeros(T, int)]).astype(np.int32)
    # padding queries' outputs are meaningless (they see other padding): no loss on them
    real = pos != PAD_POS
    w_out = rng.standard_normal((B, T, NQ, D)).astype(np.float32) * real[:, :, None, None]
    w_lse = rng.standard_normal((B, NQ, T)).astype(np.float32) * real[:, None, :]
    return q, k, v, pos, seg, w_out, w_lse


def _numpy_attention(q, k, v, pos, seg=None):
    """float64 reference: softmax over keys with kv_pos <= q_pos (and same segment)."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(q.shape[-1])
    ok = pos[:, None, :] <= pos[:, :, None]                                      # [B, T, S]
    if seg is not None:
        ok &= seg[:, None, :] == seg[:, :, None]
    s = np.where(ok[:, None], s, -np.inf)
    mx = s.max(-1, keepdims=True)
    p = np.exp(s - mx)
    den = p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", p / den, v), (mx + np.log(den))[..., 0]


def _loss_full(q, k, v, pos, w_out, w_lse):
    out, lse = attention_with_lse(q, k, v, pos, pos)
    return (out * w_out).sum() + (lse * w_lse).sum()


@ms.jit
def _full(q, k, v, pos, w_out, w_lse):
    out, lse = attention_with_lse(q, k, v, pos, pos)
    grads = ms.grad(_loss_full, grad_position=(0, 1, 2))(q, k, v, pos, w_out, w_lse)
    return out, lse, grads


def _make_ring(R, with_segments=False):
    rotate = roll_rotation(R)

    def loss(q, k, v, pos, seg, w_out, w_lse):
        if with_segments:
            out, lse = ring_attention(q, k, v, pos, pos, rotate=rotate, ring_size=R, q_segment=seg, kv_segment=seg)
        else:
            out, lse = ring_attention(q, k, v, pos, pos, rotate=rotate, ring_size=R)
        return (out * w_out).sum() + (lse * w_lse).sum()

    @ms.jit
    def run(q, k, v, pos, seg, w_out, w_lse):
        if with_segments:
            out, lse = ring_attention(q, k, v, pos, pos, rotate=rotate, ring_size=R, q_segment=seg, kv_segment=seg)
        else:
            out, lse = ring_attention(q, k, v, pos, pos, rotate=rotate, ring_size=R)
        grads = ms.grad(loss, grad_position=(0, 1, 2))(q, k, v, pos, seg, w_out, w_lse)
        return out, lse, grads
    return run


@pytest.fixture(scope="module")
def reference():
    q, k, v, pos, seg, w_out, w_lse = _inputs()
    out, lse, grads = _full(*(ms.Tensor(a) for a in (q, k, v, pos, w_out, w_lse)))
    return out.asnumpy(), lse.asnumpy(), tuple(g.asnumpy() for g in grads)


REAL = _inputs()[3] != PAD_POS          # [B, T] queries whose outputs mean something


def _ring_run(R, layout, with_segments=False):
    q, k, v, pos, seg, w_out, w_lse = _inputs()
    fold = lambda a, pad=0: ms.Tensor(fold_ranks(a, R, layout, pad))  # noqa: E731
    # padded queries get zero loss weight: they exist only to make the chunks equal
    args = (fold(q), fold(k), fold(v), fold(pos, PAD_POS), fold(seg, -1), fold(w_out), None)
    lse_w = fold(np.swapaxes(w_lse, 1, 2))                                    # [R*B, Tl, N]
    args = args[:6] + (ms.Tensor(np.swapaxes(lse_w.asnumpy(), 1, 2).copy()),)
    out, lse, grads = _make_ring(R, with_segments)(*args)
    un = lambda a, axis=1: unfold_ranks(a.asnumpy(), R, T, layout, axis)  # noqa: E731
    return un(out), un(lse, 2), tuple(un(g) for g in grads)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("R", [1, 2, 3, 4, 8])
def test_ring_equals_full_attention_forward_and_grads(reference, R, layout):
    q, k, v, pos, *_ = _inputs()
    ref_out, ref_lse = _numpy_attention(q, k, v, pos)
    out, lse, grads = _ring_run(R, layout)
    np.testing.assert_allclose(out[REAL], ref_out[REAL], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse.transpose(0, 2, 1)[REAL], ref_lse.transpose(0, 2, 1)[REAL],
                               rtol=1e-5, atol=1e-5)
    full_out, full_lse, full_grads = reference
    np.testing.assert_allclose(full_out[REAL], ref_out[REAL], rtol=1e-5, atol=1e-5)
    for name, g, fg in zip("qkv", grads, full_grads):
        assert np.abs(fg).max() > 1e-3, name          # the gradient is not trivially zero
        np.testing.assert_allclose(g, fg, rtol=1e-5, atol=1e-5, err_msg=f"d{name}, R={R}, {layout}")


def test_ring_with_document_segments():
    q, k, v, pos, seg, *_ = _inputs()
    ref_out, ref_lse = _numpy_attention(q, k, v, pos, seg)
    out, lse, _ = _ring_run(3, "zigzag", with_segments=True)
    np.testing.assert_allclose(out[REAL], ref_out[REAL], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse.transpose(0, 2, 1)[REAL], ref_lse.transpose(0, 2, 1)[REAL],
                               rtol=1e-5, atol=1e-5)


def test_layout_indices():
    for layout in ("contiguous", "zigzag"):
        for R in (1, 2, 3, 4, 8):
            Tp = padded_length(T, R, layout)
            assert Tp >= T and Tp - T < 2 * R and (R == 1 or Tp % (2 * R if layout == "zigzag" else R) == 0)
            perm = ring_permutation(T, R, layout)
            assert sorted(perm.tolist()) == list(range(Tp))
    assert sequence_index(16, 4, 1, "zigzag").tolist() == [2, 3, 12, 13]
    assert sequence_index(16, 4, 1, "contiguous").tolist() == [4, 5, 6, 7]
    # zigzag balances causal work: every rank's queries see the same number of keys
    work = [sum(int(i) + 1 for i in sequence_index(64, 4, r, "zigzag")) for r in range(4)]
    assert len(set(work)) == 1
    contiguous = [sum(int(i) + 1 for i in sequence_index(64, 4, r, "contiguous")) for r in range(4)]
    assert len(set(contiguous)) == 4
    with pytest.raises(ValueError, match="layout must be one of"):
        padded_length(8, 2, "striped")


def test_fold_unfold_roundtrip():
    x = np.arange(2 * 13 * 3).reshape(2, 13, 3)
    for layout in ("contiguous", "zigzag"):
        for R in (1, 3, 4):
            f = fold_ranks(x, R, layout, pad_value=-1)
            assert f.shape == (R * 2, padded_length(13, R, layout) // R, 3)
            np.testing.assert_array_equal(unfold_ranks(f, R, 13, layout), x)


@ms.jit
def _roundtrip(x):
    return decode_exact(encode_exact(x), x)


def test_positions_travel_exactly_through_float_collectives():
    """CPU AllReduce is float-only: ints are sent as two exact float32 halves."""
    x = np.array([[0, 1, 32767, 32768, (1 << 24) + 1, 123_456_789, PAD_POS, (1 << 31) - 1]], np.int32)
    np.testing.assert_array_equal(_roundtrip(ms.Tensor(x)).asnumpy(), x)
