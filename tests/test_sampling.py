"""Logits processors and the token draw vs float64 numpy references (PyNative and graph mode),
then the whole sampler through `generate` on mock models whose logits are known exactly."""
import json
import math
import os

import mindspore as ms
import numpy as np
import pytest

import tc2
from tc2.generate import generate_ids
from tc2.sampling import (NEG, SamplingConfig, apply_repetition_penalty, apply_temperature,
                          apply_top_k, apply_top_p, mark_present, next_token, process_logits,
                          sample_inverse_cdf)

V = 64


# ---- numpy references (Hugging Face's formulas, float64) ----------------------------------------

def np_penalty(l, present, pen):
    return np.where(present, np.where(l < 0, l * pen, l / pen), l)


def np_top_k(l, k):
    kth = np.sort(l, -1)[:, -k][:, None]
    return np.where(l < kth, -np.inf, l)


def np_top_p(l, p):
    """HF TopPLogitsWarper: ascending sort, remove cumulative probs <= 1 - p, keep the last."""
    out = l.copy()
    for r in range(l.shape[0]):
        order = np.argsort(l[r], kind="stable")
        s = l[r, order]
        e = np.exp(s - s.max())
        cum = np.cumsum(e / e.sum())
        remove = cum <= 1 - p
        remove[-1] = False
        out[r, order[remove]] = -np.inf
    return out


def np_softmax(l):
    e = np.exp(l - l.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def support(x):
    return x > NEG / 2


def run(mode, fn, *args):
    """fn(*Tensors) eagerly or under ms.jit (fn is a def in this file: graph mode parses source)."""
    f = fn if mode == "pynative" else ms.jit(fn)
    return f(*[ms.Tensor(a) for a in args]).asnumpy()


@pytest.fixture(scope="module")
def logits():
    r = np.random.default_rng(0)
    return (r.standard_normal((6, V)) * 2).astype(np.float32)


MODES = ["pynative", "graph"]


# ---- processors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pen", [1.3, 0.7])
def test_repetition_penalty_sign_rules(mode, pen, logits):
    present = np.random.default_rng(1).random((6, V)) < 0.3

    def f(l, m):
        return apply_repetition_penalty(l, m, pen)
    got = run(mode, f, logits, present)
    np.testing.assert_allclose(got, np_penalty(logits.astype(np.float64), present, pen), rtol=1e-6, atol=1e-6)
    assert np.array_equal(got[~present], logits[~present])                  # absent tokens untouched
    if pen > 1:                                                             # a penalty never helps a token
        assert np.all(got[present] < logits[present])


@pytest.mark.parametrize("mode", MODES)
def test_temperature(mode, logits):
    def f(l):
        return apply_temperature(l, 0.3)
    np.testing.assert_allclose(run(mode, f, logits), logits / 0.3, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 5, V])
def test_top_k_keeps_exactly_the_k_largest(mode, k, logits):
    def f(l):
        return apply_top_k(l, k)
    got = run(mode, f, logits)
    want = np_top_k(logits.astype(np.float64), k)
    assert np.array_equal(support(got), np.isfinite(want))
    assert np.all(support(got).sum(-1) == k)
    np.testing.assert_array_equal(got[support(got)], logits[support(got)])


def test_top_k_keeps_ties_like_hf():
    l = np.array([[1.0, 3.0, 2.0, 2.0, 0.5]], np.float32)
    assert list(support(apply_top_k(ms.Tensor(l), 2).asnumpy())[0]) == [False, True, True, True, False]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [0.05, 0.5, 0.85, 0.99])
def test_top_p_keeps_the_hf_nucleus(mode, p, logits):
    def f(l):
        return apply_top_p(l, p)
    got = run(mode, f, logits)
    want = np_top_p(logits.astype(np.float64), p)
    assert np.array_equal(support(got), np.isfinite(want)), p
    np.testing.assert_array_equal(got[support(got)], logits[support(got)])
    assert np.all(support(got)[np.arange(6), logits.argmax(-1)])            # the top token always stays


