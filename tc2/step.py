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

Compilation (MINDSPORE_NOTES §1, §9): with k = 1 the whole step (value_and_grad over the
parameter dict, clipping, AdamW, loss scaling) is one graph. With k > 1 a gradient graph runs k
times (accumulating into a float32 gradient tree) and an apply graph finishes the step:
separate calls hold one micro-batch's activations at a time (the point of accumulating), and a
graph-mode `for` carrying the gradient dict silently returned None in MindSpore 2.10. Graphs
are cached per (config, optimizer, loss-scale options, clip, context); state trees are wrapped
in `ms.mutable`, so new tensors every step never recompile.

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
from tc2.model import loss_sums, tp_sharded
from tc2.optim import GradientTransformation, apply_updates
from tc2.tree import global_norm, tree_map

BATCH_KEYS = ("tokens", "labels", "positions", "segment_ids")
LOCAL_KEYS = BATCH_KEYS + ("seq_len",)         # what `ParallelContext.local_batch` adds


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


def init_train_state(params, optimizer: GradientTransformation,
                     loss_scale: Optional[LossScaleConfig] = None, step: int = 0) -> TrainState:
    """Step 0 (or `step`): fresh optimizer state for float32 `params`."""
    return TrainState(params=params, opt_state=optimizer.init(params),
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


def _keep_if(ok, new, old):
    """`new` if the scalar bool `ok` else `old` (whole pytrees), as graph control flow.

    Not a leaf-wise `ops.where(ok, new, old)`: on MindSpore 2.10 CPU the output of a
    broadcasting elementwise op is never reused within a graph, so a where per leaf holds
    several extra copies of the parameters and the optimizer state for the whole step.
    """
    if ok:
        out = new
    else:
        out = old
    return out


def _sum_dpcp(x, ctx: ParallelContext):
    """Sum a scalar over the data x context group (the identity in one process)."""
    if ctx.dp * ctx.cp == 1 or ctx.folded:
        return x
    return ctx.sum_dpcp(x.reshape(1))[0]


def _finish(update, current_lr, ls: Optional[LossScaleConfig], clip_norm, ctx, sharded, params, opt_state,
            step, scale_state, grads, loss_sum, inv_count):
    """Reduce over dp x cp, unscale, norm, clip, AdamW (via `update`), skip if not finite,
    update the loss scale."""
    if ctx.dp * ctx.cp > 1 and not ctx.folded:
        grads = tree_map(ctx.sum_dpcp, grads)
    loss = _sum_dpcp(loss_sum, ctx) * inv_count
    if scale_state is not None:
        inv_scale = 1.0 / scale_state["scale"]
        grads = tree_map(lambda g: g * inv_scale, grads)
    lr = inv_count * 0.0 if current_lr is None else current_lr(opt_state)
    gnorm = global_norm(grads, sharded, ctx.sum_tp)                             # unscaled, pre-clip
    if clip_norm is not None:
        factor = clip_norm / ops.maximum(gnorm, clip_norm)                      # 1 when gnorm <= clip
        grads = tree_map(lambda g: g * factor, grads)
    ok = ops.logical_and(ops.isfinite(gnorm), ops.isfinite(loss))
    updates, new_opt = update(grads, opt_state, params)
    new_params = apply_updates(params, updates)
    params, opt_state = _keep_if(ok, (new_params, new_opt), (params, opt_state))
    if scale_state is not None:
        scale, good = scale_state["scale"], scale_state["good_steps"] + 1
        grow = good >= ls.growth_interval
        grown = ops.where(grow, scale * ls.factor, scale)
        shrunk = ops.maximum(scale / ls.factor, ls.min_scale)
        scale_state = {"scale": ops.where(ok, grown, shrunk),
                       "good_steps": ops.where(ok, ops.where(grow, 0, good), 0).astype(ms.int32)}
    return params, opt_state, step + 1, scale_state, (loss, gnorm, lr, ok)


def _value_and_grad(cfg: ModelConfig, ctx: ParallelContext):
    def objective(params, tokens, labels, positions, segment_ids, seq_len, weight):
        return _objective(params, tokens, labels, positions, segment_ids, seq_len, weight, cfg, ctx)
    return ms.value_and_grad(objective, grad_position=0, has_aux=True)


@forget_after_failure
def _compiled_grad(cfg: ModelConfig, ctx: ParallelContext):
    """acc + d(weight * loss_sum)/d params for one micro-batch; shared by every optimizer."""
    value_and_grad = _value_and_grad(cfg, ctx)

    @ms.jit
    def grad_step(params, acc, tokens, labels, positions, segment_ids, seq_len, weight):
        (_, loss_sum), grads = value_and_grad(params, tokens, labels, positions, segment_ids, seq_len, weight)
        return tree_map(lambda a, g: a + g, acc, grads), loss_sum

    return grad_step


@forget_after_failure
def _compiled_step(cfg: ModelConfig, optimizer: GradientTransformation, ls: Optional[LossScaleConfig],
                   clip_norm: Optional[float], ctx: ParallelContext):
    """(fused step for k = 1, apply step after accumulation), jitted, for one configuration."""
    value_and_grad = _value_and_grad(cfg, ctx)
    update, current_lr = optimizer.update, optimizer.learning_rate     # graph mode: no attributes
    sharded = tp_sharded(cfg) if ctx.tp > 1 else None                  # norm: tp shards summed once

    def finish(params, opt_state, step, scale_state, grads, loss_sum, inv_count):
        return _finish(update, current_lr, ls, clip_norm, ctx, sharded, params, opt_state, step, scale_state,
                       grads, loss_sum, inv_count)

    @ms.jit
    def fused_step(params, opt_state, step, scale_state, tokens, labels, positions, segment_ids, seq_len,
                   inv_count):
        weight = inv_count if scale_state is None else inv_count * scale_state["scale"]
        (_, loss_sum), grads = value_and_grad(params, tokens, labels, positions, segment_ids, seq_len, weight)
        return finish(params, opt_state, step, scale_state, grads, loss_sum, inv_count)

    @ms.jit
    def apply_step(params, opt_state, step, scale_state, grads, loss_sum, inv_count):
        return finish(params, opt_state, step, scale_state, grads, loss_sum, inv_count)

    return fused_step, apply_step


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


def _accumulate(params, parts, cfg: ModelConfig, ctx: ParallelContext, weight):
    """(sum over micro-batches of d(weight * loss_sum)/d params, float32; local loss_sum)."""
    grad_step = _compiled_grad(cfg, ctx)
    acc = tree_map(lambda p: ops.zeros(p.shape, ms.float32), params)
    loss_sum = ms.Tensor(0.0, ms.float32)
    params = ms.mutable(params)
    for part in parts:
        acc, s = grad_step(params, ms.mutable(acc), *part, weight)
        loss_sum = loss_sum + s
    return acc, loss_sum


def grads_and_loss(params, batch: dict, cfg: ModelConfig, *, ctx: ParallelContext = LOCAL):
    """(gradient of the batch's token-mean loss w.r.t. this process's params (float32 tree, not
    yet summed over dp x cp), this process's share of that loss (float), global loss-token
    count), accumulated over the batch's micro-batches exactly as `train_step` does."""
    parts, n_loss, _ = _local_micro_batches(batch, ctx, cfg.vocab_size)
    inv_count = ms.Tensor(1.0 / max(n_loss, 1), ms.float32)
    grads, loss_sum = _accumulate(params, parts, cfg, ctx, inv_count)
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
               ctx: ParallelContext = LOCAL):
    """One optimizer step over the GLOBAL batch's k micro-batches -> (new state, metrics).

    clip_norm: scale the gradients to at most this global norm before the optimizer (each tp
    shard counted once; None: no clipping). metrics (host floats, equal on every process):
    loss (token mean over the whole batch), grad_norm (before clipping), lr (used by this
    update), tokens (k*B*T), loss_tokens, skipped (1.0 if the update was left out:
    non-finite gradients, or no loss tokens, then also no_loss_tokens 1.0 and loss NaN),
    loss_scale (when scaling). `state` is not modified. `loss_scale` must be the config the
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
    fused_step, apply_step = _compiled_step(cfg, optimizer, loss_scale, clip_norm, ctx)
    scale = _mut(state.loss_scale)
    if len(parts) == 1:
        out = fused_step(ms.mutable(state.params), ms.mutable(state.opt_state), state.step, scale,
                         *parts[0], inv_count)
    else:
        weight = inv_count if scale is None else inv_count * state.loss_scale["scale"]
        grads, loss_sum = _accumulate(state.params, parts, cfg, ctx, weight)
        out = apply_step(ms.mutable(state.params), ms.mutable(state.opt_state), state.step, scale,
                         ms.mutable(grads), loss_sum, inv_count)
    params, opt_state, step, scale_state, (loss, gnorm, lr, ok) = out
    new_state = TrainState(params=params, opt_state=opt_state, step=step, loss_scale=scale_state)
    metrics = {"loss": float(loss.asnumpy()), "grad_norm": float(gnorm.asnumpy()),
               "lr": float(lr.asnumpy()), "tokens": n_tokens, "loss_tokens": n_loss,
               "skipped": 0.0 if bool(ok.asnumpy()) else 1.0}
    if scale_state is not None:
        metrics["loss_scale"] = float(scale_state["scale"].asnumpy())
    return new_state, metrics


# --------------------------------------------------------------------------- eval


@forget_after_failure
def _compiled_eval(cfg: ModelConfig, ctx: ParallelContext):
    @ms.jit
    def eval_sums(params, tokens, labels, positions, segment_ids, seq_len):
        s, n = loss_sums(params, tokens, labels, cfg, positions=positions, segment_ids=segment_ids,
                         seq_len=seq_len, ctx=ctx)
        return _sum_dpcp(s, ctx), _sum_dpcp(n, ctx)
    return eval_sums


def eval_loss_sums(params, batch: dict, cfg: ModelConfig, *, ctx: ParallelContext = LOCAL):
    """(sum of token losses, loss-token count) over a global [B, T] or [k, B, T] batch, as floats
    (the whole batch's, on every process)."""
    parts, _, _ = _local_micro_batches(batch, ctx, cfg.vocab_size)
    fn = _compiled_eval(cfg, ctx)
    total, count = 0.0, 0.0
    for part in parts:
        s, c = fn(ms.mutable(params), *part)
        total += float(s.asnumpy())
        count += float(c.asnumpy())
    return total, count
