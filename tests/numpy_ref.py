"""An independent float64 numpy TeleChat2, written from the spec (not from tc2's code).

Written the way the official PyTorch code reads: K/V split from the fused weight by viewing
its output as [.., n_kv, 2, head_dim], GQA by repeat_interleave, RoPE recomputed from the
total length with the spec's alpha/mscale formula, softmax over a causal mask.
"""
import math

import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def ntk(L, cfg):
    L = max(L, cfg.training_seqlen)
    alpha = max(2 ** math.ceil(math.log(L / cfg.base_seqlen, 2) + 1) - 1, 1)
    base = cfg.rope_theta * alpha ** (cfg.head_dim / (cfg.head_dim - 2))
    mscale = 1.0 if L <= cfg.training_seqlen else 0.1 * math.log(L / cfg.training_seqlen) + 1.0
    return base, mscale


def rope(x, pos, base, mscale):
    """x [T, N, D] at integer positions pos [T]; half-split rotate_half convention."""
    d = x.shape[-1]
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None]
    emb = np.concatenate([ang, ang], -1)
    cos, sin = np.cos(emb)[:, None] * mscale, np.sin(emb)[:, None] * mscale
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def attention(q, k, v, causal_ok):
    """q [T, Nq, D], k/v [S, Nkv, D], causal_ok [T, S] bool. A query that may see no key
    (a leading pad under a key mask) outputs 0; nothing that carries loss depends on it."""
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("tnd,snd->nts", q, k) / math.sqrt(q.shape[-1])
    seen = causal_ok.any(-1)                                    # [T]
    s = np.where(causal_ok[None] | ~seen[None, :, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nts,snd->tnd", p, v) * seen[:, None, None]


def silu(x):
    return x / (1 + np.exp(-x))


def forward(P, tokens, cfg, key_ok=None):
    """P: {hf-style short names} float64 numpy; tokens [B, T] -> logits [B, T, V] float64.

    key_ok [B, T] bool (optional): MindFormers' training mask, query i sees key j iff j <= i
    AND key_ok[j] (e.g. token != pad); positions stay 0..T-1 whatever the mask."""
    out = []
    for b, row in enumerate(np.asarray(tokens)):
        T = len(row)
        pos = np.arange(T)
        base, mscale = ntk(T, cfg)
        x = P["word_embeddings"][row]
        for lp in P["layers"]:
            h = rms_norm(x, lp["input_layernorm"], cfg.layer_norm_epsilon)
            q = (h @ lp["query"].T).reshape(T, cfg.n_head, cfg.head_dim)
            kv = (h @ lp["key_value"].T).reshape(T, cfg.num_key_value_heads, 2, cfg.head_dim)
            k, v = kv[:, :, 0], kv[:, :, 1]
            q, k = rope(q, pos, base, mscale), rope(k, pos, base, mscale)
            ok = pos[None, :] <= pos[:, None]
            if key_ok is not None:
                ok = ok & np.asarray(key_ok[b], bool)[None, :]
            a = attention(q, k, v, ok).reshape(T, -1)
            x = x + a @ lp["dense"].T + lp["dense_bias"]
            h = rms_norm(x, lp["post_attention_layernorm"], cfg.layer_norm_epsilon)
            x = x + (silu(h @ lp["gate_proj"].T) * (h @ lp["up_proj"].T)) @ lp["down_proj"].T \
                + lp["down_proj_bias"]
        x = rms_norm(x, P["ln_f"], cfg.layer_norm_epsilon)
        out.append(x @ P["lm_head"].T)
    return np.stack(out)


def token_mean_loss(logits, labels):
    """Mean cross-entropy over labels != -100 (labels already shifted), float64."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    keep = labels != -100
    picked = np.take_along_axis(logits, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    return float(((lse - picked) * keep).sum() / keep.sum())


def to_numpy64(params):
    """tc2 params pytree (ms.Tensor leaves) -> same structure of float64 numpy arrays."""
    if isinstance(params, dict):
        return {k: to_numpy64(v) for k, v in params.items()}
    if isinstance(params, tuple):
        return tuple(to_numpy64(v) for v in params)
    return params.asnumpy().astype(np.float64)
