"""The whole decoder vs an independent float64 numpy TeleChat2, graph mode vs PyNative, fp16."""
import json
import os

import mindspore as ms
import numpy as np
import pytest

import numpy_ref as ref
import tc2
from tc2.model import cross_entropy_sum, forward, jit_forward, loss_fn, param_specs
from jit_count import compiled_graphs
from tc2.tree import tree_leaves

CFG = tc2.tiny(n_layer=2, training_seqlen=16, base_seqlen=16, seq_length=16)


@pytest.fixture(scope="module")
def params():
    p = tc2.init_params(CFG, seed=3)
    # non-trivial norms and biases so a wrong bias or norm weight cannot hide
    r = np.random.default_rng(1)
    p = dict(p)
    p["layers"] = tuple({k: (ms.Tensor(r.standard_normal(v.shape).astype(np.float32) * 0.1 + (1 if "layernorm" in k else 0))
                             if v.ndim == 1 else v) for k, v in lp.items()} for lp in p["layers"])
    p["ln_f"] = ms.Tensor(r.uniform(0.5, 1.5, CFG.hidden_size).astype(np.float32))
    return p


def _tokens(B, T, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T)).astype(np.int32)


def test_presets_count_exactly_the_release_parameters():
    assert tc2.count_params(tc2.telechat2_7b()) == 7_617_351_680
    assert tc2.count_params(tc2.telechat2_35b()) == 35_435_059_200
    assert tc2.count_params(tc2.telechat2_115b()) == 113_282_916_352


def test_115b_specs_match_the_official_safetensors_index(shared_dir):
    """Every name in the release's index, and its fp32 byte total, agree with param_specs."""
    from tc2.checkpoint.hf import hf_shapes
    with open(os.path.join(shared_dir, "telechat2", "model.safetensors.index-115b.json")) as f:
        index = json.load(f)
    cfg = tc2.ModelConfig.from_hf(os.path.join(shared_dir, "telechat2", "config-115b.json"))
    shapes = hf_shapes(cfg)
    assert set(shapes) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == 4 * tc2.count_params(cfg)


def test_param_specs_allocate_nothing_and_carry_logical_axes():
    specs = param_specs(tc2.telechat2_115b())
    leaves = tree_leaves(specs)
    assert all(isinstance(s, tc2.ParamSpec) and len(s.axes) == len(s.shape) for s in leaves)
    kv = specs["layers"][0]["key_value"]
    assert kv.shape == (2048, 8192) and kv.axes == ("kv_heads", "embed")


def test_init_params_is_seeded_and_follows_hf_init():
    a, b = tc2.init_params(CFG, seed=5), tc2.init_params(CFG, seed=5)
    for x, y in zip(tree_leaves(a), tree_leaves(b)):
        assert np.array_equal(x.asnumpy(), y.asnumpy())
    w = a["layers"][0]["gate_proj"].asnumpy()
    assert abs(w.std() - CFG.initializer_range) < 0.002 and abs(w.mean()) < 0.002
    assert np.all(a["layers"][0]["dense_bias"].asnumpy() == 0)
    assert np.all(a["ln_f"].asnumpy() == 1)
    c = tc2.init_params(CFG, seed=6)
    assert not np.array_equal(c["lm_head"].asnumpy(), a["lm_head"].asnumpy())


@pytest.mark.parametrize("T", [9, 40])          # 40 > training_seqlen 16: dynamic NTK + mscale active
def test_forward_matches_float64_reference(params, T):
    toks = _tokens(2, T)
    logits, cache = forward(params, ms.Tensor(toks), CFG)
    assert cache is None and logits.shape == (2, T, CFG.vocab_size)
    want = ref.forward(ref.to_numpy64(params), toks, CFG)
    np.testing.assert_allclose(logits.asnumpy(), want, rtol=1e-4, atol=1e-4)


def test_long_sequence_actually_exercises_ntk():
    """Guard for the test above: with NTK off the 40-token logits would differ."""
    p = tc2.init_params(CFG, seed=0)
    toks = ms.Tensor(_tokens(1, 40))
    scaled, _ = forward(p, toks, CFG)
    plain, _ = forward(p, toks, CFG.replace(training_seqlen=64, base_seqlen=64))
    assert np.abs(scaled.asnumpy() - plain.asnumpy()).max() > 1e-3


def test_fused_key_value_is_per_head_interleaved_under_gqa(params):
    """Build K and V independently from per-head weight slices and compare with the model's split."""
    from tc2.nn import linear
    D, nkv = CFG.head_dim, CFG.num_key_value_heads
    assert nkv < CFG.n_head
    w = params["layers"][0]["key_value"].asnumpy()
    x = np.random.default_rng(2).standard_normal((1, 3, CFG.hidden_size)).astype(np.float32)
    k_want = np.stack([x[0] @ w[2 * h * D: (2 * h + 1) * D].T for h in range(nkv)], 1)      # [T, nkv, D]
    v_want = np.stack([x[0] @ w[(2 * h + 1) * D: (2 * h + 2) * D].T for h in range(nkv)], 1)
    kv = linear(ms.Tensor(x), params["layers"][0]["key_value"]).reshape(1, 3, nkv, 2 * D).asnumpy()
    np.testing.assert_allclose(kv[0, ..., :D], k_want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kv[0, ..., D:], v_want, rtol=1e-5, atol=1e-5)


