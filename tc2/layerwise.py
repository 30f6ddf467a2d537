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
from tc2.config import IGNORE_INDEX, ModelConfig
from tc2.context import ParallelContext
from tc2.layer import decoder_layer, layer_backward_full, layer_backward_selective
from tc2.model import cross_entropy_sum, embed, head as head_logits, head_loss_sum
from tc2.nn import rope_cos_sin
from tc2.tree import tree_leaves, tree_map, tree_unflatten


class _Graphs(NamedTuple):
    rope: object
    embed_fwd: object
    layer_fwd: object
    head: object
    layer_bwd: object
    embed_bwd: object
    layer_only: object             # forward without saves (evaluation)
    loss_sums: object              # the head's (loss sum, loss tokens), summed over dp x cp
    sum_stages: object             # a small tensor summed over the pipeline stages


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
        return loss_sum, tree_leaves(_add(acc, dtop)), dx             # flat: tc2.tree.leaves_like

    selective_bwd = layer_backward_selective(cfg, ctx)

    @ms.jit
    def layer_bwd(p, acc, x, saved, cos, sin, positions, segment_ids, dy):
        dx, dp = selective_bwd(p, x, saved, cos, sin, positions, segment_ids, dy)
        return dx, tree_leaves(_add(acc, dp))

    full_grad = layer_backward_full(cfg, ctx)

    @ms.jit
    def layer_bwd_recompute(p, acc, x, cos, sin, positions, segment_ids, dy):
        dp, dx = full_grad(p, x, cos, sin, positions, segment_ids, dy)
        return dx, tree_leaves(_add(acc, dp))

    def embed_dot(table, tokens, dx):
        return (embed(table, tokens, ctx) * dx).sum()

    embed_grad = ms.grad(embed_dot, grad_position=0)

    @ms.jit
    def embed_bwd(table, acc, tokens, dx):
        return acc + embed_grad(table, tokens, dx)

    @ms.jit
    def loss_sums(top, x, labels):
        s, n = cross_entropy_sum(head_logits(top, x, cfg, ctx), labels, ctx)
        if ctx.dp * ctx.cp > 1 and not ctx.folded:
            s, n = ctx.sum_dpcp(s.reshape(1))[0], ctx.sum_dpcp(n.reshape(1))[0]
        return s, n

    @ms.jit
    def sum_stages(x):
        return ctx.sum_pp(x)

    if selective:
        return _Graphs(rope, embed_fwd, layer_fwd, head, layer_bwd, embed_bwd, layer_fwd_only, loss_sums, sum_stages)
    return _Graphs(rope, embed_fwd, layer_fwd_only, head, layer_bwd_recompute, embed_bwd, layer_fwd_only, loss_sums,
                   sum_stages)


def zeros_like_f32(params):
    return tree_map(lambda p: ops.zeros(p.shape, ms.float32), params)


class _Stash(NamedTuple):
    """One micro-batch between its forward and its backward on this stage."""
    part: tuple
    cos: ms.Tensor
    sin: ms.Tensor
    inputs: list                   # each layer's input
    saves: list                    # each layer's saved matmul outputs (selective)
    dx: object                     # the loss gradient w.r.t. the stage's output (last stage)


HEAD_CHUNK_LOGITS = 1 << 23        # logits per head call (32 MB in float32)


