"""Single-process checks of the one stack under a parallel context: context parallel simulated
in one process (ranks folded into the batch, roll rotation) == the full sequence, forward and
gradients, with positions past training_seqlen (dynamic NTK + mscale); a process's share of a
global batch (`ParallelContext.local_batch`)."""
import mindspore as ms
import numpy as np
import pytest

from tc2.cache import PAD_POS
from tc2.config import tiny
from tc2.context import LOCAL, ParallelContext
from tc2.model import cross_entropy_sum, forward, init_params, loss_sums
from tc2.nn.ring import unfold_ranks
from tc2.parallel.collectives import local_context
from tc2.tree import tree_flatten_with_names

CFG = tiny(n_layer=2)                 # training_seqlen 64
B, T = 2, 75                          # > training_seqlen: NTK alpha 3, mscale > 1


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, CFG.vocab_size, (B, T)).astype(np.int32)
    labels = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    labels[:, :5] = -100
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    positions[1, :4] = PAD_POS                       # row 1 is left-padded by 4 tokens
    positions[1, 4:] = np.arange(T - 4)
    tokens[1, :4] = 3
    labels[1, :4] = -100
    segment_ids = np.zeros((B, T), np.int32)
    segment_ids[0, 40:] = 1                          # row 0 packs two documents
    positions[0, 40:] = np.arange(T - 40)
    return {"tokens": tokens, "labels": labels, "positions": positions, "segment_ids": segment_ids}


def _loss_full(params, tokens, labels, positions, segment_ids, seq_len):
    logits, _ = forward(params, tokens, CFG, positions=positions, segment_ids=segment_ids, seq_len=seq_len)
    s, n = cross_entropy_sum(logits, labels)
    return s


@ms.jit
def _full(params, tokens, labels, positions, segment_ids, seq_len):
    logits, _ = forward(params, tokens, CFG, positions=positions, segment_ids=segment_ids, seq_len=seq_len)
    loss, grads = ms.value_and_grad(_loss_full, grad_position=0)(params, tokens, labels, positions,
                                                                   segment_ids, seq_len)
    return logits, loss, grads


def _make_spmd(ctx):
    def loss(params, tokens, labels, positions, segment_ids, seq_len):
        s, n = loss_sums(params, tokens, labels, CFG, positions=positions, seq_len=seq_len,
                         segment_ids=segment_ids, ctx=ctx)
        return s

    @ms.jit
    def run(params, tokens, labels, positions, segment_ids, seq_len):
        logits, _ = forward(params, tokens, CFG, positions=positions, seq_len=seq_len,
                            segment_ids=segment_ids, ctx=ctx)
        value, grads = ms.value_and_grad(loss, grad_position=0)(params, tokens, labels, positions,
                                                                 segment_ids, seq_len)
        return logits, value, grads
    return run


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=1)


@pytest.fixture(scope="module")
def reference(params):
    b = _batch()
    seq_len = ms.Tensor(LOCAL.local_batch(b)["seq_len"])
    logits, loss, grads = _full(ms.mutable(params), *(ms.Tensor(b[k]) for k in
                                                      ("tokens", "labels", "positions", "segment_ids")), seq_len)
    return logits.asnumpy(), float(loss.asnumpy()), {n: g.asnumpy() for n, g in tree_flatten_with_names(grads).items()}


def test_local_batch_global_lengths():
    b = _batch()
    sb = LOCAL.local_batch(b)
    assert sb["seq_len"].tolist() == [40, T - 4]      # max valid position + 1 per row
    two = ParallelContext(dp=2, cp=2, rank=3, dp_rank=1, cp_rank=1).local_batch(b)   # row 1, zigzag chunks 1, 2
    assert two["tokens"].shape == (1, 38) and two["seq_len"].tolist() == [T - 4]
    idx = np.r_[19:38, 38:57]
    np.testing.assert_array_equal(two["positions"][0], b["positions"][1, idx])


@pytest.mark.parametrize("cp,layout", [(1, "zigzag"), (2, "zigzag"), (3, "contiguous")])
def test_context_parallel_simulation_equals_full_sequence(params, reference, cp, layout):
    ref_logits, ref_loss, ref_grads = reference
    fb = local_context(cp, layout).local_batch(_batch())
    logits, loss, grads = _make_spmd(local_context(cp, layout))(
        ms.mutable(params), *(ms.Tensor(fb[k]) for k in ("tokens", "labels", "positions", "segment_ids", "seq_len")))
    logits = unfold_ranks(logits.asnumpy(), cp, T, layout)
    real = _batch()["positions"] != PAD_POS
    np.testing.assert_allclose(logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss.asnumpy()), ref_loss, rtol=1e-5)
    for n, g in tree_flatten_with_names(grads).items():
        assert np.abs(ref_grads[n]).max() > 0, n
        np.testing.assert_allclose(g.asnumpy(), ref_grads[n], rtol=1e-5, atol=1e-5, err_msg=n)