@pytest.mark.parametrize("mode", MODES)
def test_top_p_over_top_k_candidates_equals_the_full_sort(mode, logits):
    """After top-k only k tokens have mass: ranking just those k gives the same nucleus."""
    masked = np.where(np.isfinite(np_top_k(logits.astype(np.float64), 12)), logits, NEG).astype(np.float32)

    def full(l):
        return apply_top_p(l, 0.7)

    def cand(l):
        return apply_top_p(l, 0.7, candidates=12)
    a, b = run(mode, full, masked), run(mode, cand, masked)
    assert np.array_equal(a, b)
    assert np.array_equal(support(b), np.isfinite(np_top_p(np.where(masked > NEG / 2, masked, -np.inf), 0.7)))
    assert 12 > support(b).sum(-1).min() and support(b).sum(-1).max() > 1      # a real cut


def test_top_p_nucleus_by_hand():
    probs = np.array([[0.05, 0.4, 0.3, 0.2, 0.05]])
    got = support(apply_top_p(ms.Tensor(np.log(probs).astype(np.float32)), 0.85).asnumpy())[0]
    assert list(got) == [False, True, True, True, False]                    # 0.4+0.3 < 0.85 <= 0.9
    got = support(apply_top_p(ms.Tensor(np.log(probs).astype(np.float32)), 0.65).asnumpy())[0]
    assert list(got) == [False, True, True, False, False]


@pytest.mark.parametrize("mode", MODES)
def test_processor_chain_in_hf_order(mode, logits):
    cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.2)
    present = np.random.default_rng(2).random((6, V)) < 0.2

    def f(l, m):
        return process_logits(l, m, cfg)
    got = run(mode, f, logits, present)
    want = np_top_p(np_top_k(np_penalty(logits.astype(np.float64), present, 1.2) / 0.7, 10), 0.8)
    assert np.array_equal(support(got), np.isfinite(want))
    np.testing.assert_allclose(got[support(got)], want[np.isfinite(want)], rtol=1e-5, atol=1e-5)


# ---- drawing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_inverse_cdf_draws_each_token_with_its_probability(mode, logits):
    """Stratified uniforms u_i = (i + 0.5) / N: token j must be drawn N * p_j times, up to the
    rounding of the interval ends (at most one draw each side)."""
    row = np_top_k(logits[:1].astype(np.float64), 20)
    p = np_softmax(row)[0]
    N = 4000
    u = ((np.arange(N) + 0.5) / N).astype(np.float32)
    l32 = np.repeat(np.where(np.isfinite(row), row, NEG).astype(np.float32), N, 0)

    def f(l, uu):
        return sample_inverse_cdf(l, uu)
    toks = run(mode, f, l32, u)
    counts = np.bincount(toks, minlength=V)
    assert np.all(np.abs(counts - N * p) <= 2), np.abs(counts - N * p).max()
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(p > 0))


def test_filtered_tokens_are_never_drawn_even_at_the_interval_ends():
    l = np.full((3, V), NEG, np.float32)
    l[:, [7, 30, 41]] = [[0.1, 2.0, -1.0]]
    u = np.array([0.0, np.nextafter(np.float32(1), np.float32(0)), 0.5], np.float32)
    toks = sample_inverse_cdf(ms.Tensor(l), ms.Tensor(u)).asnumpy()
    assert toks[0] == 7 and toks[1] == 41 and toks[2] in (7, 30, 41)


def test_temperature_to_zero_equals_greedy(logits):
    """With every top-2 gap >= 1e-3, temperature 1e-6 makes the draw an argmax for any u;
    temperature exactly 0 is the greedy path."""
    r = np.random.default_rng(3)
    l = r.standard_normal((64, V)).astype(np.float32)
    top2 = np.sort(l, -1)[:, -2:]
    l = l[(top2[:, 1] - top2[:, 0]) >= 1e-3]
    u = r.random(len(l)).astype(np.float32)
    none = ms.Tensor(np.zeros((len(l), 1), np.bool_))
    cold = SamplingConfig(do_sample=True, temperature=1e-6, top_k=0, top_p=1.0, repetition_penalty=1.0)
    got = next_token(ms.Tensor(l), none, ms.Tensor(u), cold).asnumpy()
    assert np.array_equal(got, l.argmax(-1))
    zero = cold.replace(temperature=0.0)
    assert zero.is_greedy
    assert np.array_equal(next_token(ms.Tensor(l), none, ms.Tensor(u), zero).asnumpy(), l.argmax(-1))


