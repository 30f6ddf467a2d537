"""The layer-by-layer step's gradients == autodiff of the unrolled model graph, for both
recompute modes, with packed documents, left padding and positions past training_seqlen
(dynamic NTK + mscale), float32 and float16 compute; and the decoder layer's own backward."""
import mindspore as ms
import numpy as np
import pytest

from tc2.cache import PAD_POS
from tc2.config import tiny
from tc2.context import LOCAL
from tc2.layerwise import layerwise_grads
from tc2.model import init_params
from tc2.step import LOCAL_KEYS, grads_and_loss
from tc2.tree import tree_flatten_with_names

CFG = tiny(n_layer=2)                      # training_seqlen 64
B, T = 2, 75


def _batch():
    rng = np.random.default_rng(3)
    tokens = rng.integers(4, CFG.vocab_size, (B, T)).astype(np.int32)
    labels = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    labels[:, :5] = -100
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    positions[1, :4] = PAD_POS
    positions[1, 4:] = np.arange(T - 4)
    segment_ids = np.zeros((B, T), np.int32)
    segment_ids[0, 40:] = 1
    positions[0, 40:] = np.arange(T - 40)
    return {"tokens": tokens, "labels": labels, "positions": positions, "segment_ids": segment_ids}


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, seed=5)
    return {**p, "lm_head": ms.Tensor(p["lm_head"].asnumpy() * 4)}          # sharper: larger gradients


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_layerwise_gradients_equal_the_unrolled_graph(params, recompute, dtype):
    cfg = CFG.replace(dtype=dtype)
    batch = _batch()
    ref, ref_loss, n_loss = grads_and_loss(params, batch, cfg)
    local = LOCAL.local_batch(batch)
    part = tuple(ms.Tensor(local[k]) for k in LOCAL_KEYS)
    weight = ms.Tensor(1.0 / n_loss, ms.float32)
    got, loss_sum = layerwise_grads(params, [part], weight, cfg, LOCAL, recompute)
    assert float(loss_sum.asnumpy()) / n_loss == pytest.approx(ref_loss, rel=1e-6 if dtype == "float32" else 1e-3)
    a, b = tree_flatten_with_names(ref), tree_flatten_with_names(got)
    assert list(a) == list(b)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == "float32" else dict(rtol=2e-2, atol=1e-4)
    for n in a:
        r = a[n].asnumpy()
        assert np.abs(r).max() > 0, n
        np.testing.assert_allclose(b[n].asnumpy(), r, **tol, err_msg=f"{recompute} {dtype} {n}")


def test_head_in_row_chunks_equals_one_call(params, monkeypatch):
    """The head runs over padded row chunks (150 rows -> 64 + 64 + 22 padded): same loss and
    gradients as the unrolled graph."""
    import tc2.layerwise as lw
    monkeypatch.setattr(lw, "HEAD_CHUNK_LOGITS", 64 * CFG.vocab_size)
    assert lw.head_chunk_rows(B * T, CFG.vocab_size) == 64
    batch = _batch()
    ref, ref_loss, n_loss = grads_and_loss(params, batch, CFG)
    local = LOCAL.local_batch(batch)
    part = tuple(ms.Tensor(local[k]) for k in LOCAL_KEYS)
    got, loss_sum = layerwise_grads(params, [part], ms.Tensor(1.0 / n_loss, ms.float32), CFG, LOCAL, "selective")
    assert float(loss_sum.asnumpy()) / n_loss == pytest.approx(ref_loss, rel=1e-6)
    a, b = tree_flatten_with_names(ref), tree_flatten_with_names(got)
    for n in a:
        np.testing.assert_allclose(b[n].asnumpy(), a[n].asnumpy(), rtol=1e-5, atol=1e-7, err_msg=n)
