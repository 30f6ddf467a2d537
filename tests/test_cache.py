"""The KV cache in graph mode against a float64 numpy model that caches the way the official
Hugging Face code does: each key keeps the dynamic-NTK rotation of the length at which it was
written, and each step rotates its query/key for the current total length."""
import mindspore as ms
import numpy as np
import pytest

import numpy_ref as ref
import tc2
from tc2.cache import PAD_POS, init_cache
from tc2.generate import compiled_steps, generate, pack_prompts
from tc2.model import forward

CFG = tc2.tiny(n_layer=2, training_seqlen=16, base_seqlen=16, seq_length=16)
PROMPT_LENS = (3, 9, 6)
CONTINUATION = 31          # totals 34..40: crosses training_seqlen (16) and 2x (32): alpha 1 -> 3 -> 7
MAX_LEN = 64


@pytest.fixture(scope="module")
def params():
    p = dict(tc2.init_params(CFG, seed=11))
    r = np.random.default_rng(5)
    # non-trivial norms and biases, and larger weights so logits are not all near zero
    p["layers"] = tuple({k: ms.Tensor(r.standard_normal(v.shape).astype(np.float32) * 0.1
                                      + (1 if "layernorm" in k else 0)) if v.ndim == 1
                         else ms.Tensor(v.asnumpy() * 3) for k, v in lp.items()} for lp in p["layers"])
    p["ln_f"] = ms.Tensor(r.uniform(0.5, 1.5, CFG.hidden_size).astype(np.float32))
    return p


@pytest.fixture(scope="module")
def sequences():
    r = np.random.default_rng(0)
    return [r.integers(4, CFG.vocab_size, n + CONTINUATION).astype(np.int32) for n in PROMPT_LENS]


def hf_cached_logits(P, cfg, ids, n_prompt):
    """Last-position logits [steps, V] after the prompt (one chunk) and after each further token
    (one at a time), with a growing K/V cache of post-rotation keys, float64."""
    K = [np.zeros((0, cfg.num_key_value_heads, cfg.head_dim)) for _ in P["layers"]]
    Vs = [np.zeros((0, cfg.num_key_value_heads, cfg.head_dim)) for _ in P["layers"]]
    chunks = [ids[:n_prompt]] + [ids[t:t + 1] for t in range(n_prompt, len(ids))]
    out, start = [], 0
    for chunk in chunks:
        T = len(chunk)
        pos, L = np.arange(start, start + T), start + T
        base, mscale = ref.ntk(L, cfg)
        x = P["word_embeddings"][chunk]
        for i, lp in enumerate(P["layers"]):
            h = ref.rms_norm(x, lp["input_layernorm"], cfg.layer_norm_epsilon)
            q = (h @ lp["query"].T).reshape(T, cfg.n_head, cfg.head_dim)
            kv = (h @ lp["key_value"].T).reshape(T, cfg.num_key_value_heads, 2, cfg.head_dim)
            K[i] = np.concatenate([K[i], ref.rope(kv[:, :, 0], pos, base, mscale)])
            Vs[i] = np.concatenate([Vs[i], kv[:, :, 1]])
            q = ref.rope(q, pos, base, mscale)
            a = ref.attention(q, K[i], Vs[i], np.arange(L)[None, :] <= pos[:, None]).reshape(T, -1)
            x = x + a @ lp["dense"].T + lp["dense_bias"]
            h = ref.rms_norm(x, lp["post_attention_layernorm"], cfg.layer_norm_epsilon)
            x = x + (ref.silu(h @ lp["gate_proj"].T) * (h @ lp["up_proj"].T)) @ lp["down_proj"].T \
                + lp["down_proj_bias"]
        x = ref.rms_norm(x, P["ln_f"], cfg.layer_norm_epsilon)
        out.append(x[-1] @ P["lm_head"].T)
        start += T
    return np.stack(out)


def run_cached(params, prompts, continuations, cfg=CFG, pad_tokens=None):
    """Prefill + one decode step per forced token, in graph mode. -> logits [B, steps, V]."""
    batch = pack_prompts(prompts, cfg, max_new_tokens=len(continuations[0]) + 1, max_len=MAX_LEN)
    prefill, decode = compiled_steps(cfg, None)
    B = batch.batch
    tokens = batch.tokens if pad_tokens is None else np.where(batch.positions == PAD_POS, pad_tokens,
                                                              batch.tokens).astype(np.int32)
    p = ms.mutable(params)
    dummy = ms.Tensor(np.zeros((B, 1), np.bool_))
    noise = ms.Tensor(np.zeros(B, np.float32))
    _, logits, parts, _ = prefill(p, ms.Tensor(tokens), ms.Tensor(batch.positions),
                                  ms.mutable(init_cache(cfg, B, batch.cache_len)), dummy, noise)
    out = [logits.asnumpy()]
    for s in range(len(continuations[0])):
        tok = np.array([[c[s]] for c in continuations], np.int32)
        pos = (batch.lengths + s).reshape(B, 1).astype(np.int32)
        cache = {"k": parts[0], "v": parts[1], "pos": parts[2], "length": parts[3]}
        _, logits, parts, _ = decode(p, ms.Tensor(tok), ms.Tensor(pos), ms.mutable(cache), dummy, noise)
        out.append(logits.asnumpy())
    return np.stack(out, 1), parts


@pytest.fixture(scope="module")
def cached(params, sequences):
    prompts = [s[:n] for s, n in zip(sequences, PROMPT_LENS)]
    conts = [s[n:] for s, n in zip(sequences, PROMPT_LENS)]
    return run_cached(params, prompts, conts)