def test_mark_present():
    m = ms.Tensor(np.zeros((2, 5), np.bool_))
    m = mark_present(mark_present(m, ms.Tensor(np.array([1, 4], np.int32))), ms.Tensor(np.array([1, 1], np.int32)))
    assert m.asnumpy().tolist() == [[False, True, False, False, False], [False, True, False, False, True]]


# ---- the config ---------------------------------------------------------------------------------

def test_defaults_are_the_release_generation_config():
    s = SamplingConfig()
    assert (s.do_sample, s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (False, 0.3, 5, 0.85, 1.03)
    assert s.is_greedy and s.uses_penalty
    assert not SamplingConfig.greedy().uses_penalty


def test_defaults_match_the_shipped_file(shared_dir):
    with open(os.path.join(shared_dir, "telechat2", "generation_config-115b.json")) as f:
        g = json.load(f)
    s = SamplingConfig()
    for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty"):
        assert getattr(s, k) == g[k], k


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-1), dict(top_k=2.5), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(repetition_penalty=0.0), dict(do_sample=1)])
def test_config_rejects_bad_values(bad):
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        SamplingConfig(**bad)


# ---- through generate, on mock models with known logits ------------------------------------

MOCK = tc2.tiny(n_layer=1)


def markov_params(seed):
    """A real TeleChat2 parameter tree whose logits depend only on the last token: zero
    attention/MLP weights leave x = embedding row; rows have rms 1, so rms_norm is a fixed
    rescale, and logits = table[last token] with table = n @ lm_head.T returned alongside."""
    H = MOCK.hidden_size
    p = tc2.init_params(MOCK, seed=0)
    zero = {k: ms.Tensor(np.zeros(v.shape, np.float32)) if "layernorm" not in k else v
            for k, v in p["layers"][0].items()}
    r = np.random.default_rng(seed)
    E = r.standard_normal((MOCK.vocab_size, H))
    E /= np.sqrt((E * E).mean(-1, keepdims=True))
    W = r.standard_normal((MOCK.vocab_size, H)) * 3.0
    E32, W32 = E.astype(np.float32), W.astype(np.float32)
    n = E32.astype(np.float64) / np.sqrt((E32.astype(np.float64) ** 2).mean(-1, keepdims=True)
                                         + MOCK.layer_norm_epsilon)
    return ({"word_embeddings": ms.Tensor(E32), "layers": (zero,), "ln_f": p["ln_f"],
             "lm_head": ms.Tensor(W32)}, n @ W32.astype(np.float64).T)


def fixed_logits_params(z):
    """Logits z [V] whatever the input: embeddings all equal, lm_head's first column carries z."""
    H = MOCK.hidden_size
    p = tc2.init_params(MOCK, seed=0)
    zero = {k: ms.Tensor(np.zeros(v.shape, np.float32)) if "layernorm" not in k else v
            for k, v in p["layers"][0].items()}
    W = np.zeros((MOCK.vocab_size, H))
    W[:, 0] = z * math.sqrt(1 + MOCK.layer_norm_epsilon)
    return {"word_embeddings": ms.Tensor(np.ones((MOCK.vocab_size, H), np.float32)), "layers": (zero,),
            "ln_f": p["ln_f"], "lm_head": ms.Tensor(W.astype(np.float32))}


def mock_z():
    z = np.random.default_rng(4).standard_normal(MOCK.vocab_size) * 0.5 - 4.0
    z[[10, 20, 30, 40, 50, 60]] = [3.0, 2.6, 2.3, 2.0, 1.8, 1.5]
    return z


def draws(params, sampling, rows=64, steps=8, seed=0):
    out = generate_ids(params, MOCK, [[1, 4, 5]] * rows, max_new_tokens=steps, sampling=sampling,
                       stop_ids=(), seed=seed)
    assert all(len(o) == steps for o in out)
    return np.array(out).ravel()


