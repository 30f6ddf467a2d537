"""tc2.optim against float64 numpy references, eagerly and inside ms.jit (the product path)."""
import math

import mindspore as ms
import numpy as np
import pytest

from tc2 import optim
from tc2.tree import tree_flatten_with_names, tree_map

SHAPES = {"word_embeddings": (6, 4), "ln_f": (4,),
          "layers": ({"query": (4, 4), "dense_bias": (4,), "input_layernorm": (4,)},)}


def _build(shapes, scale, rng):
    if isinstance(shapes, dict):
        return {k: _build(v, scale, rng) for k, v in shapes.items()}
    if isinstance(shapes, tuple) and shapes and isinstance(shapes[0], dict):
        return tuple(_build(v, scale, rng) for v in shapes)
    return ms.Tensor((rng.standard_normal(shapes) * scale).astype(np.float32))


def _np(tree):
    return {k: v.asnumpy().astype(np.float64) for k, v in tree_flatten_with_names(tree).items()}


def ref_cosine(step, peak, total, end, warmup, init=0.0):
    if warmup and step < warmup:
        return init + (peak - init) * step / warmup
    frac = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


def ref_adamw_steps(params, grads_seq, lr_fn, b1, b2, eps, wd, decay, max_norm):
    """float64 reference: clip by global norm, then AdamW with bias correction, per step."""
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    out = []
    for t, g in enumerate(grads_seq, start=1):
        if max_norm is not None:
            norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
            g = {k: x * min(1.0, max_norm / norm) for k, x in g.items()}
        lr = lr_fn(t - 1)
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            u = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
            if decay[k]:
                u = u + wd * p[k]
            p[k] = p[k] - lr * u
        out.append({k: x.copy() for k, x in p.items()})
    return out


def _jit_update_fn(opt):
    update = opt.update

    @ms.jit
    def step(params, grads, state):
        updates, state = update(grads, state, params)
        return optim.apply_updates(params, updates), state
    return step


PEAK, TOTAL, END, WARMUP = 1e-2, 10, 1e-3, 2


