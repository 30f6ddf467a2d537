"""The TeleChat2 decoder as pure functions over a dict pytree of parameters.

params = {"word_embeddings": [V, H],
          "layers": ({"input_layernorm", "query", "key_value", "dense", "dense_bias",
                      "post_attention_layernorm", "gate_proj", "up_proj", "down_proj",
                      "down_proj_bias"}, ...),          # a tuple: tuples compile, lists do not
          "ln_f": [H], "lm_head": [V, H]}
Weights keep the checkpoint orientation [out, in], so HF conversion is a rename.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Tuple

import mindspore as ms
import numpy as np
from mindspore import ops

from tc2.cache import PAD_POS, cache_slots, write_slots
from tc2.compiled import forget_after_failure
from tc2.config import IGNORE_INDEX, ModelConfig
from tc2.context import LOCAL, ParallelContext
from tc2.layer import decoder_layer
from tc2.nn import linear, rms_norm, rope_cos_sin
from tc2.nn.take import take
from tc2.tree import tree_leaves, tree_map, tree_unflatten


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


# How `forward` executes the logical axes on a mesh (Megatron): heads, ffn columns and the
# vocabulary over tp, layers over pp, batch over dp, sequence over cp. The one rules table:
# per-rank slices, checkpoint split dims, the train step's norm, the Ascend layouts and the
# memory plan all read it (tc2.parallel.sharding).
DEFAULT_RULES = MappingProxyType({
    "vocab": "tp", "q_heads": "tp", "kv_heads": "tp", "mlp": "tp", "embed": None,
    "head_dim": None, "layers": "pp", "batch": "dp", "seq": "cp",
})


def tp_sharded(cfg: ModelConfig) -> dict:
    """Pytree of bool like the params: which tensors the forward splits over tp."""
    return tree_map(lambda s: any(DEFAULT_RULES.get(a) == "tp" for a in s.axes), param_specs(cfg))


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


def embed(table, tokens, ctx: ParallelContext = LOCAL):
    """Embedding rows as the float32 residual stream [B, T, H]. Under tp the table holds rows
    [r*V/tp, (r+1)*V/tp): other ids give zeros here and g sums the shards."""
    if ctx.tp == 1:
        return ops.gather(table, tokens, 0).astype(ms.float32)                       # [B, T, H]
    n = table.shape[0]
    local = tokens - ctx.tp_rank * n
    inside = ops.logical_and(local >= 0, local < n)
    e = ops.gather(table, ops.where(inside, local, 0), 0)                            # [B, T, H]
    return ctx.reduce_tp(e * inside.expand_dims(-1).astype(e.dtype)).astype(ms.float32)


def head(top, x, cfg: ModelConfig, ctx: ParallelContext = LOCAL):
    """Final norm and lm_head: logits [B, T, V/tp] in the compute dtype. top: {"ln_f", "lm_head"}."""
    x = rms_norm(x, top["ln_f"], cfg.layer_norm_epsilon).astype(cfg.compute_dtype)
    return linear(ctx.copy_tp(x), top["lm_head"])                                     # [B, T, V/tp]


def forward(params, tokens, cfg: ModelConfig, *, positions=None, cache=None, segment_ids=None,
            seq_len=None, last_only: bool = False, ctx: ParallelContext = LOCAL):
    """tokens int32 [B, T] -> (logits [B, T, V/tp] in the compute dtype, new cache or None).

    positions [B, T]: absolute positions (default: arange, after the cache's contents); a
    token with position PAD_POS is padding that no one attends to. segment_ids [B, T]: when
    given, attention stops at segment borders (document masking of packed rows).
    seq_len [B]: the total length L for dynamic NTK; default max(valid positions) + 1 per row
    (under context parallelism pass it, with global positions: a sequence share cannot know).
    last_only: logits for the last position only ([B, 1, V/tp]): a prefill needs no more, and
    the lm_head over every prompt position is ~40% of a long prefill's FLOPs.
    ctx: this process's share of the model (`tc2.context`); params are its local shards.
    """
    B, T = tokens.shape
    if cache is not None and ctx.cp > 1:
        raise ValueError("a KV cache cannot be combined with context parallelism (cp > 1)")
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
    x = embed(params["word_embeddings"], tokens, ctx)                                    # [B, T, H]
    new_k, new_v = (), ()
    for i in range(len(params["layers"])):
        kv_cache = None if cache is None else (cache["k"][i], cache["v"][i], idx, hit, kv_pos)
        x, (k, v), _ = decoder_layer(params["layers"][i], x, cos, sin, positions, cfg, ctx, kv_cache, segment_ids)
        new_k, new_v = new_k + (k,), new_v + (v,)
    if last_only:
        x = take(x, 1, T - 1, T)                                                        # [B, 1, H]
    logits = head(params, x, cfg, ctx)                                                   # [B, T, V/tp]
    if cache is None:
        return logits, None
    return logits, {"k": new_k, "v": new_v, "pos": kv_pos, "length": cache["length"] + T}


def gather_logits(logits, ctx: ParallelContext = LOCAL):
    """Full-vocabulary logits [..., V] from the tp shards [..., V/tp] (sampling, eval; V per token)."""
    if ctx.tp == 1:
        return logits
    moved = logits.swapaxes(0, -1)                                                       # [V/tp, ..., B]
    return ctx.gather_tp(moved).swapaxes(0, -1)                                          # [B, ..., V]


_sparse_ce = ops.SparseSoftmaxCrossEntropyWithLogits()


def cross_entropy_sum(logits, labels, ctx: ParallelContext = LOCAL):
    """(sum of token cross-entropies, number of counted tokens) over labels != -100, float32.

    One process: MindSpore's fused sparse softmax-CE (value and gradient in one kernel) is 3-7x
    faster on CPU than logsumexp - gather, but only returns the mean over all rows. Ignored
    rows are therefore replaced by a constant row [64, 0, 0, ...] with label 0, whose
    cross-entropy is log(1 + (V-1) e^-64) = 0 in float32 and whose gradient never reaches the
    real logits. Tensor parallel: see `_vocab_parallel_cross_entropy_sum`.
    """
    if ctx.tp > 1:
        return _vocab_parallel_cross_entropy_sum(logits, labels, ctx)
    V = logits.shape[-1]
    logits = logits.reshape(-1, V).astype(ms.float32)                                   # [N, V]
    labels = labels.reshape(-1)                                                          # [N]
    keep = labels != IGNORE_INDEX
    inert = ops.concat((ms.Tensor([64.0], ms.float32), ops.zeros(V - 1, ms.float32)))    # [V]
    logits = ops.where(keep.expand_dims(1), logits, inert.expand_dims(0))
    mean = _sparse_ce(logits, ops.where(keep, labels, 0).astype(ms.int32))
    return mean * labels.shape[0], keep.astype(ms.float32).sum()


def _vocab_parallel_cross_entropy_sum(logits, labels, ctx: ParallelContext):
    """The same sums from vocab-sharded logits [.., V/tp], never gathered.

    lse = log(sum over ranks of sum(exp(l - m))) + m with m the global max (a constant for the
    gradient); the target logit comes from the rank that owns it. Both sums go through g, so
    the gradient w.r.t. the local logits is softmax - onehot on this rank's columns.
    """
    n = logits.shape[-1]
    logits = logits.reshape(-1, n).astype(ms.float32)                                  # [N, V/tp]
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    mx = ctx.max_tp(ops.stop_gradient(logits.max(axis=-1)))                           # [N]
    sumexp = ctx.reduce_tp(ops.exp(logits - mx.expand_dims(1)).sum(axis=-1))          # [N]
    local = labels - ctx.tp_rank * n
    mine = ops.logical_and(keep, ops.logical_and(local >= 0, local < n))
    picked = ops.gather_elements(logits, 1, ops.where(mine, local, 0).astype(ms.int32).expand_dims(1))
    picked = ctx.reduce_tp(picked.squeeze(1) * mine.astype(ms.float32))               # [N]
    keepf = keep.astype(ms.float32)
    return ((ops.log(sumexp) + mx - picked) * keepf).sum(), keepf.sum()


def head_loss_sum(top, x, labels, cfg: ModelConfig, ctx: ParallelContext = LOCAL):
    """Sum of token losses of the final hidden states x (this process's share; replicated over tp)."""
    return cross_entropy_sum(head(top, x, cfg, ctx), labels, ctx)[0]


def loss_sums(params, tokens, labels, cfg: ModelConfig, *, positions=None, segment_ids=None,
              seq_len=None, ctx: ParallelContext = LOCAL):
    """(sum of token losses, loss-token count) of this process's share; replicated over tp."""
    logits, _ = forward(params, tokens, cfg, positions=positions, segment_ids=segment_ids,
                        seq_len=seq_len, ctx=ctx)
    return cross_entropy_sum(logits, labels, ctx)


def loss_fn(params, tokens, labels, cfg: ModelConfig, *, positions=None, segment_ids=None):
    """Mean token cross-entropy over positions whose label != -100 (labels already shifted)."""
    total, count = loss_sums(params, tokens, labels, cfg, positions=positions, segment_ids=segment_ids)
    return total / ops.maximum(count, 1.0)


@forget_after_failure(maxsize=32)
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