def test_mock_model_really_has_fixed_logits():
    from tc2.model import forward
    z = mock_z()
    logits, _ = forward(fixed_logits_params(z), ms.Tensor(np.array([[1, 99, 400, 7]], np.int32)), MOCK)
    np.testing.assert_allclose(logits.asnumpy()[0], np.tile(z, (4, 1)), rtol=1e-5, atol=1e-5)


def test_sampled_support_and_frequencies_top_k():
    z = mock_z()
    s = SamplingConfig(do_sample=True, temperature=1.0, top_k=3, top_p=1.0, repetition_penalty=1.0)
    toks = draws(fixed_logits_params(z), s)
    assert set(toks.tolist()) == {10, 20, 30}
    p = np_softmax(z[[10, 20, 30]])
    freq = np.array([(toks == t).mean() for t in (10, 20, 30)])
    sd = np.sqrt(p * (1 - p) / toks.size)
    assert np.all(np.abs(freq - p) < 5 * sd), (freq, p)


def test_sampled_support_top_p_with_temperature():
    z = mock_z()
    s = SamplingConfig(do_sample=True, temperature=0.7, top_k=0, top_p=0.8, repetition_penalty=1.0)
    want = np.isfinite(np_top_p((z / 0.7)[None], 0.8))[0]
    probs = np.sort(np_softmax(z / 0.7))[::-1]
    assert np.abs(np.cumsum(probs) - 0.8).min() > 0.01                     # not on a boundary
    assert set(draws(fixed_logits_params(z), s).tolist()) == set(np.flatnonzero(want).tolist())
    assert 1 < want.sum() < 6                                               # a real cut, not all or one


def test_repetition_penalty_through_generate_both_signs():
    """Greedy with penalty 1.5 and the prompt holding the top token. Positive logits: 3.0 -> 2.0
    loses to 2.6, then that one drops to 1.73 and 2.3 wins... Negative logits: -1.0 -> -1.5 loses to
    -1.2 (dividing instead would keep it on top). Expected sequences come from a numpy simulation."""
    s = SamplingConfig(do_sample=False, repetition_penalty=1.5)

    def simulate(z, prompt, n):
        present = np.zeros(len(z), bool)
        present[prompt] = True
        out = []
        for _ in range(n):
            t = int(np.argmax(np_penalty(z, present, 1.5)))
            out.append(t)
            present[t] = True
        return out

    z = mock_z()
    got = generate_ids(fixed_logits_params(z), MOCK, [[10]], max_new_tokens=5, sampling=s, stop_ids=())[0]
    assert got == simulate(z, [10], 5) and got[:2] == [20, 30]
    neg = np.full(MOCK.vocab_size, -6.0)
    neg[[7, 8, 9]] = [-1.0, -1.2, -2.0]
    got = generate_ids(fixed_logits_params(neg), MOCK, [[7]], max_new_tokens=4, sampling=s, stop_ids=())[0]
    assert got == simulate(neg, [7], 4) == [8, 7, 7, 7]
    plain = generate_ids(fixed_logits_params(neg), MOCK, [[7]], max_new_tokens=2, stop_ids=())[0]
    assert plain == [7, 7]                                                  # sampling=None: no penalty


def test_cold_sampling_equals_greedy_through_generate():
    """A temperature near 0 on the Markov mock (logits depend on the last token, every top-2 gap
    >= 0.05) gives exactly the greedy chain."""
    params, actual = markov_params(6)
    top2 = np.sort(actual, -1)[:, -2:]
    gaps = top2[:, 1] - top2[:, 0]
    chain, t = [], 3
    for _ in range(12):
        t = int(np.argmax(actual[t]))
        chain.append(t)
    assert all(gaps[[3] + chain[:-1]] >= 0.05), "mock precondition: no near-ties on the chain"
    cold = SamplingConfig(do_sample=True, temperature=1e-4, top_k=0, top_p=1.0, repetition_penalty=1.0)
    assert generate_ids(params, MOCK, [[1, 3]], max_new_tokens=12, sampling=cold, stop_ids=(), seed=9)[0] == chain
    assert generate_ids(params, MOCK, [[1, 3]], max_new_tokens=12, stop_ids=())[0] == chain