def test_graph_mode_equals_pynative_and_does_not_recompile(params):
    toks = ms.Tensor(_tokens(2, 12))
    eager, _ = forward(params, toks, CFG)
    graph = jit_forward(params, toks, CFG)
    np.testing.assert_allclose(graph.asnumpy(), eager.asnumpy(), rtol=1e-5, atol=1e-5)
    before = compiled_graphs()
    fresh = tc2.init_params(CFG, seed=9)          # new Tensor objects, same shapes
    again = jit_forward(fresh, ms.Tensor(_tokens(2, 12, seed=4)), CFG)
    assert compiled_graphs() == before, "a second call with the same shapes recompiled"
    want, _ = forward(fresh, ms.Tensor(_tokens(2, 12, seed=4)), CFG)
    np.testing.assert_allclose(again.asnumpy(), want.asnumpy(), rtol=1e-5, atol=1e-5)
    jit_forward(fresh, ms.Tensor(_tokens(2, 13)), CFG)           # a new shape does compile
    assert compiled_graphs() == before + 1


def test_float16_compute_close_to_float32(params):
    """fp16 rounds weights and activations to 11 significant bits (eps = 2**-11 = 4.9e-4 relative).
    Norms, softmax, RoPE and the residual stay float32, so the error does not compound through the
    depth: we bound the logit error by 8 fp16 epsilons of the largest logit (a few roundings per
    matmul chain, summed over 2 layers) and require the same argmax on >= 95% of positions."""
    toks = ms.Tensor(_tokens(2, 20))
    f32, _ = forward(params, toks, CFG)
    f16, _ = forward(params, toks, CFG.replace(dtype="float16"))
    assert f16.dtype == ms.float16
    a, b = f32.asnumpy(), f16.asnumpy().astype(np.float32)
    assert np.abs(a - b).max() <= 8 * 2.0 ** -11 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.95
    g16 = jit_forward(params, toks, CFG.replace(dtype="float16"))
    np.testing.assert_allclose(g16.asnumpy().astype(np.float32), b, atol=2 * 2.0 ** -11 * np.abs(a).max())


def test_loss_ignores_minus_100_and_is_token_mean(params):
    toks = _tokens(2, 10)
    labels = _tokens(2, 10, seed=7)
    labels[0, :4] = -100
    labels[1, 7:] = -100
    loss = loss_fn(params, ms.Tensor(toks), ms.Tensor(labels), CFG).asnumpy()
    logits = ref.forward(ref.to_numpy64(params), toks, CFG)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    keep = labels != -100
    picked = np.take_along_axis(logits, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    want = ((lse - picked) * keep).sum() / keep.sum()
    assert loss == pytest.approx(want, rel=1e-4)
    total, count = cross_entropy_sum(ms.Tensor(logits.astype(np.float32)), ms.Tensor(labels))
    assert count.asnumpy() == keep.sum()


def test_segment_ids_make_packed_documents_independent(params):
    a, b = _tokens(1, 5, seed=1), _tokens(1, 7, seed=2)
    packed = np.concatenate([a, b], 1)
    pos = np.concatenate([np.arange(5), np.arange(7)])[None].astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 7], np.int32)
    out, _ = forward(params, ms.Tensor(packed), CFG, positions=ms.Tensor(pos), segment_ids=ms.Tensor(seg),
                     seq_len=ms.Tensor([7], ms.int32))
    alone, _ = forward(params, ms.Tensor(b), CFG)
    np.testing.assert_allclose(out.asnumpy()[:, 5:], alone.asnumpy(), rtol=1e-4, atol=1e-5)


@ms.jit
def _ce_value_and_grad(logits, labels):
    def mean_ce(x):
        total, count = cross_entropy_sum(x, labels)
        return total / count
    return ms.value_and_grad(mean_ce)(logits)


def test_cross_entropy_gradient_in_graph_mode_vs_reference():
    r = np.random.default_rng(5)
    x = r.standard_normal((6, 50)) * 3
    y = r.integers(0, 50, 6)
    y[[1, 4]] = -100
    loss, grad = _ce_value_and_grad(ms.Tensor(x.astype(np.float32)), ms.Tensor(y.astype(np.int32)))
    keep = y != -100
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(50)[np.where(keep, y, 0)]
    want_loss = -(np.log((p * onehot).sum(-1)) * keep).sum() / keep.sum()
    want_grad = (p - onehot) * keep[:, None] / keep.sum()
    assert loss.asnumpy() == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(grad.asnumpy(), want_grad, rtol=1e-4, atol=1e-6)
    assert np.all(grad.asnumpy()[[1, 4]] == 0)


def test_last_only_gives_the_last_position_of_the_full_forward(params):
    toks = ms.Tensor(_tokens(2, 9))
    full, _ = forward(params, toks, CFG)
    last, _ = forward(params, toks, CFG, last_only=True)
    assert last.shape == (2, 1, CFG.vocab_size)
    np.testing.assert_allclose(last.asnumpy()[:, 0], full.asnumpy()[:, -1], rtol=1e-5, atol=1e-6)
