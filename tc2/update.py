"""Applying a step's gradients: dp x cp sums, the global norm, clipping, loss scaling, the optimizer.

One compiled graph per PIECE of the model rather than one over the whole tree: the top-level
tensors (embedding, final norm, lm_head) are one piece and every decoder layer is a piece of
the same shape, so the layer's graphs compile once and serve every layer. An AdamW graph over
the whole tree compiled in 15 s at 4 layers and 70 s at 32 on this machine; per piece it does
not grow with depth, and it holds one layer's temporaries at a time.

    reduce (each piece)  : sum over dp x cp, unscale, partial sums of squares (tp shards apart)
    decide (scalars)     : global norm (each tp shard counted once), clip factor, finiteness,
                           learning rate, the next loss scale
    apply (each piece)   : the optimizer update, kept only if the step is finite

This needs an optimizer that acts on each parameter on its own (`elementwise=True`, as AdamW
and schedules do). Any other (e.g. one that clips by a norm inside) is applied to the whole tree
in one graph, correctly but with the compile cost of the whole tree.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import mindspore as ms
from mindspore import ops

from tc2.compiled import forget_after_failure
from tc2.config import ModelConfig
from tc2.context import ParallelContext
from tc2.model import tp_sharded
from tc2.optim import GradientTransformation, apply_updates
from tc2.nn.ring import slot_all_reduce
from tc2.tree import sum_squares, tree_map

TOP_KEYS = ("word_embeddings", "ln_f", "lm_head")


class Decision(NamedTuple):
    factor: ms.Tensor          # multiplies every gradient (the clip)
    ok: ms.Tensor              # bool: finite loss and gradients -> apply
    loss: ms.Tensor
    grad_norm: ms.Tensor
    lr: ms.Tensor
    loss_scale: Optional[dict]


# --------------------------------------------------------------------------- pieces


def split(tree, by_layer: bool) -> List:
    """A params-shaped tree as pieces: one per top-level tensor this process has (the embedding,
    the final norm, lm_head: each alone, so the optimizer's temporaries are one tensor's), then
    {"layers": (layer i,)} per layer; or [tree]."""
    if not by_layer:
        return [tree]
    return [{k: tree[k]} for k in TOP_KEYS if k in tree] + [{"layers": (layer,)} for layer in tree["layers"]]


def join(like, pieces: List, by_layer: bool):
    """Inverse of `split`, into the structure (and key order) of `like`."""
    if not by_layer:
        return pieces[0]
    top = {k: p[k] for p in pieces if "layers" not in p for k in p}
    layers = tuple(p["layers"][0] for p in pieces if "layers" in p)
    return {k: layers if k == "layers" else top[k] for k in like}


def _params_shaped(x) -> bool:
    return isinstance(x, dict) and "layers" in x


def split_state(state, n_pieces: int, by_layer: bool) -> List:
    """The optimizer state as pieces: its params-shaped parts split like the params, anything
    else (a step count, a chain's empty state) shared by every piece."""
    if not by_layer:
        return [state]
    if _params_shaped(state):
        return split(state, True)
    if isinstance(state, dict):
        parts = {k: split_state(state[k], n_pieces, True) for k in state}
        return [{k: parts[k][i] for k in state} for i in range(n_pieces)]
    if isinstance(state, tuple):
        parts = [split_state(s, n_pieces, True) for s in state]
        return [tuple(p[i] for p in parts) for i in range(n_pieces)]
    return [state] * n_pieces


def join_state(like, pieces: List, by_layer: bool):
    """Inverse of `split_state` (shared parts taken from the first piece)."""
    if not by_layer:
        return pieces[0]
    if _params_shaped(like):
        return join(like, pieces, True)
    if isinstance(like, dict):
        return {k: join_state(like[k], [p[k] for p in pieces], True) for k in like}
    if isinstance(like, tuple):
        return tuple(join_state(like[i], [p[i] for p in pieces], True) for i in range(len(like)))
    return pieces[0]


# --------------------------------------------------------------------------- ZeRO-1


def zero_rows(shape, ctx: ParallelContext) -> bool:
    """Whether a tensor of `shape` is split over the ZeRO group (by rows, when they divide)."""
    return ctx.zero_size > 1 and len(shape) >= 1 and shape[0] % ctx.zero_size == 0


def zero_slice(tree, ctx: ParallelContext):
    """This rank's rows of every tensor ZeRO splits (host or graph); others as they are."""
    if ctx.zero_size == 1:
        return tree

    def cut(x):
        if not zero_rows(x.shape, ctx):
            return x
        n = x.shape[0] // ctx.zero_size
        return x[ctx.zero_rank * n:(ctx.zero_rank + 1) * n]
    return tree_map(cut, tree)


def _zero_whole(x, full_rows: int, ctx: ParallelContext):
    """The whole tensor from every rank's rows (a slot all-reduce over the dp x cp group)."""
    if full_rows == x.shape[0]:
        return x
    buf = slot_all_reduce(x, ctx.zero_size, ctx.zero_rank, ctx.sum_dpcp)                # [Z, n/Z, ...]
    return buf.reshape((full_rows,) + x.shape[1:])


# --------------------------------------------------------------------------- graphs


class _Graphs(NamedTuple):
    reduce: dict               # per piece kind: "top", "layer" or "whole"
    decide: object
    apply: object


@forget_after_failure
def compiled_update(cfg: ModelConfig, optimizer: GradientTransformation, ls, clip_norm: Optional[float],
                    ctx: ParallelContext, by_layer: bool) -> _Graphs:
    update, current_lr = optimizer.update, optimizer.learning_rate     # graph mode: no attributes
    sharded = tp_sharded(cfg) if ctx.tp > 1 else None
    reduce_dpcp = ctx.dp * ctx.cp > 1 and not ctx.folded
    masks = _masks(sharded, by_layer)

    def make_reduce(mask):
        @ms.jit
        def reduce(grads, inv_scale):
            if reduce_dpcp:
                grads = tree_map(ctx.sum_dpcp, grads)
            grads = tree_map(lambda g: g * inv_scale, grads)
            if mask is None:
                return grads, sum_squares(grads, None, True), ms.Tensor(0.0, ms.float32)
            return grads, sum_squares(grads, mask, True), sum_squares(grads, mask, False)
        return reduce

    @ms.jit
    def decide(sq_split, sq_rest, loss_sum, inv_count, scale_state, opt_state):
        if sharded is not None:
            sq_split = ctx.sum_tp(sq_split.reshape(1))[0]                # tp shards, each counted once
        sq, loss_sum = sq_split + sq_rest, loss_sum.reshape(1)
        if ctx.pp > 1:                                                  # stages hold disjoint layers
            sq, loss_sum = ctx.sum_pp(sq.reshape(1))[0], ctx.sum_pp(loss_sum)
        if reduce_dpcp:
            loss_sum = ctx.sum_dpcp(loss_sum)
        gnorm = ops.sqrt(sq)                                            # unscaled, before clipping
        loss = loss_sum[0] * inv_count
        ok = ops.logical_and(ops.isfinite(gnorm), ops.isfinite(loss))
        factor = inv_count * 0.0 + 1.0
        if clip_norm is not None:
            factor = clip_norm / ops.maximum(gnorm, clip_norm)          # 1 when gnorm <= clip
        lr = inv_count * 0.0 if current_lr is None else current_lr(opt_state)
        if scale_state is not None:
            scale, good = scale_state["scale"], scale_state["good_steps"] + 1
            grow = good >= ls.growth_interval
            grown = ops.where(grow, scale * ls.factor, scale)
            shrunk = ops.maximum(scale / ls.factor, ls.min_scale)
            scale_state = {"scale": ops.where(ok, grown, shrunk),
                           "good_steps": ops.where(ok, ops.where(grow, 0, good), 0).astype(ms.int32)}
        return factor, ok, loss, gnorm, lr, scale_state

    @ms.jit
    def apply(params, grads, opt_state, factor, ok):
        grads = tree_map(lambda g: g * factor, grads)
        if ctx.zero_size > 1:                    # ZeRO-1: update this rank's rows, then gather them
            rows = zero_slice(params, ctx)
            updates, new_state = update(zero_slice(grads, ctx), opt_state, rows)
            new_params = tree_map(lambda n, p: _zero_whole(n, p.shape[0], ctx), apply_updates(rows, updates),
                                  params)
        else:
            updates, new_state = update(grads, opt_state, params)
            new_params = apply_updates(params, updates)
        return _keep_if(ok, (new_params, new_state), (params, opt_state))

    return _Graphs({kind: make_reduce(m) for kind, m in masks.items()}, decide, apply)


def _masks(sharded, by_layer: bool) -> dict:
    """{piece kind: tp mask}: each top-level tensor's name, "layer", or "whole"."""
    if not by_layer:
        return {"whole": sharded}
    if sharded is None:
        return {k: None for k in TOP_KEYS + ("layer",)}
    return {**{k: {k: sharded[k]} for k in TOP_KEYS}, "layer": {"layers": (sharded["layers"][0],)}}


def _keep_if(ok, new, old):
    """`new` if the scalar bool `ok` else `old` (whole pytrees), as graph control flow.

    Not a leaf-wise `ops.where(ok, new, old)`: on MindSpore 2.10 CPU the output of a
    broadcasting elementwise op is never reused within a graph, so a where per leaf holds
    several extra copies of the parameters and the optimizer state.
    """
    if ok:
        out = new
    else:
        out = old
    return out


# --------------------------------------------------------------------------- the driver


def apply_gradients(params, opt_state, scale_state, grads, loss_sum, inv_count, cfg: ModelConfig,
                    optimizer: GradientTransformation, ls, clip_norm: Optional[float], ctx: ParallelContext):
    """-> (params, opt_state, Decision): the update of one step, piece by piece (module doc)."""
    by_layer = bool(getattr(optimizer, "elementwise", False))
    if ctx.zero_size > 1 and not by_layer:
        raise ValueError("ZeRO-1 needs an optimizer that acts on each parameter on its own (elementwise)")
    g = compiled_update(cfg, optimizer, ls, clip_norm, ctx, by_layer)
    inv_scale = inv_count * 0.0 + 1.0 if scale_state is None else 1.0 / scale_state["scale"]
    grad_pieces, sq_split, sq_rest = [], ms.Tensor(0.0, ms.float32), ms.Tensor(0.0, ms.float32)
    for piece in split(grads, by_layer):
        reduced, a, b = g.reduce[_kind(piece, by_layer)](ms.mutable(piece), inv_scale)
        grad_pieces.append(reduced)
        sq_split, sq_rest = sq_split + a, sq_rest + b
    p_pieces, s_pieces = split(params, by_layer), split_state(opt_state, len(grad_pieces), by_layer)
    factor, ok, loss, gnorm, lr, scale_state = g.decide(sq_split, sq_rest, loss_sum, inv_count,
                                                        None if scale_state is None else ms.mutable(scale_state),
                                                        ms.mutable(s_pieces[0]))
    new_p, new_s = [], []
    for p, gr, s in zip(p_pieces, grad_pieces, s_pieces):
        p2, s2 = g.apply(ms.mutable(p), ms.mutable(gr), ms.mutable(s), factor, ok)
        new_p.append(p2)
        new_s.append(s2)
    return (join(params, new_p, by_layer), join_state(opt_state, new_s, by_layer),
            Decision(factor, ok, loss, gnorm, lr, scale_state))


def _kind(piece, by_layer: bool) -> str:
    if not by_layer:
        return "whole"
    return "layer" if "layers" in piece else next(iter(piece))