@pytest.fixture(scope="module")
def clipped_adamw():
    """(the release-style chain, its jitted update step): compiled once for the module."""
    opt = optim.chain(optim.clip_by_global_norm(1.0),
                      optim.adamw(optim.cosine_schedule(PEAK, TOTAL, END, WARMUP, warmup_init_lr=1e-3),
                                  b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))
    return opt, _jit_update_fn(opt)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_adamw_matches_numpy_over_3_steps_with_clipping_and_default_mask(mode, clipped_adamw):
    opt, step = clipped_adamw
    params = _build(SHAPES, 0.5, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    # step 1 gradients have norm >> 1 (clipped), steps 2-3 norm < 1 (untouched)
    grads_seq = [_build(SHAPES, s, rng) for s in (3.0, 0.05, 0.1)]
    assert float(optim.global_norm(grads_seq[0]).asnumpy()) > 1.0
    assert float(optim.global_norm(grads_seq[1]).asnumpy()) < 1.0
    decay = {n: len(a.shape) >= 2 for n, a in _np(params).items()}
    assert decay == {"word_embeddings": True, "ln_f": False, "layers.0.query": True,
                     "layers.0.dense_bias": False, "layers.0.input_layernorm": False}
    ref = ref_adamw_steps(_np(params), [_np(g) for g in grads_seq],
                          lambda s: ref_cosine(s, PEAK, TOTAL, END, WARMUP, 1e-3),
                          0.9, 0.95, 1e-8, 0.1, decay, 1.0)
    no_decay_ref = ref_adamw_steps(_np(params), [_np(g) for g in grads_seq],
                                   lambda s: ref_cosine(s, PEAK, TOTAL, END, WARMUP, 1e-3),
                                   0.9, 0.95, 1e-8, 0.0, decay, 1.0)
    state = opt.init(params)
    p = params
    for t, g in enumerate(grads_seq):
        if mode == "jit":
            p, state = step(ms.mutable(p), ms.mutable(g), ms.mutable(state))
        else:
            updates, state = opt.update(g, state, p)
            p = optim.apply_updates(p, updates)
        got = _np(p)
        for k in got:
            np.testing.assert_allclose(got[k], ref[t][k], rtol=1e-5, atol=1e-7, err_msg=f"step {t + 1} {k}")
    assert int(state[1]["count"].asnumpy()) == 3
    # weight decay really acted on the matrices (the reference without it is far away)
    assert np.abs(got["layers.0.query"] - no_decay_ref[2]["layers.0.query"]).max() > 1e-4


def test_adamw_masks_in_graph():
    params = _build(SHAPES, 0.5, np.random.default_rng(3))
    grads = _build(SHAPES, 0.1, np.random.default_rng(4))
    names = list(_np(params))
    cases = {
        "names": (optim.exclude_names("embeddings", "bias"),
                  {n: not ("embeddings" in n or "bias" in n) for n in names}),
        "none": (None, {n: True for n in names}),
        "tree": (tree_map(lambda x: len(x.shape) == 2 and x.shape[0] == 4, params),
                 {n: n == "layers.0.query" for n in names}),
    }
    opts = tuple(optim.adamw(0.01, weight_decay=0.5, mask=m) for m, _ in cases.values())
    updates = tuple(o.update for o in opts)

    @ms.jit
    def all_three(params, grads, s0, s1, s2):
        out = ()
        states = (s0, s1, s2)
        for i in range(3):
            u, _ = updates[i](grads, states[i], params)
            out = out + (optim.apply_updates(params, u),)
        return out

    got_all = all_three(ms.mutable(params), ms.mutable(grads),
                        *[ms.mutable(o.init(params)) for o in opts])
    for (name, (_, decay)), got in zip(cases.items(), got_all):
        ref = ref_adamw_steps(_np(params), [_np(grads)], lambda s: 0.01, 0.9, 0.95, 1e-8, 0.5, decay, None)
        for k, v in _np(got).items():
            np.testing.assert_allclose(v, ref[0][k], rtol=1e-5, atol=1e-7, err_msg=f"{name}: {k}")


def test_update_does_not_mutate_inputs(clipped_adamw):
    opt, step = clipped_adamw
    params = _build(SHAPES, 1.0, np.random.default_rng(5))
    grads = _build(SHAPES, 2.0, np.random.default_rng(6))
    state = opt.init(params)
    before = (_np(params), _np(grads), _np(state))
    new_p, new_s = step(ms.mutable(params), ms.mutable(grads), ms.mutable(state))
    opt.update(grads, state, params)
    for tree, ref in zip((params, grads, state), before):
        got = _np(tree)
        assert all(np.array_equal(got[k], ref[k]) for k in ref)
    assert int(new_s[1]["count"].asnumpy()) == 1 and int(state[1]["count"].asnumpy()) == 0
    assert not np.array_equal(_np(new_p)["ln_f"], before[0]["ln_f"])


def test_clip_by_global_norm_and_global_norm_in_graph():
    grads = _build(SHAPES, 1.0, np.random.default_rng(7))
    ref_norm = math.sqrt(sum(float((a ** 2).sum()) for a in _np(grads).values()))
    clip = optim.clip_by_global_norm(1.0)

    @ms.jit
    def f(g):
        out, _ = clip.update(g, {}, None)
        return optim.global_norm(g), optim.global_norm(out)
    norm, clipped = f(ms.mutable(grads))
    assert abs(float(norm.asnumpy()) - ref_norm) < 1e-5 * ref_norm
    assert abs(float(clipped.asnumpy()) - 1.0) < 1e-5
    small = tree_map(lambda g: g * (0.5 / ref_norm), grads)
    out, _ = clip.update(small, {}, None)
    for k, v in _np(out).items():
        np.testing.assert_allclose(v, _np(small)[k], rtol=1e-6)


def test_cosine_schedule_matches_formula_host_and_graph():
    sched = optim.cosine_schedule(1.5e-4, 100, 1.5e-5, warmup_steps=10)
    steps = [0, 1, 5, 9, 10, 11, 50, 99, 100, 150]

    @ms.jit
    def in_graph(s):
        return sched(s)
    for s in steps:
        want = ref_cosine(s, 1.5e-4, 100, 1.5e-5, 10)
        assert abs(float(sched(s).asnumpy()) - want) < 1e-5 * 1.5e-4, s
        assert abs(float(in_graph(ms.Tensor(s, ms.int32)).asnumpy()) - want) < 1e-5 * 1.5e-4, s
    release = optim.cosine_schedule(1.5e-4, 1000, 1.5e-5)        # spec §9: no warmup
    assert float(release(0).asnumpy()) == pytest.approx(1.5e-4, rel=1e-6)
    assert float(release(1000).asnumpy()) == pytest.approx(1.5e-5, rel=1e-6)
    assert float(release(500).asnumpy()) == pytest.approx(0.5 * (1.5e-4 + 1.5e-5), rel=1e-5)
    assert float(optim.constant_schedule(3e-4)(77).asnumpy()) == pytest.approx(3e-4, rel=1e-7)


def test_learning_rate_reporter_follows_the_chain():
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.cosine_schedule(1.0, 4, 0.0)))
    params = _build(SHAPES, 1.0, np.random.default_rng(8))
    state = opt.init(params)
    assert float(opt.learning_rate(state).asnumpy()) == pytest.approx(1.0)
    _, state = opt.update(params, state, params)
    assert float(opt.learning_rate(state).asnumpy()) == pytest.approx(ref_cosine(1, 1.0, 4, 0.0, 0), rel=1e-6)
    assert optim.chain(optim.clip_by_global_norm(1.0)).learning_rate is None


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="decay_steps"):
        optim.cosine_schedule(1e-3, 10, 0.0, warmup_steps=10)
    with pytest.raises(ValueError, match="b2"):
        optim.adamw(1e-3, b2=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_by_global_norm(0.0)
    with pytest.raises(ValueError, match="at least one"):
        optim.chain()


def test_inplace_adamw_matches_numpy_and_writes_into_the_buffers():
    """The fused in-place form (MindSpore's AdamWeightDecay with the bias correction folded into
    its scalars), in graph mode, over 3 steps with a clip factor and the default decay mask:
    the float64 reference at the functional form's tolerance, written into the same Parameters."""
    opt = optim.adamw(optim.cosine_schedule(PEAK, TOTAL, END, WARMUP, warmup_init_lr=1e-3),
                      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    write = opt.inplace.write

    @ms.jit
    def step(params, grads, state, factor):
        return write(grads, state, params, factor)

    def as_parameters(tree, tag):
        return {k: ms.Parameter(v, name=f"{tag}.{k}") for k, v in tree_flatten_with_names(tree).items()}
    params = _build(SHAPES, 0.5, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    grads_seq = [_build(SHAPES, s, rng) for s in (3.0, 0.05, 0.1)]
    factors = [0.25, 1.0, 0.5]
    decay = {n: len(a.shape) >= 2 for n, a in _np(params).items()}
    ref = ref_adamw_steps(_np(params), [{k: v * f for k, v in _np(g).items()} for g, f in zip(grads_seq, factors)],
                          lambda s: ref_cosine(s, PEAK, TOTAL, END, WARMUP, 1e-3), 0.9, 0.95, 1e-8, 0.1, decay, None)
    # flat dicts keyed by dotted names: the mask sees matrices vs vectors exactly as in a params tree
    flat = as_parameters(params, "p")
    state = opt.init(flat)
    state = {"count": state["count"], "mu": as_parameters(state["mu"], "m"), "nu": as_parameters(state["nu"], "v")}
    buffers = [id(x) for x in flat.values()]
    for t, (g, f) in enumerate(zip(grads_seq, factors)):
        count = step(ms.mutable(flat), ms.mutable(dict(tree_flatten_with_names(g))), ms.mutable(state),
                     ms.Tensor(f, ms.float32))
        state = opt.inplace.advance(state, count)
        for k, v in flat.items():
            np.testing.assert_allclose(v.asnumpy(), ref[t][k], rtol=1e-5, atol=1e-7, err_msg=f"step {t + 1} {k}")
    assert int(state["count"].asnumpy()) == 3 and [id(x) for x in flat.values()] == buffers
