"""The train step: TrainState in, TrainState and metrics out, compiled once per configuration.

    state = init_train_state(params, optimizer, loss_scale=...)
    state, metrics = train_step(state, batch, cfg, optimizer, clip_norm=1.0, ctx=ctx)

One step for one process and for N: `ctx` (`tc2.context`, default one process) says which
share of the global batch and of the model this process holds. Every process is given the
same GLOBAL batch (token ids are cheap) and cuts out its rows (dp) and sequence share (cp);
params and optimizer state are its tp shards. Gradients are summed over dp x cp, the global
norm counts each tp shard once, and so the update equals the single-process step on the
whole batch (tests/dist check it to 1e-5).

A batch is a dict of int arrays: "tokens" and "labels" (already shifted, -100 = no loss), and
optionally "positions" and "segment_ids" (document masking), each [B, T] or [k, B, T] for k
micro-batches. The loss is sum(token losses over all micro-batches) / (loss tokens over all
micro-batches): the token count is taken on the host first, so every micro-batch's gradient is
already divided by the global count and accumulating them is a plain sum (not a mean of means).

Compilation (MINDSPORE_NOTES §1, §9), two ways (`recompute`, see `resolve_recompute`):
* unrolled ("none"; "auto" for a small model): with k = 1 the whole step (value_and_grad over
  the parameter dict, clipping, AdamW, loss scaling) is one graph; with k > 1 a gradient graph
  runs k times (accumulating into a float32 gradient tree) and an update graph finishes the
  step: separate calls hold one micro-batch's activations at a time (the point of
  accumulating), and a graph-mode `for` carrying the gradient dict silently returned None in
  MindSpore 2.10;
* layer by layer ("selective" / "full"; "auto" for anything bigger, always with pipeline stages
  or ZeRO-1): the gradients from one compiled layer driven over the layers (`tc2.layerwise`),
  the update piece by piece (`tc2.update`), so compile time does not grow with depth.
Graphs are cached per (config, optimizer, loss-scale options, clip, context); state trees are
wrapped in `ms.mutable`, so new tensors every step never recompile.

Donation (`donate=True`, what `fit` runs): the optimizer's in-place form writes the new
weights and moments into the state's buffers (`ms.Parameter`s, see `donatable`) after the
decision graph said the step is finite; the unrolled step is then a gradient+decision graph
and a write graph. On CPU this is the difference between holding old and new weights and
moments plus ~20 AdamW temporaries per tensor to the end of a graph, and holding none (S:
update 1.15 GB -> under 0.05 GB of peak; M unrolled 16.2 -> 10.7 GB; faster too).

Mixed precision: parameters, gradients and optimizer state are float32; forward/backward run
in cfg.dtype. For float16 a dynamic loss scale multiplies the loss; a step whose gradients are
not finite is skipped (parameters and optimizer state unchanged, the optimizer count and hence
the lr schedule do not advance, but `state.step` — batches consumed — does), the scale halves,
and it doubles after `growth_interval` finite steps in a row. Without a loss scale a
non-finite step is also left out of the state; the caller (`fit`) turns it into an error.
The finiteness test reads the reduced gradients, so every process takes the same decision.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import mindspore as ms
import numpy as np
from einops import rearrange
from mindspore import ops

from tc2.compiled import forget_after_failure
from tc2.config import IGNORE_INDEX, ModelConfig
from tc2.context import LOCAL, ParallelContext
from tc2.layer import RECOMPUTE
from tc2.layerwise import layerwise_grads, layerwise_loss_sums, zeros_like_f32
from tc2.model import count_params, loss_sums
from tc2.optim import GradientTransformation
from tc2.tree import tree_map, tree_names
from tc2.update import Decision, apply_gradients, bodies, donation_refused, params_shaped, zero_slice

BATCH_KEYS = ("tokens", "labels", "positions", "segment_ids")
LOCAL_KEYS = BATCH_KEYS + ("seq_len",)         # what `ParallelContext.local_batch` adds
UNROLLED_MAX_LAYERS = 8                         # "auto": one unrolled graph up to this depth ...
UNROLLED_MAX_PARAMS = 64 * 2 ** 20              # ... and this many parameters per process


def resolve_recompute(recompute: str, cfg: ModelConfig, ctx: ParallelContext = LOCAL) -> str:
    """The mode a step runs: "auto" (the default) is "none" (the whole model as one unrolled
    graph) for a shallow, small model without pipeline stages or ZeRO, else "selective" (layer by
    layer). Measured (`benchmark.py train` / `compile`): the unrolled step is 1.2-1.4x faster at
    4-8 layers and ~20-60M parameters, and compiles about as fast up to 8 layers; beyond, its
    compile time grows faster than depth, and its memory (every AdamW temporary of the whole
    tree lives at once on MindSpore's CPU graphs) grows to 2-3x the layer-by-layer step's."""
    if recompute != "auto":
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be 'auto' or one of {RECOMPUTE}, got {recompute!r}")
        return recompute
    return "none" if unrolled_suits(cfg, ctx) and ctx.pp == 1 and ctx.zero_size == 1 else "selective"


def unrolled_suits(cfg: ModelConfig, ctx: ParallelContext = LOCAL) -> bool:
    """A model shallow and small enough that one unrolled graph (train step, decode step) is the
    faster choice and still compiles about as fast as one layer (see `resolve_recompute`)."""
    return cfg.n_layer <= UNROLLED_MAX_LAYERS and count_params(cfg) // ctx.tp <= UNROLLED_MAX_PARAMS


@dataclass(frozen=True)
class LossScaleConfig:
    """Dynamic loss scaling for float16 compute (bfloat16 and float32 need none)."""
    init_scale: float = 2.0 ** 15
    growth_interval: int = 2000        # finite steps in a row before the scale doubles
    factor: float = 2.0
    min_scale: float = 1.0

    def __post_init__(self):
        if self.init_scale <= 0 or self.factor <= 1 or self.growth_interval < 1 or self.min_scale <= 0:
            raise ValueError(f"bad LossScaleConfig {self}")


@dataclass(frozen=True)
class TrainState:
    """Everything a step changes. params and opt_state are float32 pytrees of ms.Tensor; step
    (int32 Tensor) counts batches consumed; loss_scale is {"scale": f32, "good_steps": int32}
    or None."""
    params: Any
    opt_state: Any
    step: Any
    loss_scale: Optional[dict] = None

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)


def default_loss_scale(cfg: ModelConfig) -> Optional[LossScaleConfig]:
    """Dynamic loss scaling exactly when computing in float16."""
    return LossScaleConfig() if cfg.dtype == "float16" else None


def init_loss_scale(loss_scale: Optional[LossScaleConfig]) -> Optional[dict]:
    """The loss-scale part of a TrainState: {"scale", "good_steps"} Tensors, or None."""
    if loss_scale is None:
        return None
    return {"scale": ms.Tensor(loss_scale.init_scale, ms.float32), "good_steps": ms.Tensor(0, ms.int32)}


def init_train_state(params, optimizer: GradientTransformation, loss_scale: Optional[LossScaleConfig] = None,
                     step: int = 0, *, ctx: ParallelContext = LOCAL) -> TrainState:
    """Step 0 (or `step`): fresh optimizer state for float32 `params` (this process's; under
    ZeRO-1 the state of its rows only: `tc2.update.zero_slice`)."""
    return TrainState(params=params, opt_state=optimizer.init(zero_slice(params, ctx)),
                      step=ms.Tensor(step, ms.int32), loss_scale=init_loss_scale(loss_scale))


# --------------------------------------------------------------------------- batches


def as_micro_batches(batch: dict) -> dict:
    """The batch as int32 numpy arrays [k, B, T] (a [B, T] batch becomes k = 1)."""
    if "tokens" not in batch or "labels" not in batch:
        raise KeyError(f"a batch needs 'tokens' and 'labels', got keys {sorted(batch)}")
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown:
        raise KeyError(f"unexpected batch key(s) {unknown}; known: {BATCH_KEYS}")
    out = {}
    for k, v in batch.items():
        if v is None:
            continue
        a = v.asnumpy() if isinstance(v, ms.Tensor) else np.asarray(v)
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3:
            raise ValueError(f"batch[{k!r}] must be [B, T] or [k, B, T], got shape {a.shape}")
        out[k] = a.astype(np.int32)
    shape = out["tokens"].shape
    for k, a in out.items():
        if a.shape != shape:
            raise ValueError(f"batch[{k!r}] has shape {a.shape}, tokens have {shape}")
    return out


def split_micro_batches(batch: dict, k: int) -> dict:
    """[B, T] arrays -> [k, B/k, T] (rows in order): one step over k micro-batches."""
    out = {}
    for name, v in batch.items():
        a = v.asnumpy() if isinstance(v, ms.Tensor) else np.asarray(v)
        if a.shape[0] % k:
            raise ValueError(f"batch of {a.shape[0]} rows does not split into {k} micro-batches")
        out[name] = rearrange(a, "(k b) ... -> k b ...", k=k)                    # rows in order
    return out


def count_loss_tokens(labels) -> int:
    return int((np.asarray(labels) != IGNORE_INDEX).sum())


def first_bad_id(ids, vocab_size: int, allowed: Optional[int] = None) -> Optional[Tuple[tuple, int]]:
    """(index, value) of the first entry outside [0, vocab_size) (other than `allowed`), or None."""
    a = np.asarray(ids)
    bad = (a < 0) | (a >= vocab_size)
    if allowed is not None:
        bad &= a != allowed
    if not bad.any():
        return None
    at = tuple(int(i) for i in np.argwhere(bad)[0])
    return at, int(a[at])


def check_token_ids(mb: dict, vocab_size: int) -> None:
    """Refuse, on the host, token ids and labels the model has no row for (inside the graph they
    are a Gather / cross-entropy error naming neither row nor id, which also breaks the cached
    step: tc2.compiled). mb: [k, B, T] micro-batches; rows are numbered as in the batch given."""
    for key, allowed, what in (("tokens", None, "token id"), ("labels", IGNORE_INDEX, "label")):
        bad = first_bad_id(mb[key], vocab_size, allowed)
        if bad is not None:
            (k, r, t), v = bad
            rows = mb[key].shape[1]
            where = f"batch row {k * rows + r}" + (f" (micro-batch {k})" if mb[key].shape[0] > 1 else "")
            rule = ("is neither -100 nor an id of" if allowed is not None else "is outside")
            raise ValueError(f"{where}, position {t}: {what} {v} {rule} the model's vocabulary "
                             f"[0, {vocab_size}) (batch[{key!r}])")


# --------------------------------------------------------------------------- the step


def _objective(params, tokens, labels, positions, segment_ids, seq_len, weight, cfg, ctx):
    """weight * (this process's sum of token losses); weight = loss_scale / global loss tokens."""
    loss_sum, _ = loss_sums(params, tokens, labels, cfg, positions=positions, segment_ids=segment_ids,
                            seq_len=seq_len, ctx=ctx)
    return loss_sum * weight, loss_sum


@forget_after_failure
def _compiled_grad(cfg: ModelConfig, ctx: ParallelContext):
    """acc + d(weight * loss_sum)/d params for one micro-batch: the whole model as one graph."""
    def objective(params, tokens, labels, positions, segment_ids, seq_len, weight):
        return _objective(params, tokens, labels, positions, segment_ids, seq_len, weight, cfg, ctx)
    value_and_grad = ms.value_and_grad(objective, grad_position=0, has_aux=True)

    @ms.jit
    def grad_step(params, acc, tokens, labels, positions, segment_ids, seq_len, weight):
        (_, loss_sum), grads = value_and_grad(params, tokens, labels, positions, segment_ids, seq_len, weight)
        return tree_map(lambda a, g: a + g, acc, grads), loss_sum

    return grad_step


@forget_after_failure
def _compiled_unrolled(cfg: ModelConfig, optimizer: GradientTransformation, ls: Optional[LossScaleConfig],
                       clip_norm: Optional[float], ctx: ParallelContext, donate: bool):
    """The unrolled model's step, as the fastest it runs on CPU (recompute "none", no pipeline, no
    ZeRO): (the step for one micro-batch, the same from accumulated gradients, the in-place write
    or None), each one graph. Without donation the update is inside the first two (measured at
    shape S: 0.54 s per step fused, 0.71 s with the update piece by piece); with it they end at
    the update's decision and the write graph applies it (tc2.optim.InPlace)."""
    _, _, _, finish, reduce_decide = bodies(cfg, optimizer, ls, clip_norm, ctx)   # graph mode: no attributes
    tail = reduce_decide if donate else finish
    write = optimizer.inplace.write if donate else None

    def objective(params, tokens, labels, positions, segment_ids, seq_len, weight):
        return _objective(params, tokens, labels, positions, segment_ids, seq_len, weight, cfg, ctx)
    value_and_grad = ms.value_and_grad(objective, grad_position=0, has_aux=True)

    def from_grads(params, opt_state, scale_state, grads, loss_sum, inv_count):
        if donate:
            return tail(opt_state, scale_state, grads, loss_sum, inv_count)     # (grads, decision)
        return tail(params, opt_state, scale_state, grads, loss_sum, inv_count)  # (params, state, decision)

    @ms.jit
    def fused(params, opt_state, scale_state, tokens, labels, positions, segment_ids, seq_len, inv_count):
        weight = inv_count if scale_state is None else inv_count * scale_state["scale"]
        (_, loss_sum), grads = value_and_grad(params, tokens, labels, positions, segment_ids, seq_len, weight)
        return from_grads(params, opt_state, scale_state, grads, loss_sum, inv_count)

    write_all = None
    if donate:
        @ms.jit
        def write_all(params, grads, opt_state, factor):
            return write(grads, opt_state, params, factor)

    return fused, ms.jit(from_grads), write_all


def _unrolled_update(state: TrainState, parts, inv_count, cfg: ModelConfig, optimizer, ls, clip_norm, ctx,
                     donate: bool):
    fused, from_grads, write_all = _compiled_unrolled(cfg, optimizer, ls, clip_norm, ctx, donate)
    scale = _mut(state.loss_scale)
    params, opt_state = ms.mutable(state.params), ms.mutable(state.opt_state)
    if len(parts) == 1:
        out = fused(params, opt_state, scale, *parts[0], inv_count)
    else:
        weight = inv_count if state.loss_scale is None else inv_count * state.loss_scale["scale"]
        grads, loss_sum = _accumulate(state.params, parts, cfg, ctx, weight, "none")
        out = from_grads(params, opt_state, scale, ms.mutable(grads), loss_sum, inv_count)
    if not donate:
        return out[0], out[1], Decision(*out[2])
    grads, d = out[0], Decision(*out[1])
    new_state = state.opt_state
    if bool(d.ok.asnumpy()):                                    # a skipped step writes nothing
        count = write_all(params, ms.mutable(grads), opt_state, d.factor)
        new_state = optimizer.inplace.advance(state.opt_state, count)
    return state.params, new_state, d


def donatable(state: TrainState) -> TrainState:
    """`state` with its parameters and params-shaped optimizer leaves as `ms.Parameter`s (the
    buffers an in-place update writes into); leaves that already are stay the same objects."""
    def as_parameters(tree, tag):
        def one(x, name):
            return x if isinstance(x, ms.Parameter) else ms.Parameter(x, name=f"{tag}.{name}.{id(x)}")
        return tree_map(one, tree, tree_names(tree))

    def walk(x, tag):
        if params_shaped(x):
            return as_parameters(x, tag)
        if isinstance(x, dict):
            return {k: walk(v, f"{tag}.{k}") for k, v in x.items()}
        if isinstance(x, tuple):
            return tuple(walk(v, f"{tag}.{i}") for i, v in enumerate(x))
        return x
    return state.replace(params=as_parameters(state.params, "params"), opt_state=walk(state.opt_state, "opt"))


def _mut(tree):
    return None if tree is None else ms.mutable(tree)


def _local_micro_batches(batch: dict, ctx: ParallelContext, vocab_size: int):
    """(this process's micro-batches as tuples of Tensors in LOCAL_KEYS order, global loss tokens,
    global tokens); ids are checked against the vocabulary first."""
    mb = as_micro_batches(batch)
    check_token_ids(mb, vocab_size)
    n_loss = count_loss_tokens(mb["labels"])
    parts = []
    for i in range(mb["tokens"].shape[0]):
        local = ctx.local_batch({k: v[i] for k, v in mb.items()})
        parts.append(tuple(ms.Tensor(local[k]) if k in local else None for k in LOCAL_KEYS))
    return parts, n_loss, int(mb["tokens"].size)


def _accumulate(params, parts, cfg: ModelConfig, ctx: ParallelContext, weight, recompute: str):
    """(sum over micro-batches of d(weight * loss_sum)/d params, float32; local loss_sum):
    one unrolled graph for the whole model (recompute "none"), or layer by layer."""
    recompute = resolve_recompute(recompute, cfg, ctx)
    if recompute != "none":
        return layerwise_grads(params, parts, weight, cfg, ctx, recompute)
    if ctx.pp > 1:
        raise ValueError("pipeline stages run layer by layer: use recompute 'selective' or 'full', not 'none'")
    acc = zeros_like_f32(params)
    loss_sum = ms.Tensor(0.0, ms.float32)
    for part in parts:
        acc, s = _compiled_grad(cfg, ctx)(ms.mutable(params), ms.mutable(acc), *part, weight)
        loss_sum = loss_sum + s
    return acc, loss_sum


def grads_and_loss(params, batch: dict, cfg: ModelConfig, *, ctx: ParallelContext = LOCAL,
                   recompute: str = "none"):
    """(gradient of the batch's token-mean loss w.r.t. this process's params (float32 tree, not
    yet summed over dp x cp), this process's share of that loss (float), global loss-token
    count), accumulated over the batch's micro-batches exactly as `train_step` does."""
    parts, n_loss, _ = _local_micro_batches(batch, ctx, cfg.vocab_size)
    inv_count = ms.Tensor(1.0 / max(n_loss, 1), ms.float32)
    grads, loss_sum = _accumulate(params, parts, cfg, ctx, inv_count, recompute)
    return grads, float((loss_sum * inv_count).asnumpy()), n_loss


def _skip_empty(state: TrainState, optimizer: GradientTransformation, n_tokens: int):
    """A batch without loss tokens (every label -100): no update at all (weight decay would
    still move the weights, and the token-mean loss is 0/0); the batch counts as consumed."""
    lr = float("nan") if optimizer.learning_rate is None else float(optimizer.learning_rate(state.opt_state).asnumpy())
    metrics = {"loss": float("nan"), "grad_norm": float("nan"), "lr": lr, "tokens": n_tokens,
               "loss_tokens": 0, "skipped": 1.0, "no_loss_tokens": 1.0}
    if state.loss_scale is not None:
        metrics["loss_scale"] = float(state.loss_scale["scale"].asnumpy())
    return state.replace(step=state.step + 1), metrics


def train_step(state: TrainState, batch: dict, cfg: ModelConfig, optimizer: GradientTransformation,
               loss_scale: Optional[LossScaleConfig] = None, *, clip_norm: Optional[float] = None,
               ctx: ParallelContext = LOCAL, recompute: str = "auto", donate: bool = False):
    """One optimizer step over the GLOBAL batch's k micro-batches -> (new state, metrics).

    clip_norm: scale the gradients to at most this global norm before the optimizer (each tp
    shard counted once; None: no clipping). recompute: "selective" / "full" compute the
    gradients layer by layer (`tc2.layerwise`: one compiled layer, activations kept as the mode
    says), "none" as one graph of the whole model. metrics (host floats, equal on every
    process): loss (token mean over the whole batch), grad_norm (before clipping), lr (used by
    this update), tokens (k*B*T), loss_tokens, skipped (1.0 if the update was left out:
    non-finite gradients, or no loss tokens, then also no_loss_tokens 1.0 and loss NaN),
    loss_scale (when scaling). `state` is not modified, unless `donate`: then the optimizer
    writes the new weights and moments over the old ones (MindSpore's fused in-place AdamW; far
    less memory and time on CPU) and `state` must not be used after the call (the returned
    state holds the same buffers); refused (ValueError) where impossible (ZeRO-1, an optimizer
    without an in-place form: `tc2.update.donation_refused`). `loss_scale` must be the config the
    state was initialised with (None: no scaling). Token ids and labels outside the vocabulary
    are refused (ValueError naming the batch row, position and id).
    """
    if (state.loss_scale is None) != (loss_scale is None):
        raise ValueError("state.loss_scale and the loss_scale argument disagree (init_train_state "
                         "with the same LossScaleConfig you pass here)")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
    parts, n_loss, n_tokens = _local_micro_batches(batch, ctx, cfg.vocab_size)
    if n_loss == 0:
        return _skip_empty(state, optimizer, n_tokens)
    inv_count = ms.Tensor(1.0 / max(n_loss, 1), ms.float32)
    recompute = resolve_recompute(recompute, cfg, ctx)
    if donate:
        refused = donation_refused(optimizer, ctx)
        if refused:
            raise ValueError(f"train_step(donate=True) is not possible here: {refused}; pass donate=False")
        state = donatable(state)
    if recompute == "none" and ctx.pp == 1 and ctx.zero_size == 1:
        params, opt_state, d = _unrolled_update(state, parts, inv_count, cfg, optimizer, loss_scale, clip_norm,
                                                ctx, donate)
    else:
        weight = inv_count if state.loss_scale is None else inv_count * state.loss_scale["scale"]
        grads, loss_sum = _accumulate(state.params, parts, cfg, ctx, weight, recompute)
        params, opt_state, d = apply_gradients(state.params, state.opt_state, state.loss_scale, grads, loss_sum,
                                               inv_count, cfg, optimizer, loss_scale, clip_norm, ctx, donate)
    new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1, loss_scale=d.loss_scale)
    metrics = {"loss": float(d.loss.asnumpy()), "grad_norm": float(d.grad_norm.asnumpy()),
               "lr": float(d.lr.asnumpy()), "tokens": n_tokens, "loss_tokens": n_loss,
               "skipped": 0.0 if bool(d.ok.asnumpy()) else 1.0}
    if d.loss_scale is not None:
        metrics["loss_scale"] = float(d.loss_scale["scale"].asnumpy())
    return new_state, metrics


# --------------------------------------------------------------------------- eval


def eval_loss_sums(params, batch: dict, cfg: ModelConfig, *, ctx: ParallelContext = LOCAL):
    """(sum of token losses, loss-token count) over a global [B, T] or [k, B, T] batch, as floats
    (the whole batch's, on every process). Layer by layer: compile time independent of depth."""
    parts, _, _ = _local_micro_batches(batch, ctx, cfg.vocab_size)
    total, count = 0.0, 0.0
    for part in parts:
        s, c = layerwise_loss_sums(params, part, cfg, ctx)
        total += float(s.asnumpy())
        count += float(c.asnumpy())
    return total, count
