"""The optimizer applied piece by piece and, for big tensors, in row chunks (tc2.update) gives
the same parameters and optimizer state as one call per piece: AdamW is elementwise, and the
chunks only bound the temporaries MindSpore's CPU graphs keep alive."""
import numpy as np
import pytest

import tc2
import tc2.update as update
from tc2.optim import adamw, exclude_names
from tc2.tree import tree_flatten_with_names
from tc2.train.batches import synthetic_batches

CFG = tc2.tiny(n_layer=2)


def _two_steps(optimizer, dtype="float32"):
    cfg = CFG.replace(dtype=dtype)
    state = tc2.init_train_state(tc2.init_params(cfg, seed=2), optimizer)
    data = synthetic_batches(cfg, 2, 32, seed=1)
    for _ in range(2):
        state, m = tc2.train_step(state, next(data), cfg, optimizer, clip_norm=0.5)
    assert m["grad_norm"] > 0.5                                         # the clip acted
    return tree_flatten_with_names({"params": state.params, "opt": state.opt_state})


@pytest.mark.parametrize("mask", ["matrices", "names"])
def test_chunked_apply_equals_one_call_per_piece(monkeypatch, mask):
    opt = adamw(1e-2, weight_decay=0.1, mask=exclude_names("bias", "norm") if mask == "names" else
                tc2.optim.decay_matrices)
    whole = _two_steps(opt)
    monkeypatch.setattr(update, "APPLY_PIECE", 0)            # every piece tensor by tensor ...
    monkeypatch.setattr(update, "APPLY_CHUNK", 3000)         # ... big ones in row chunks
    assert len(update.chunk_bounds(CFG.vocab_size, CFG.hidden_size)) == 16
    chunked = _two_steps(opt)
    assert list(whole) == list(chunked)
    for n in whole:
        np.testing.assert_array_equal(chunked[n].asnumpy(), whole[n].asnumpy(), err_msg=n)


def test_chunk_bounds_cover_the_rows_once(monkeypatch):
    monkeypatch.setattr(update, "APPLY_CHUNK", 100)
    assert update.chunk_bounds(97, 7) == [(a, min(a + 14, 97)) for a in range(0, 97, 14)]   # 97 is prime
    assert update.chunk_bounds(96, 7) == [(a, a + 12) for a in range(0, 96, 12)]            # equal chunks
    for rows, cols in [(512, 64), (97, 7), (32000, 512), (1, 10 ** 7)]:
        b = update.chunk_bounds(rows, cols)
        assert b[0][0] == 0 and b[-1][1] == rows
        assert all(x[1] == y[0] for x, y in zip(b, b[1:]))
        assert all((hi - lo) * cols <= max(update.APPLY_CHUNK, cols) for lo, hi in b)


@pytest.mark.parametrize("micro", [1, 2])
def test_unrolled_step_equals_the_layer_by_layer_step(micro):
    """recompute "none" updates in one graph (fused with the gradients for one micro-batch, after
    accumulation for several); "selective" piece by piece: same parameters and moments."""
    from tc2.step import split_micro_batches
    opt = adamw(1e-2, eps=1e-4, weight_decay=0.1)            # eps: no sign(g) steps on tiny gradients
    out = {}
    for mode in ("none", "selective"):
        state = tc2.init_train_state(tc2.init_params(CFG, seed=2), opt)
        data = synthetic_batches(CFG, 4, 32, seed=1)
        for _ in range(2):
            b = next(data)
            state, m = tc2.train_step(state, split_micro_batches(b, micro) if micro > 1 else b, CFG, opt,
                                      clip_norm=0.5, recompute=mode)
        out[mode] = tree_flatten_with_names({"params": state.params, "opt": state.opt_state})
    for n in out["none"]:
        np.testing.assert_allclose(out["selective"][n].asnumpy(), out["none"][n].asnumpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=n)