def test_init_cache_layout():
    c = init_cache(CFG, 3, 20)
    assert len(c["k"]) == len(c["v"]) == CFG.n_layer
    assert c["k"][0].shape == (3, 20, CFG.num_key_value_heads, CFG.head_dim) and c["k"][0].dtype == ms.float32
    assert np.all(c["pos"].asnumpy() == PAD_POS) and c["pos"].dtype == ms.int32
    assert np.all(c["length"].asnumpy() == 0)
    assert init_cache(CFG.replace(dtype="float16"), 1, 4)["v"][1].dtype == ms.float16


def test_cached_decode_matches_hf_style_reference_every_step(params, sequences, cached):
    """Rows of lengths 3/9/6 in one left-padded batch, 31 forced decode steps each, crossing
    training_seqlen and 2x training_seqlen: every step's logits == the float64 reference."""
    logits, _ = cached
    P = ref.to_numpy64(params)
    for r, (seq, n) in enumerate(zip(sequences, PROMPT_LENS)):
        want = hf_cached_logits(P, CFG, seq, n)                             # [1 + 31, V]
        np.testing.assert_allclose(logits[r], want, rtol=1e-4, atol=1e-4, err_msg=f"row {r}")
        # up to training_seqlen it is also the plain full recompute (one causal forward)
        below = CFG.training_seqlen - n + 1                                 # steps with total <= 16
        full = ref.forward(P, seq[None, :CFG.training_seqlen], CFG)[0, n - 1:]
        np.testing.assert_allclose(logits[r, :below], full, rtol=1e-4, atol=1e-4, err_msg=f"row {r}")


def test_reference_equals_full_recompute_until_ntk_kicks_in(params, sequences):
    """Guard: below training_seqlen a cache changes nothing, so cached == full recompute; past it
    the cached keys keep their old rotation and differ from a full recompute at the new length
    (so the test above really checks the cache semantics, not just causal attention)."""
    P = ref.to_numpy64(params)
    seq, n = sequences[1], PROMPT_LENS[1]
    cached_ref = hf_cached_logits(P, CFG, seq, n)
    for step, total in ((0, n), (16 - n, 16), (20 - n, 20), (len(seq) - n, len(seq))):
        full = ref.forward(P, seq[None, :total], CFG)[0, -1]                # keys re-rotated at L=total
        if total <= CFG.training_seqlen:
            np.testing.assert_allclose(cached_ref[step], full, rtol=1e-9, atol=1e-9)
        else:
            assert np.abs(cached_ref[step] - full).max() > 1e-3, f"no NTK effect at L={total}"


def test_cache_bookkeeping_after_decode(cached):
    _, (k, v, kv_pos, length) = cached
    block = pack_prompts([[1] * n for n in PROMPT_LENS], CFG, max_new_tokens=CONTINUATION + 1,
                         max_len=MAX_LEN)
    written = block.tokens.shape[1] + CONTINUATION
    assert np.all(length.asnumpy() == written)
    pos = kv_pos.asnumpy()
    for r, n in enumerate(PROMPT_LENS):
        row = pos[r, :written]
        real = row[row != PAD_POS]
        assert list(real) == list(range(n + CONTINUATION)), f"row {r} slots hold positions {real}"
        assert np.all(pos[r, written:] == PAD_POS)                          # untouched slots stay empty
    assert k[0].shape[1] == block.cache_len


def test_padding_content_is_never_attended(params, sequences, cached):
    """Replace every pad token with random ids: the real rows' logits do not move at all."""
    prompts = [s[:n] for s, n in zip(sequences, PROMPT_LENS)]
    conts = [s[n:n + 3] for s, n in zip(sequences, PROMPT_LENS)]
    noisy = np.random.default_rng(3).integers(0, CFG.vocab_size, (len(prompts), 16)).astype(np.int32)
    logits, _ = run_cached(params, prompts, [c for c in conts], pad_tokens=noisy)
    np.testing.assert_array_equal(logits, run_cached(params, prompts, conts)[0])
    np.testing.assert_allclose(logits, cached[0][:, :4], rtol=1e-5, atol=1e-5)


def test_pynative_cache_forward_matches_graph(params, sequences, cached):
    """The same cache code path without ms.jit (prefill then two decode steps)."""
    prompts = [s[:n] for s, n in zip(sequences, PROMPT_LENS)]
    batch = pack_prompts(prompts, CFG, max_new_tokens=CONTINUATION + 1, max_len=MAX_LEN)
    cache = init_cache(CFG, batch.batch, batch.cache_len)
    logits, cache = forward(params, ms.Tensor(batch.tokens), CFG, positions=ms.Tensor(batch.positions),
                            cache=cache)
    got = [logits.asnumpy()[:, -1]]
    for s in range(2):
        tok = np.array([[seq[n + s]] for seq, n in zip(sequences, PROMPT_LENS)], np.int32)
        pos = (batch.lengths + s).reshape(-1, 1).astype(np.int32)
        logits, cache = forward(params, ms.Tensor(tok), CFG, positions=ms.Tensor(pos), cache=cache)
        got.append(logits.asnumpy()[:, -1])
    np.testing.assert_allclose(np.stack(got, 1), cached[0][:, :3], rtol=1e-5, atol=1e-5)


def test_prompt_longer_than_the_cache_is_an_error(params):
    with pytest.raises(ValueError, match=r"prompt 1 has 16 tokens .* max_len=16"):
        pack_prompts([[1, 2], [5] * 16], CFG, max_new_tokens=4)            # default max_len = seq_length
    with pytest.raises(ValueError, match=r"prompt 0 has 70 tokens .* max_len=64"):
        generate(params, CFG, [[5] * 70], max_new_tokens=1, max_len=64)   # raised at the call
    b = pack_prompts([[1, 2], [5] * 15], CFG, max_new_tokens=4)            # 15 + 1 fits exactly
    assert list(b.budgets) == [4, 1]
