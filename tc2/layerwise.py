"""Gradients layer by layer: one compiled decoder layer, driven over the layers from the host.

The unrolled model graph (`ms.value_and_grad` over `tc2.model.forward`) compiles every layer
again: its compile time grows faster than depth (13 s at 4 layers, 132 s at 32 measured on
this machine), and MindSpore's CPU graphs keep many per-op buffers alive for the whole step.
Here the step is a host loop over small graphs, each compiled once and reused for every layer:

    embed -> layer_fwd x L -> head (loss, its gradient) -> layer_bwd x L (reversed) -> embed_bwd

so compile time does not depend on depth, and a layer's temporaries are freed when its call
returns: what lives through the step is the activations the recompute mode keeps
(`tc2.layer`: "selective" keeps the matmul outputs, "full" only each layer's input). The
gradients equal autodiff of the unrolled graph (tests/test_layerwise.py), in one process and
under any parallel context (the collectives are inside the layer's forward and backward).
"""
from __future__ import annotations

from typing import NamedTuple

import mindspore as ms
from mindspore import ops

from tc2.compiled import forget_after_failure
from tc2.config import ModelConfig
from tc2.context import ParallelContext
from tc2.layer import decoder_layer, layer_backward_full, layer_backward_selective
from tc2.model import embed, head_loss_sum
from tc2.nn import rope_cos_sin
from tc2.tree import tree_map


class _Graphs(NamedTuple):
    rope: object
    embed_fwd: object
    layer_fwd: object
    head: object
    layer_bwd: object
    embed_bwd: object


def _add(acc, grads):
    return tree_map(lambda a, g: a + g, acc, grads)


@forget_after_failure
def compiled_graphs(cfg: ModelConfig, ctx: ParallelContext, recompute: str) -> _Graphs:
    """The jitted pieces of one layer-by-layer step (each compiled on first use, once)."""
    selective = recompute == "selective"

    @ms.jit
    def rope(positions, seq_len):
        return rope_cos_sin(positions, seq_len, head_dim=cfg.head_dim, base_seqlen=cfg.base_seqlen,
                            training_seqlen=cfg.training_seqlen, theta=cfg.rope_theta)     # [B, T, D] x2

    @ms.jit
    def embed_fwd(table, tokens):
        return embed(table, tokens, ctx)                                                  # [B, T, H] f32

    @ms.jit
    def layer_fwd(p, x, cos, sin, positions, segment_ids):
        y, _, saved = decoder_layer(p, x, cos, sin, positions, cfg, ctx, None, segment_ids)
        return y, saved                  # the matmul outputs the selective backward starts from

    @ms.jit
    def layer_fwd_only(p, x, cos, sin, positions, segment_ids):
        return decoder_layer(p, x, cos, sin, positions, cfg, ctx, None, segment_ids)[0]

    def objective(top, x, labels, weight):
        loss_sum = head_loss_sum(top, x, labels, cfg, ctx)
        return loss_sum * weight, loss_sum

    head_grad = ms.value_and_grad(objective, grad_position=(0, 1), has_aux=True)

    @ms.jit
    def head(top, acc, x, labels, weight):
        (_, loss_sum), (dtop, dx) = head_grad(top, x, labels, weight)
        return loss_sum, _add(acc, dtop), dx

    @ms.jit
    def layer_bwd(p, acc, x, saved, cos, sin, positions, segment_ids, dy):
        dx, dp = layer_backward_selective(p, x, saved, cos, sin, positions, segment_ids, dy, cfg, ctx)
        return dx, _add(acc, dp)

    full_grad = layer_backward_full(cfg, ctx)

    @ms.jit
    def layer_bwd_recompute(p, acc, x, cos, sin, positions, segment_ids, dy):
        dp, dx = full_grad(p, x, cos, sin, positions, segment_ids, dy)
        return dx, _add(acc, dp)

    def embed_dot(table, tokens, dx):
        return (embed(table, tokens, ctx) * dx).sum()

    embed_grad = ms.grad(embed_dot, grad_position=0)

    @ms.jit
    def embed_bwd(table, acc, tokens, dx):
        return acc + embed_grad(table, tokens, dx)

    if selective:
        return _Graphs(rope, embed_fwd, layer_fwd, head, layer_bwd, embed_bwd)
    return _Graphs(rope, embed_fwd, layer_fwd_only, head, layer_bwd_recompute, embed_bwd)


def zeros_like_f32(params):
    return tree_map(lambda p: ops.zeros(p.shape, ms.float32), params)


def layerwise_grads(params, acc, part, weight, cfg: ModelConfig, ctx: ParallelContext, recompute: str):
    """acc + d(weight * loss_sum)/d params for one micro-batch, and its loss_sum (this process's).

    part: (tokens, labels, positions, segment_ids, seq_len) Tensors, this process's share.
    acc: float32 gradient tree (the accumulation over micro-batches so far).
    """
    g = compiled_graphs(cfg, ctx, recompute)
    tokens, labels, positions, segment_ids, seq_len = part
    cos, sin = g.rope(positions, seq_len)
    x = g.embed_fwd(params["word_embeddings"], tokens)
    selective = recompute == "selective"
    inputs, saves = [], []
    for p in params["layers"]:
        inputs.append(x)
        if selective:
            x, saved = g.layer_fwd(ms.mutable(p), x, cos, sin, positions, segment_ids)
            saves.append(ms.mutable(saved))
        else:
            x = g.layer_fwd(ms.mutable(p), x, cos, sin, positions, segment_ids)
    top = {"ln_f": params["ln_f"], "lm_head": params["lm_head"]}
    acc_top = {"ln_f": acc["ln_f"], "lm_head": acc["lm_head"]}
    loss_sum, acc_top, dx = g.head(ms.mutable(top), ms.mutable(acc_top), x, labels, weight)
    layers = list(acc["layers"])
    for i in reversed(range(len(params["layers"]))):
        extra = (saves[i],) if selective else ()
        dx, layers[i] = g.layer_bwd(ms.mutable(params["layers"][i]), ms.mutable(layers[i]), inputs[i], *extra,
                                    cos, sin, positions, segment_ids, dx)
        inputs[i] = None                                    # free this layer's activations now
        if selective:
            saves[i] = None
    emb = g.embed_bwd(params["word_embeddings"], acc["word_embeddings"], tokens, dx)
    return {"word_embeddings": emb, "layers": tuple(layers), **acc_top}, loss_sum