def head_chunk_rows(n_rows: int, vocab_local: int) -> int:
    """Token rows per call of the head graph: [rows, V] logits stay near HEAD_CHUNK_LOGITS. The
    head is where a step's memory peaks: one [B*T, V] call kept ~2 GB of logits, softmax and
    their gradients alive for shape S ([4, 256], V 32000) and was the slowest graph of the step."""
    rows = max(64, HEAD_CHUNK_LOGITS // vocab_local)
    rows = 1 << (rows.bit_length() - 1)                                         # a power of two
    return min(rows, n_rows)


def _chunks(x, labels, rows: int):
    """[B, T, H], [B, T] -> [(x rows [C, H], labels [C])], the last padded with label -100."""
    B, T, H = x.shape
    n = B * T
    x2, l2 = x.reshape(n, H), labels.reshape(n)
    out = []
    for start in range(0, n, rows):
        xc, lc = x2[start:start + rows], l2[start:start + rows]
        if xc.shape[0] < rows:
            pad = rows - xc.shape[0]
            xc = ops.concat((xc, ops.zeros((pad, H), xc.dtype)))
            lc = ops.concat((lc, ops.full((pad,), IGNORE_INDEX, dtype=lc.dtype)))
        out.append((xc, lc))
    return out


def _head_backward(g, top, acc_top, x, labels, weight, cfg, ctx):
    """(loss_sum, acc_top + d top, dx [B, T, H]): the head over row chunks (HEAD_CHUNK_LOGITS)."""
    B, T, H = x.shape
    rows = head_chunk_rows(B * T, cfg.vocab_size // ctx.tp)
    loss_sum, dxs = ms.Tensor(0.0, ms.float32), []
    for xc, lc in _chunks(x, labels, rows):
        s, leaves, dx = g.head(ms.mutable(top), ms.mutable(acc_top), xc, lc, weight)
        acc_top = tree_unflatten(acc_top, leaves)
        loss_sum, dxs = loss_sum + s, dxs + [dx]
    dx = dxs[0] if len(dxs) == 1 else ops.concat(dxs)
    return loss_sum, acc_top, dx[:B * T].reshape(B, T, H)


def _head_sums(g, top, x, labels, cfg, ctx):
    """(loss sum, loss tokens) of the head over row chunks, summed over dp x cp."""
    B, T, _ = x.shape
    rows = head_chunk_rows(B * T, cfg.vocab_size // ctx.tp)
    total, count = ms.Tensor(0.0, ms.float32), ms.Tensor(0.0, ms.float32)
    for xc, lc in _chunks(x, labels, rows):
        s, n = g.loss_sums(ms.mutable(top), xc, lc)
        total, count = total + s, count + n
    return total, count


def _act_shape(part, cfg: ModelConfig):
    tokens = part[0]
    return tokens.shape + (cfg.hidden_size,)                                   # [B, T, H]


def _forward(g, params, acc_top, part, weight, cfg, ctx, selective):
    """This stage's forward of one micro-batch -> (stash, loss_sum, acc_top); sends the output on."""
    tokens, labels, positions, segment_ids, seq_len = part
    cos, sin = g.rope(positions, seq_len)
    if ctx.first_stage:
        x = g.embed_fwd(params["word_embeddings"], tokens)
    else:                                                           # from the previous stage
        x = ctx.pp_pass(ctx.pp_rank - 1, ops.zeros(_act_shape(part, cfg), ms.float32))
    inputs, saves = [], []
    for p in params["layers"]:
        inputs.append(x)
        if selective:
            x, saved = g.layer_fwd(ms.mutable(p), x, cos, sin, positions, segment_ids)
            saves.append(ms.mutable(saved))
        else:
            x = g.layer_fwd(ms.mutable(p), x, cos, sin, positions, segment_ids)
    loss_sum, dx = ms.Tensor(0.0, ms.float32), None
    if ctx.last_stage:
        top = {"ln_f": params["ln_f"], "lm_head": params["lm_head"]}
        loss_sum, acc_top, dx = _head_backward(g, top, acc_top, x, labels, weight, cfg, ctx)
    else:                                                           # to the next stage
        ctx.pp_pass(ctx.pp_rank, x)
    return _Stash(part, cos, sin, inputs, saves, dx), loss_sum, acc_top


def _backward(g, params, acc_layers, acc_emb, st: _Stash, cfg, ctx, selective):
    """This stage's backward of one micro-batch (its output gradient from the next stage)."""
    tokens, _, positions, segment_ids, _ = st.part
    dx = st.dx
    if not ctx.last_stage:
        dx = ctx.pp_pass(ctx.pp_rank, ops.zeros(_act_shape(st.part, cfg), ms.float32))
    for i in reversed(range(len(params["layers"]))):
        extra = (st.saves[i],) if selective else ()
        dx, leaves = g.layer_bwd(ms.mutable(params["layers"][i]), ms.mutable(acc_layers[i]), st.inputs[i],
                                 *extra, st.cos, st.sin, positions, segment_ids, dx)
        acc_layers[i] = tree_unflatten(acc_layers[i], leaves)
        st.inputs[i] = None                                 # free this layer's activations now
        if selective:
            st.saves[i] = None
    if ctx.first_stage:
        return g.embed_bwd(params["word_embeddings"], acc_emb, tokens, dx)
    ctx.pp_pass(ctx.pp_rank - 1, dx)                        # to the previous stage
    return acc_emb


def layerwise_grads(params, parts, weight, cfg: ModelConfig, ctx: ParallelContext, recompute: str):
    """(d(weight * loss_sum)/d params summed over the micro-batches `parts`, float32; this
    process's loss_sum). Each part: (tokens, labels, positions, segment_ids, seq_len) Tensors.

    One stage (pp = 1): forward and backward per micro-batch, so one micro-batch's activations
    live at a time. Pipeline stages (pp > 1): GPipe, every micro-batch forward (each stage
    passing its output to the next), then every micro-batch backward in reverse (each passing
    its input gradient back); the first stage owns the embedding, the last the head and loss.
    """
    g = compiled_graphs(cfg, ctx, recompute)
    selective = recompute == "selective"
    acc = zeros_like_f32(params)
    acc_top = {k: acc[k] for k in ("ln_f", "lm_head") if k in acc}
    acc_layers, acc_emb = list(acc["layers"]), acc.get("word_embeddings")
    loss_sum = ms.Tensor(0.0, ms.float32)
    schedule = [[p] for p in parts] if ctx.pp == 1 else [list(parts)]
    for group in schedule:
        stash = []
        for part in group:
            st, s, acc_top = _forward(g, params, acc_top, part, weight, cfg, ctx, selective)
            stash.append(st)
            loss_sum = loss_sum + s
        for st in reversed(stash):
            acc_emb = _backward(g, params, acc_layers, acc_emb, st, cfg, ctx, selective)
    out = {} if acc_emb is None else {"word_embeddings": acc_emb}
    out["layers"] = tuple(acc_layers)
    out.update(acc_top)
    return out, loss_sum


def layerwise_loss_sums(params, part, cfg: ModelConfig, ctx: ParallelContext):
    """(sum of token losses, loss tokens) of one micro-batch over every process, layer by layer
    (the forward only: what evaluation needs; pipeline stages pass it on as in training)."""
    g = compiled_graphs(cfg, ctx, "full")
    tokens, labels, positions, segment_ids, seq_len = part
    cos, sin = g.rope(positions, seq_len)
    if ctx.first_stage:
        x = g.embed_fwd(params["word_embeddings"], tokens)
    else:
        x = ctx.pp_pass(ctx.pp_rank - 1, ops.zeros(_act_shape(part, cfg), ms.float32))
    for p in params["layers"]:
        x = g.layer_only(ms.mutable(p), x, cos, sin, positions, segment_ids)
    if ctx.pp == 1:
        return _head_sums(g, {"ln_f": params["ln_f"], "lm_head": params["lm_head"]}, x, labels, cfg, ctx)
    sums = ops.zeros((2,), ms.float32)
    if ctx.last_stage:
        s, n = _head_sums(g, {"ln_f": params["ln_f"], "lm_head": params["lm_head"]}, x, labels, cfg, ctx)
        sums = ops.stack((s, n))
    else:
        ctx.pp_pass(ctx.pp_rank, x)
    total = g.sum_stages(sums)                                      # every stage gets the last one's
    return total[0], total[1]
