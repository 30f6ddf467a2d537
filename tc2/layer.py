"""The TeleChat2 decoder layer: its forward, what it saves, and its backward.

One function, `decoder_layer`, is the layer everywhere: inside the unrolled model graph
(`tc2.model.forward`), in the KV-cache decode step, and in the layer-by-layer train step
(`tc2.layerwise`), which compiles it once and calls it for every layer. For that step the
layer has a backward of its own, in two flavours of activation recompute:

* "selective": the forward keeps the matmul outputs (q, kv, attention output, the gate and up
  projections) and the residual after attention; the backward takes the weight gradients
  from them and recomputes only the cheap parts (norms, RoPE + attention scores/softmax, the
  SwiGLU activation), whose vector-Jacobian products come from autodiff;
* "full": the forward keeps only the layer's input and the backward recomputes the layer.
Both equal autodiff of the whole model (tests/test_layerwise.py). Tensor parallel: the input
norms enter the column-parallel matmuls through f (its backward sums over tp), the
row-parallel outputs leave through g (its backward is the identity).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

from tc2.cache import write_slots
from tc2.config import ModelConfig
from tc2.context import ParallelContext
from tc2.nn import apply_rope, attention, linear, rms_norm
from tc2.nn.linear import linear_backward
from tc2.nn.mlp import gated
from tc2.nn.ring import ring_attention

RECOMPUTE = ("none", "selective", "full")


def _norm(x, w, cfg: ModelConfig):
    """RMSNorm of the float32 residual stream, cast to the compute dtype."""
    return rms_norm(x, w, cfg.layer_norm_epsilon).astype(cfg.compute_dtype)            # [B, T, H]


def _norm_in(x, w, cfg: ModelConfig, ctx: ParallelContext):
    """`_norm`, entering a tensor-parallel region (f: identity forward, sum over tp backward)."""
    return ctx.copy_tp(_norm(x, w, cfg))


def _attention_core(q, kv, cos, sin, positions, segment_ids, cfg: ModelConfig, ctx: ParallelContext,
                    kv_cache=None):
    """Raw projections q [B, T, nq*D], kv [B, T, nkv*2D] -> (attention output [B, T, nq*D], (k, v))."""
    B, T = positions.shape
    D = cfg.head_dim
    q = apply_rope(q.reshape(B, T, q.shape[-1] // D, D), cos, sin)                  # [B, T, nq, D]
    kv = kv.reshape(B, T, kv.shape[-1] // (2 * D), 2 * D)                             # [B, T, nkv, 2D]
    k, v = apply_rope(kv[..., :D], cos, sin), kv[..., D:]                            # [B, T, nkv, D]
    if kv_cache is not None:                # (k_buf, v_buf, slot idx, slot hit, slot positions)
        k_buf, v_buf, idx, hit, kv_pos = kv_cache
        k, v = write_slots(k_buf, k, idx, hit), write_slots(v_buf, v, idx, hit)       # [B, Tmax, nkv, D]
        a = attention(q, k, v, positions, kv_pos)
    elif ctx.cp > 1:
        a, _ = ring_attention(q, k, v, positions, positions, rotate=ctx.rotate, ring_size=ctx.cp,
                              q_segment=segment_ids, kv_segment=segment_ids)
        a = a.astype(q.dtype)
    else:
        a = attention(q, k, v, positions, positions, q_segment=segment_ids, kv_segment=segment_ids,
                      index_causal=True)      # a full row: no query sees a later token
    return a.reshape(B, T, -1), (k, v)


def _add_out(x, a, w, b, ctx: ParallelContext):
    """x + linear(a, w) + b for a row-parallel weight, into the float32 stream: the partial
    products summed over tp (g), the bias added once. In one process the bias goes into the 2-D
    matmul output: a broadcast add on the 3-D tensor made the M train benchmark 0.87-0.89x."""
    if ctx.tp == 1:
        return x + linear(a, w, b).astype(ms.float32)
    return x + (ctx.reduce_tp(linear(a, w)) + b.astype(a.dtype)).astype(ms.float32)


def decoder_layer(p, x, cos, sin, positions, cfg: ModelConfig, ctx: ParallelContext, kv_cache=None,
                  segment_ids=None):
    """One pre-norm layer on this rank's heads / ffn columns -> (x out, (k, v), saved).

    The residual stream x [B, T, H] stays float32 and whole; matmuls run in the compute dtype.
    `saved` = (q, kv, attention output, h, gate, up): what the selective backward needs
    (dead code, removed by the compiler, where nobody uses it).
    """
    n1 = _norm_in(x, p["input_layernorm"], cfg, ctx)
    q, kv = linear(n1, p["query"]), linear(n1, p["key_value"])                       # [B, T, nq*D], [B, T, nkv*2D]
    a, kv_out = _attention_core(q, kv, cos, sin, positions, segment_ids, cfg, ctx, kv_cache)
    h = _add_out(x, a, p["dense"], p["dense_bias"], ctx)                                 # [B, T, H]
    n2 = _norm_in(h, p["post_attention_layernorm"], cfg, ctx)
    g, u = linear(n2, p["gate_proj"]), linear(n2, p["up_proj"])                      # [B, T, F/tp]
    y = _add_out(h, gated(g, u), p["down_proj"], p["down_proj_bias"], ctx)
    return y, kv_out, (q, kv, a, h, g, u)


def _dot(y, dy):
    return (y.astype(ms.float32) * dy.astype(ms.float32)).sum()


def layer_backward_selective(cfg: ModelConfig, ctx: ParallelContext):
    """A function (p, x, saved, cos, sin, positions, segment_ids, dy) -> (dx, grads of p) of
    `decoder_layer` from the saved matmul outputs (see module doc).

    The vector-Jacobian products of the cheap parts are built here, outside the jitted caller,
    for the reason `layer_backward_full` gives (custom-bprop cells: f, g and the attention kernel).
    """
    def act(g_, u_, dm):
        return _dot(gated(g_, u_), dm)

    def norm(h_, w_, dn):
        return _dot(_norm(h_, w_, cfg), dn)

    def core(q_, kv_, cos, sin, positions, segment_ids, da):
        return _dot(_attention_core(q_, kv_, cos, sin, positions, segment_ids, cfg, ctx)[0], da)

    act_vjp, norm_vjp, core_vjp = (ms.grad(f, grad_position=(0, 1)) for f in (act, norm, core))

    def backward(p, x, saved, cos, sin, positions, segment_ids, dy):
        q, kv, a, h, g, u = saved
        dt = cfg.compute_dtype
        dyc = dy.astype(dt)                                    # the bias add ran in the compute dtype
        grads = {"down_proj_bias": dyc.sum(axis=(0, 1)).astype(ms.float32)}
        dm, grads["down_proj"] = linear_backward(gated(g, u), p["down_proj"], dyc)  # g's backward: identity
        dg, du = act_vjp(g, u, dm)
        n2 = _norm(h, p["post_attention_layernorm"], cfg)     # f is the identity forward ...
        dn_g, grads["gate_proj"] = linear_backward(n2, p["gate_proj"], dg)
        dn_u, grads["up_proj"] = linear_backward(n2, p["up_proj"], du)
        dn2 = ctx.sum_tp(dn_g + dn_u)                         # ... and sums over tp backward
        dh_n, grads["post_attention_layernorm"] = norm_vjp(h, p["post_attention_layernorm"], dn2)
        dh = dy + dh_n
        dhc = dh.astype(dt)
        grads["dense_bias"] = dhc.sum(axis=(0, 1)).astype(ms.float32)
        da, grads["dense"] = linear_backward(a, p["dense"], dhc)
        dq, dkv = core_vjp(q, kv, cos, sin, positions, segment_ids, da)
        n1 = _norm(x, p["input_layernorm"], cfg)
        dn_q, grads["query"] = linear_backward(n1, p["query"], dq)
        dn_kv, grads["key_value"] = linear_backward(n1, p["key_value"], dkv)
        dn1 = ctx.sum_tp(dn_q + dn_kv)
        dx_n, grads["input_layernorm"] = norm_vjp(x, p["input_layernorm"], dn1)
        return dh + dx_n, {k: grads[k] for k in p}
    return backward


def layer_backward_full(cfg: ModelConfig, ctx: ParallelContext):
    """A function (p, x, cos, sin, positions, segment_ids, dy) -> (grads of p, dx) of
    `decoder_layer`, recomputing the layer from its input.

    Built outside the jitted caller on purpose: differentiating a closure defined inside a
    traced function that reaches the custom-bprop collectives (f, g) fails in MindSpore 2.10
    ("The parameters number of the function is 7, but the number of provided arguments is 2").
    """
    def out(p, x, cos, sin, positions, segment_ids, dy):
        return _dot(decoder_layer(p, x, cos, sin, positions, cfg, ctx, None, segment_ids)[0], dy)
    return ms.grad(out, grad_position=(0, 1))
