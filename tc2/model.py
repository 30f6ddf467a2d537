"""The TeleChat2 decoder as pure functions over a dict pytree of parameters.

params = {"word_embeddings": [V, H],
          "layers": ({"input_layernorm", "query", "key_value", "dense", "dense_bias",
                      "post_attention_layernorm", "gate_proj", "up_proj", "down_proj",
                      "down_proj_bias"}, ...),          # a tuple: tuples compile, lists do not
          "ln_f": [H], "lm_head": [V, H]}
Weights keep the checkpoint orientation [out, in], so HF conversion is a rename.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

import mindspore as ms
import numpy as np
from mindspore import ops

from tc2.cache import PAD_POS, cache_slots, write_slots
from tc2.config import ModelConfig
from tc2.nn import apply_rope, attention, linear, rms_norm, rope_cos_sin, swiglu
from tc2.tree import tree_flatten_with_names, tree_leaves, tree_map, tree_unflatten

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ParamSpec:
    """What a parameter is, without its memory: shape, dtype, logical axes, initializer."""
    shape: Tuple[int, ...]
    axes: Tuple[str, ...]          # one logical axis name (or "") per dimension, for sharding
    init: str                      # "normal" | "zeros" | "ones"
    dtype: str = "float32"         # parameters are float32 masters; compute dtype is cfg.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def param_specs(cfg: ModelConfig) -> dict:
    H, V, F, D = cfg.hidden_size, cfg.vocab_size, cfg.ffn_hidden_size, cfg.head_dim
    kv_rows = 2 * cfg.num_key_value_heads * D            # per-head interleaved [k_h, v_h, ...]
    layer = {
        "input_layernorm": ParamSpec((H,), ("embed",), "ones"),
        "query": ParamSpec((cfg.n_head * D, H), ("q_heads", "embed"), "normal"),
        "key_value": ParamSpec((kv_rows, H), ("kv_heads", "embed"), "normal"),
        "dense": ParamSpec((H, cfg.n_head * D), ("embed", "q_heads"), "normal"),
        "dense_bias": ParamSpec((H,), ("embed",), "zeros"),
        "post_attention_layernorm": ParamSpec((H,), ("embed",), "ones"),
        "gate_proj": ParamSpec((F, H), ("mlp", "embed"), "normal"),
        "up_proj": ParamSpec((F, H), ("mlp", "embed"), "normal"),
        "down_proj": ParamSpec((H, F), ("embed", "mlp"), "normal"),
        "down_proj_bias": ParamSpec((H,), ("embed",), "zeros"),
    }
    return {
        "word_embeddings": ParamSpec((V, H), ("vocab", "embed"), "normal"),
        "layers": tuple(dict(layer) for _ in range(cfg.n_layer)),
        "ln_f": ParamSpec((H,), ("embed",), "ones"),
        "lm_head": ParamSpec((V, H), ("vocab", "embed"), "normal"),
    }


def count_params(cfg: ModelConfig) -> int:
    return sum(s.size for s in tree_leaves(param_specs(cfg)))


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """HF init: normal(0, initializer_range) weights, zero biases, unit norms; float32."""
    rng = np.random.default_rng(seed)
    specs = param_specs(cfg)

    def make(spec: ParamSpec):
        if spec.init == "normal":
            a = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(cfg.initializer_range)
        else:
            a = (np.zeros if spec.init == "zeros" else np.ones)(spec.shape, np.float32)
        return ms.Tensor(a)

    return tree_unflatten(specs, [make(s) for s in tree_leaves(specs)])


def _compute_dtype(cfg: ModelConfig):
    return {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[cfg.dtype]


def _block(p, x, cos, sin, positions, cfg: ModelConfig, kv_cache, segment_ids):
    """One pre-norm decoder layer. The residual stream x stays float32; matmuls run in dt."""
    dt = _compute_dtype(cfg)
    B, T = positions.shape
    D, n_kv = cfg.head_dim, cfg.num_key_value_heads
    h = rms_norm(x, p["input_layernorm"], cfg.layer_norm_epsilon).astype(dt)   # [B, T, H]
    q = linear(h, p["query"]).reshape(B, T, cfg.n_head, D)                     # [B, T, Nq, D]
    kv = linear(h, p["key_value"]).reshape(B, T, n_kv, 2 * D)                  # [B, T, Nkv, 2D]
    q = apply_rope(q, cos, sin)
    k = apply_rope(kv[..., :D], cos, sin)                                      # [B, T, Nkv, D]
    v = kv[..., D:]
    if kv_cache is None:
        kv_pos, kv_segment = positions, segment_ids
    else:                                   # (k_buf, v_buf, slot idx, slot hit, slot positions)
        k_buf, v_buf, idx, hit, kv_pos = kv_cache
        k, v = write_slots(k_buf, k, idx, hit), write_slots(v_buf, v, idx, hit)   # [B, Tmax, Nkv, D]
        segment_ids, kv_segment = None, None
    a = attention(q, k, v, positions, kv_pos, q_segment=segment_ids, kv_segment=kv_segment)
    a = linear(a.reshape(B, T, cfg.n_head * D), p["dense"], p["dense_bias"])  # [B, T, H]
    x = x + a.astype(ms.float32)
    h = rms_norm(x, p["post_attention_layernorm"], cfg.layer_norm_epsilon).astype(dt)
    x = x + swiglu(h, p["gate_proj"], p["up_proj"], p["down_proj"],
                   p["down_proj_bias"]).astype(ms.float32)
    return x, (k, v)


def forward(params, tokens, cfg: ModelConfig, *, positions=None, cache=None, segment_ids=None,
            seq_len=None, last_only: bool = False):
    """tokens int32 [B, T] -> (logits [B, T, V] in the compute dtype, new cache or None).

    positions [B, T]: absolute positions (default: arange, after the cache's contents); a
    token with position PAD_POS is padding that no one attends to. segment_ids [B, T]: when
    given, attention stops at segment borders (document masking of packed rows).
    seq_len [B]: the total length L for dynamic NTK; default max(valid positions) + 1 per row.
    last_only: logits for the last position only ([B, 1, V]): a prefill needs no more, and
    the lm_head over every prompt position is ~40% of a long prefill's FLOPs.
    """
    B, T = tokens.shape
    if positions is None:
        positions = ops.arange(T, dtype=ms.int32).expand_dims(0).broadcast_to((B, T))
        if cache is not None:
            positions = positions + cache["length"].expand_dims(1)
    if seq_len is None:
        seq_len = ops.where(positions < PAD_POS, positions, -1).max(axis=1) + 1          # [B]
    cos, sin = rope_cos_sin(positions, seq_len, head_dim=cfg.head_dim,
                            base_seqlen=cfg.base_seqlen, training_seqlen=cfg.training_seqlen,
                            theta=cfg.rope_theta)                                         # [B, T, D]
    idx, hit, kv_pos = None, None, None
    if cache is not None:
        idx, hit = cache_slots(cache["length"], T, cache["pos"].shape[1])
        kv_pos = write_slots(cache["pos"], positions, idx, hit)                           # [B, Tmax]
    x = ops.gather(params["word_embeddings"], tokens, 0).astype(ms.float32)             # [B, T, H]
    new_k, new_v = (), ()
    for i in range(len(params["layers"])):
        kv_cache = None if cache is None else (cache["k"][i], cache["v"][i], idx, hit, kv_pos)
        x, (k, v) = _block(params["layers"][i], x, cos, sin, positions, cfg, kv_cache, segment_ids)
        new_k, new_v = new_k + (k,), new_v + (v,)
    if last_only:
        x = x[:, -1:]                                                                    # [B, 1, H]
    x = rms_norm(x, params["ln_f"], cfg.layer_norm_epsilon).astype(_compute_dtype(cfg))
    logits = linear(x, params["lm_head"])                                               # [B, T, V]
    if cache is None:
        return logits, None
    return logits, {"k": new_k, "v": new_v, "pos": kv_pos, "length": cache["length"] + T}


_sparse_ce = ops.SparseSoftmaxCrossEntropyWithLogits()


def cross_entropy_sum(logits, labels):
    """(sum of token cross-entropies, number of counted tokens) over labels != -100, float32.

    MindSpore's fused sparse softmax-CE (value and gradient in one kernel) is 3-7x faster on
    CPU than logsumexp - gather, but only returns the mean over all rows. Ignored rows are
    therefore replaced by a constant row [64, 0, 0, ...] with label 0, whose cross-entropy is
    log(1 + (V-1) e^-64) = 0 in float32 and whose gradient never reaches the real logits.
    """
    V = logits.shape[-1]
    logits = logits.reshape(-1, V).astype(ms.float32)                                   # [N, V]
    labels = labels.reshape(-1)                                                          # [N]
    keep = labels != IGNORE_INDEX
    inert = ops.concat((ms.Tensor([64.0], ms.float32), ops.zeros(V - 1, ms.float32)))    # [V]
    logits = ops.where(keep.expand_dims(1), logits, inert.expand_dims(0))
    mean = _sparse_ce(logits, ops.where(keep, labels, 0).astype(ms.int32))
    return mean * labels.shape[0], keep.astype(ms.float32).sum()


def loss_fn(params, tokens, labels, cfg: ModelConfig, *, positions=None, segment_ids=None):
    """Mean token cross-entropy over positions whose label != -100 (labels already shifted)."""
    logits, _ = forward(params, tokens, cfg, positions=positions, segment_ids=segment_ids)
    total, count = cross_entropy_sum(logits, labels)
    return total / ops.maximum(count, 1.0)


@functools.lru_cache(maxsize=32)
def _jitted_forward(cfg: ModelConfig):
    @ms.jit
    def fwd(params, tokens, positions):
        return forward(params, tokens, cfg, positions=positions)[0]
    return fwd


def jit_forward(params, tokens, cfg: ModelConfig, *, positions=None):
    """Graph-mode logits, compiled once per (config, shapes) and reused across new params."""
    if positions is None:
        B, T = tokens.shape
        positions = ms.Tensor(np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy())
    return _jitted_forward(cfg)(ms.mutable(params), tokens, positions)


def cast_params(params, dtype):
    """A copy of params in `dtype` (e.g. to store or ship a float16 model)."""
    return tree_map(lambda x: x.astype(dtype), params)


def named_params(params) -> dict:
    return tree_flatten_with_names(params)
