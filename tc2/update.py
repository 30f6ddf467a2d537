"""Applying a step's gradients: dp x cp sums, the global norm, clipping, loss scaling, the optimizer.

One compiled graph per PIECE of the model rather than one over the whole tree: each top-level
tensor (embedding, final norm, lm_head) is a piece, the big ones applied in row chunks, and
every decoder layer is a piece of the same shape, so the layer's graphs compile once and serve
every layer. An AdamW graph over the whole tree compiled in 15 s at 4 layers and 70 s at 32 on
this machine; per piece it does not grow with depth, and it holds one piece's temporaries at a
time (MindSpore's CPU graphs keep all of a graph's elementwise temporaries to its end).

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
from tc2.tree import leaves_like, sum_squares, tree_leaves, tree_map, tree_unflatten

TOP_KEYS = ("word_embeddings", "ln_f", "lm_head")
APPLY_CHUNK = 1 << 21          # elements per optimizer call on a big tensor (8 MB float32) ...
APPLY_PIECE = 1 << 23          # ... when its piece (a layer, a top-level tensor) is bigger than this


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


def params_shaped(x) -> bool:
    return isinstance(x, dict) and "layers" in x


def split_state(state, n_pieces: int, by_layer: bool) -> List:
    """The optimizer state as pieces: its params-shaped parts split like the params, anything
    else (a step count, a chain's empty state) shared by every piece."""
    if not by_layer:
        return [state]
    if params_shaped(state):
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
    if params_shaped(like):
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
    reduce: dict               # per piece kind: a top-level tensor's name, "layer" or "whole"
    decide: object
    apply: object              # the optimizer on a piece (ZeRO-1: on this rank's rows, gathered)
    apply_rows: object         # the optimizer on rows the host cut (no ZeRO inside)
    gather_rows: object        # ZeRO-1: the whole tensor from every rank's rows
    write: object              # the optimizer written in place into a piece's buffers (or None)


class Bodies(NamedTuple):
    """The graph code of an update, unjitted: compiled per piece by `compiled_update`, or
    inlined whole into one train-step graph (`finish`, tc2.step's unrolled step)."""
    reduce: object
    decide: object
    update: object
    finish: object
    reduce_decide: object      # `finish` without the update: (reduced grads, Decision fields)


def bodies(cfg: ModelConfig, optimizer: GradientTransformation, ls, clip_norm: Optional[float],
           ctx: ParallelContext) -> Bodies:
    update, current_lr = optimizer.update, optimizer.learning_rate     # graph mode: no attributes
    sharded = tp_sharded(cfg) if ctx.tp > 1 else None
    reduce_dpcp = ctx.dp * ctx.cp > 1 and not ctx.folded

    def reduce(grads, inv_scale, mask):
        """Sum over dp x cp, unscale, (squares of tp-split tensors, squares of the others)."""
        if reduce_dpcp:
            grads = tree_map(ctx.sum_dpcp, grads)
        grads = tree_map(lambda g: g * inv_scale, grads)
        if mask is None:
            return grads, sum_squares(grads, None, True), ms.Tensor(0.0, ms.float32)
        return grads, sum_squares(grads, mask, True), sum_squares(grads, mask, False)

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

    def apply(params, grads, opt_state, factor, ok, zero):
        grads = tree_map(lambda g: g * factor, grads)
        if zero:                                 # ZeRO-1: update this rank's rows, then gather them
            rows = zero_slice(params, ctx)
            updates, new_state = update(zero_slice(grads, ctx), opt_state, rows)
            new_params = tree_map(lambda n, p: _zero_whole(n, p.shape[0], ctx), apply_updates(rows, updates),
                                  params)
        else:
            updates, new_state = update(grads, opt_state, params)
            new_params = apply_updates(params, updates)
        return _keep_if(ok, (new_params, new_state), (params, opt_state))

    def reduce_decide(opt_state, scale_state, grads, loss_sum, inv_count):
        """The whole tree's reduction and decision -> (grads, Decision fields)."""
        inv_scale = inv_count * 0.0 + 1.0 if scale_state is None else 1.0 / scale_state["scale"]
        grads, a, b = reduce(grads, inv_scale, sharded)
        return grads, decide(a, b, loss_sum, inv_count, scale_state, opt_state)

    def finish(params, opt_state, scale_state, grads, loss_sum, inv_count):
        """The whole update in one graph (no ZeRO) -> (params, opt_state, Decision fields)."""
        grads, d = reduce_decide(opt_state, scale_state, grads, loss_sum, inv_count)
        params, opt_state = apply(params, grads, opt_state, d[0], d[1], False)
        return params, opt_state, d                                                 # host: Decision(*d)

    return Bodies(reduce, decide, apply, finish, reduce_decide)


@forget_after_failure
def compiled_update(cfg: ModelConfig, optimizer: GradientTransformation, ls, clip_norm: Optional[float],
                    ctx: ParallelContext, by_layer: bool) -> _Graphs:
    reduce_body, decide, update_body, _, _ = bodies(cfg, optimizer, ls, clip_norm, ctx)   # graph mode: no attributes
    masks = _masks(tp_sharded(cfg) if ctx.tp > 1 else None, by_layer)

    def make_reduce(mask):
        @ms.jit
        def reduce(grads, inv_scale):                          # flat out: tree.leaves_like
            grads, a, c = reduce_body(grads, inv_scale, mask)
            return tree_leaves(grads), a, c
        return reduce

    def make_apply(zero: bool):
        @ms.jit
        def apply(params, grads, opt_state, factor, ok):
            return leaves_like(update_body(params, grads, opt_state, factor, ok, zero), (params, opt_state))
        return apply

    @ms.jit
    def gather_rows(x, full_rows):
        return _zero_whole(x, full_rows, ctx)

    write = None
    if optimizer.inplace is not None:
        write_body = optimizer.inplace.write

        @ms.jit
        def write(params, grads, opt_state, factor):
            return write_body(grads, opt_state, params, factor)

    return _Graphs({kind: make_reduce(m) for kind, m in masks.items()}, ms.jit(decide),
                   make_apply(ctx.zero_size > 1), make_apply(False), gather_rows, write)


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


def donation_refused(optimizer: GradientTransformation, ctx: ParallelContext) -> Optional[str]:
    """Why a step may not write the update into its state's buffers (None when it may): it needs
    an optimizer with an in-place form, and no ZeRO-1 (whose rows are gathered into new tensors)."""
    if optimizer.inplace is None:
        return "the optimizer has no in-place form (GradientTransformation.inplace; adamw has one)"
    if ctx.zero_size > 1:
        return "ZeRO-1 gathers each rank's updated rows into new tensors"
    return None


def can_donate(optimizer: GradientTransformation, ctx: ParallelContext) -> bool:
    return donation_refused(optimizer, ctx) is None


def apply_gradients(params, opt_state, scale_state, grads, loss_sum, inv_count, cfg: ModelConfig,
                    optimizer: GradientTransformation, ls, clip_norm: Optional[float], ctx: ParallelContext,
                    donate: bool = False):
    """-> (params, opt_state, Decision): the update of one step, piece by piece (module doc).
    donate (see `can_donate`): params and the state's moments are `ms.Parameter`s the update
    overwrites; the same objects come back (the step count renewed)."""
    by_layer = bool(getattr(optimizer, "elementwise", False))
    if ctx.zero_size > 1 and not by_layer:
        raise ValueError("ZeRO-1 needs an optimizer that acts on each parameter on its own (elementwise)")
    g = compiled_update(cfg, optimizer, ls, clip_norm, ctx, by_layer)
    inv_scale = inv_count * 0.0 + 1.0 if scale_state is None else 1.0 / scale_state["scale"]
    grad_pieces, sq_split, sq_rest = [], ms.Tensor(0.0, ms.float32), ms.Tensor(0.0, ms.float32)
    for piece in split(grads, by_layer):
        leaves, a, b = g.reduce[_kind(piece, by_layer)](ms.mutable(piece), inv_scale)
        grad_pieces.append(tree_unflatten(piece, leaves))
        sq_split, sq_rest = sq_split + a, sq_rest + b
    p_pieces, s_pieces = split(params, by_layer), split_state(opt_state, len(grad_pieces), by_layer)
    factor, ok, loss, gnorm, lr, scale_state = g.decide(sq_split, sq_rest, loss_sum, inv_count,
                                                        None if scale_state is None else ms.mutable(scale_state),
                                                        ms.mutable(s_pieces[0]))
    if donate:
        if bool(ok.asnumpy()):                                  # a skipped step writes nothing
            count = None
            for p, gr, s in zip(p_pieces, grad_pieces, s_pieces):
                count = g.write(ms.mutable(p), ms.mutable(gr), ms.mutable(s), factor)
            opt_state = optimizer.inplace.advance(opt_state, count)
        return params, opt_state, Decision(factor, ok, loss, gnorm, lr, scale_state)
    new_p, new_s = [], []
    for p, gr, s in zip(p_pieces, grad_pieces, s_pieces):
        if by_layer and _size(p) > APPLY_PIECE:
            p2, s2 = _apply_small(g, p, gr, s, factor, ok, ctx)
        else:
            p2, s2 = tree_unflatten((p, s), g.apply(ms.mutable(p), ms.mutable(gr), ms.mutable(s), factor, ok))
        new_p.append(p2)
        new_s.append(s2)
    return (join(params, new_p, by_layer), join_state(opt_state, new_s, by_layer),
            Decision(factor, ok, loss, gnorm, lr, scale_state))


def _size(tree) -> int:
    return sum(int(x.size) for x in tree_leaves(tree))


def _paths(tree, prefix=()):
    """The paths (dict keys / tuple indices) to the leaves of a params-shaped tree."""
    if isinstance(tree, dict):
        return [q for k in tree for q in _paths(tree[k], prefix + (k,))]
    if isinstance(tree, tuple):
        return [q for i in range(len(tree)) for q in _paths(tree[i], prefix + (i,))]
    return [prefix]


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _only(tree, path):
    """`tree` with only the leaf at `path` (same nesting, so names and masks see the same name)."""
    if not path:
        return tree
    k, rest = path[0], path[1:]
    if isinstance(tree, tuple):
        return tuple(_only(tree[i], rest) if i == k else () for i in range(len(tree)))
    return {k: _only(tree[k], rest)}


def _put(tree, path, leaf):
    """A copy of `tree` with the leaf at `path` replaced."""
    if not path:
        return leaf
    k, rest = path[0], path[1:]
    if isinstance(tree, tuple):
        return tuple(_put(tree[i], rest, leaf) if i == k else tree[i] for i in range(len(tree)))
    return {**tree, k: _put(tree[k], rest, leaf)}


def _state_map(fn, like, state, *rest):
    """fn(part, *matching parts of `rest`) on each params-shaped part of an optimizer-state piece
    (structured like the params piece `like`); a shared part (the step count) is taken from the
    first of `rest` (the chunks' states, each with the same count), or kept."""
    if isinstance(state, dict) and set(state) == set(like):
        return fn(state, *rest)
    if isinstance(state, dict):
        return {k: _state_map(fn, like, state[k], *[r[k] for r in rest]) for k in state}
    if isinstance(state, tuple):
        return tuple(_state_map(fn, like, state[i], *[r[i] for r in rest]) for i in range(len(state)))
    return rest[0] if rest else state


def chunk_bounds(rows: int, cols: int) -> List[tuple]:
    """Row ranges [(a, b)] of about APPLY_CHUNK elements each, equal where the rows divide (one
    compiled shape), else equal but the last."""
    k = -(-rows * cols // APPLY_CHUNK)
    for n in range(k, min(rows, 4 * k) + 1):
        if rows % n == 0:
            k = n
            break
    step = -(-rows // k)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _apply_small(g, p, gr, s, factor, ok, ctx: ParallelContext):
    """The optimizer on a piece in calls of about APPLY_CHUNK elements: tensor by tensor, a big
    tensor in row chunks.

    MindSpore 2.10's CPU graphs keep every elementwise temporary of AdamW alive to the end of
    the graph (~20 per tensor): one call on the [32000, 512] embedding peaked 3 GB above the
    rest of the step (measured), a TeleChat2-7B layer would need ~20 GB. The update is
    elementwise, so the result is the same. Under ZeRO-1 the chunks are of this rank's rows
    (those its optimizer state holds), then every rank's rows are gathered."""
    new_p, new_s = p, s
    for path in _paths(p):
        x = _get(p, path)
        full_rows = x.shape[0] if x.ndim else 1
        zero = x.ndim >= 1 and zero_rows(x.shape, ctx)
        lp, lg = _only(p, path), _only(gr, path)
        ls = _state_map(lambda part: _only(part, path), p, s)
        if zero:                         # copies: a view into a bigger tensor is refused as graph input
            lp, lg = (tree_map(lambda x: x.copy(), zero_slice(tree, ctx)) for tree in (lp, lg))
        if x.size <= APPLY_CHUNK or x.ndim == 0:
            bounds = [None]
        else:
            bounds = chunk_bounds(_get(lp, path).shape[0], x.size // full_rows)
        outs = []
        for ab in bounds:
            cp, cg, cs = _rows(lp, path, ab), _rows(lg, path, ab), _state_map(lambda part: _rows(part, path, ab), lp, ls)
            outs.append(tree_unflatten((cp, cs), g.apply_rows(ms.mutable(cp), ms.mutable(cg), ms.mutable(cs), factor, ok)))
        leaf = _glue([_get(o[0], path) for o in outs])
        if zero:
            leaf = g.gather_rows(leaf, full_rows)
        new_p = _put(new_p, path, leaf)
        new_s = _state_map(lambda part, *chunks: _put(part, path, _glue([_get(c, path) for c in chunks])),
                           p, new_s, *[o[1] for o in outs])
    return new_p, new_s


def _rows(tree, path, ab):
    """`tree` with rows [a, b) of its leaf at `path` (a copy: MindSpore 2.10 refuses a view
    into a bigger tensor as a graph input, "Invalid host tensor size ... for pyexecute")."""
    if ab is None:
        return tree
    return _put(tree, path, _get(tree, path)[ab[0]:ab[1]].copy())


def _glue(parts):
    return parts[0] if len(parts) == 1 else ops.concat(parts)


def _kind(piece, by_layer: bool) -> str:
    if not by_layer:
        return "whole"
    return "layer" if "layers" in piece else next(iter(piece))
