"""Optimizers as optax-style pairs of pure functions over pytrees.

A `GradientTransformation` is `init(params) -> state` and
`update(grads, state, params) -> (updates, new_state)`; `apply_updates(params, updates)` adds
them. Nothing is mutated: every function returns new Tensors, so a train step can keep the old
state (to skip an overflowing fp16 step) and checkpoints see exactly what the step saw. The
same code runs eagerly and inside `ms.jit` (dict/tuple containers, isinstance dispatch, one
`for` per comprehension).

`adamw` also offers the same update IN PLACE (`GradientTransformation.inplace`), through
MindSpore's fused `AdamWeightDecay` kernel on `ms.Parameter` buffers: a train step that is
allowed to donate its state (`train_step(donate=True)`, what `fit` does) writes the new weights
and moments over the old ones. On CPU graphs the functional update keeps ~20 temporaries per
tensor alive to the end of the graph (old and new weights and moments side by side); the
kernel keeps none and reads each tensor once.

Schedules map the optimizer's update count (an int32 Tensor, or a Python int on the host) to
a float32 learning rate. `learning_rate(state)` on a transformation reports the rate its next
update will use, so a train step can log it without knowing the chain's layout.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import mindspore as ms
from mindspore import ops

from tc2.tree import global_norm, tree_map, tree_names

# --------------------------------------------------------------------------- schedules


def _as_step(step):
    return (step if isinstance(step, ms.Tensor) else ms.Tensor(step, ms.int32)).astype(ms.float32)


def constant_schedule(lr: float) -> Callable:
    """lr at every step."""
    def schedule(step):
        return _as_step(step) * 0.0 + lr
    return schedule


def cosine_schedule(peak_lr: float, decay_steps: int, end_lr: float = 0.0, warmup_steps: int = 0,
                    warmup_init_lr: float = 0.0) -> Callable:
    """Linear warmup from `warmup_init_lr` to `peak_lr` over `warmup_steps` updates, then a half
    cosine from `peak_lr` down to `end_lr` reached at update `decay_steps` (total, warmup
    included), then `end_lr` forever. Update 0 uses `warmup_init_lr` when warming up (optax's
    convention) and `peak_lr` otherwise. The release: cosine_schedule(1.5e-4, steps, 1.5e-5).
    """
    if decay_steps <= warmup_steps:
        raise ValueError(f"cosine_schedule: decay_steps ({decay_steps}) must exceed warmup_steps "
                         f"({warmup_steps})")
    if warmup_steps < 0 or peak_lr < 0 or end_lr < 0:
        raise ValueError("cosine_schedule: learning rates and warmup_steps must be >= 0")
    span = float(decay_steps - warmup_steps)

    def schedule(step):
        s = _as_step(step)
        frac = ops.clip((s - warmup_steps) / span, 0.0, 1.0)
        cosine = end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + ops.cos(frac * math.pi))
        if warmup_steps == 0:
            return cosine
        warm = warmup_init_lr + (peak_lr - warmup_init_lr) * s / float(warmup_steps)
        return ops.where(s < warmup_steps, warm, cosine)
    return schedule


def as_schedule(lr) -> Callable:
    """A float becomes a constant schedule; a callable is returned as is."""
    return lr if callable(lr) else constant_schedule(float(lr))


# --------------------------------------------------------------------------- transformations


@dataclass(frozen=True)
class GradientTransformation:
    """A pair of pure functions (plus an optional lr reporter). Inside `ms.jit`, take the
    functions out first (graph mode cannot read attributes of this object).

    `elementwise`: each parameter's update depends on that parameter's gradient and state only
    (and shared scalars such as the step count), so the train step may apply it to one layer
    at a time (`tc2.update`). A transformation that looks across parameters (a global-norm
    clip) must leave it False."""
    init: Callable                                   # params -> state
    update: Callable                                 # (grads, state, params) -> (updates, state)
    learning_rate: Optional[Callable] = None         # state -> lr of the next update, or None
    elementwise: bool = False
    inplace: Optional["InPlace"] = None              # the same update written into the buffers


@dataclass(frozen=True)
class InPlace:
    """An optimizer update that overwrites its buffers instead of returning new ones.

    `write(grads, state, params, factor)`: graph code; the params and the state's params-shaped
    leaves must be `ms.Parameter`s (passed through `ms.mutable`); applies the update to
    `grads * factor` and returns the next update count (a Tensor that depends on every write).
    `advance(state, count)`: host code; the state after the write (same buffers, new count).
    Elementwise, so it may be called piece by piece with the same count."""
    write: Callable
    advance: Callable


def apply_updates(params, updates):
    """params + updates, leaf by leaf, in each parameter's dtype."""
    return tree_map(lambda p, u: p + u.astype(p.dtype), params, updates)


def clip_by_global_norm(max_norm: float = 1.0) -> GradientTransformation:
    """Scale all gradients by min(1, max_norm / global_norm) (float32). Stateless."""
    if max_norm <= 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm}")

    def init(params):
        return {}

    def update(grads, state, params=None):
        norm = global_norm(grads)
        factor = max_norm / ops.maximum(norm, max_norm)                  # 1 when norm <= max_norm
        return tree_map(lambda g: g * factor.astype(g.dtype), grads), state

    return GradientTransformation(init, update)


def _is_matrix(p):
    return p.ndim >= 2


def decay_matrices(params):
    """The default weight-decay mask: decay weight matrices (projections, embeddings, lm_head),
    not vectors (RMSNorm weights, the dense/down_proj biases)."""
    return tree_map(_is_matrix, params)


def exclude_names(*substrings: str) -> Callable:
    """A mask function: decay every parameter whose dotted name (e.g. "layers.0.dense_bias",
    "ln_f") contains none of `substrings`. Example: exclude_names("norm", "bias", "ln_f").

    The train step updates one layer at a time, where every layer is named "layers.0...":
    match the names of tensors, not layer indices (a substring with a digit is refused)."""
    if not substrings:
        raise ValueError("exclude_names needs at least one substring")
    numbered = [s for s in substrings if any(c.isdigit() for c in s)]
    if numbered:
        raise ValueError(f"exclude_names({numbered[0]!r}): match tensor names (norm, bias, ln_f, "
                         "word_embeddings, ...), not layer indices")

    def keep(name):
        hit = False
        for s in substrings:
            hit = hit or (s in name)
        return not hit

    def mask(params):
        return tree_map(keep, tree_names(params))
    return mask


def _mask_function(mask) -> Callable:
    """params -> pytree of bool, from None (all), a function, or a fixed pytree of bool."""
    if mask is None:
        return _decay_all
    if callable(mask):
        return mask
    fixed = mask

    def given(params):
        return fixed
    return given


def _decay_all(params):
    return tree_map(_true, params)


def _true(p):
    return True


def adamw(learning_rate=1e-3, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          weight_decay: float = 0.1, mask=decay_matrices) -> GradientTransformation:
    """AdamW with bias correction and decoupled weight decay (Loshchilov & Hutter; torch's AdamW):

        m = b1 m + (1 - b1) g        v = b2 v + (1 - b2) g^2        t = count + 1
        update = -lr(count) * ( m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + weight_decay * p * mask )

    `learning_rate`: a float or a schedule (count -> lr). `mask` says which parameters decay:
    a function params -> pytree of bool (default `decay_matrices`: no decay on norms and
    biases), a pytree of bool, or None (decay everything). Moments are float32.
    """
    schedule = as_schedule(learning_rate)
    decay_mask = _mask_function(mask)
    for name, val in (("b1", b1), ("b2", b2)):
        if not 0.0 <= val < 1.0:
            raise ValueError(f"adamw: {name} must be in [0, 1), got {val}")
    if eps <= 0 or weight_decay < 0:
        raise ValueError(f"adamw: need eps > 0 and weight_decay >= 0 (got {eps}, {weight_decay})")

    def init(params):
        return {"count": ms.Tensor(0, ms.int32),
                "mu": tree_map(_zeros_f32, params), "nu": tree_map(_zeros_f32, params)}

    def update(grads, state, params):
        count = state["count"]
        lr = schedule(count)
        t = (count + 1).astype(ms.float32)
        c1 = 1.0 - ops.pow(ms.Tensor(b1, ms.float32), t)                 # bias corrections
        c2 = 1.0 - ops.pow(ms.Tensor(b2, ms.float32), t)
        mu = tree_map(lambda m, g: b1 * m + (1.0 - b1) * g.astype(ms.float32), state["mu"], grads)
        nu = tree_map(lambda v, g: b2 * v + (1.0 - b2) * ops.square(g.astype(ms.float32)),
                      state["nu"], grads)
        decay = decay_mask(params)

        def step(m, v, p, d):
            u = (m / c1) / (ops.sqrt(v / c2) + eps)
            if d and weight_decay > 0:
                u = u + weight_decay * p.astype(ms.float32)
            return -lr * u

        updates = tree_map(step, mu, nu, params, decay)
        return updates, {"count": count + 1, "mu": mu, "nu": nu}

    def current_lr(state):
        return schedule(state["count"])

    kernel = ops.AdamWeightDecay()

    def write(grads, state, params, factor):
        # the kernel has no bias correction: fold it into its scalars, exactly equal in real
        # arithmetic: lr' = lr sqrt(c2)/c1, eps' = eps sqrt(c2), decay' = decay lr/lr'
        count = state["count"]
        t = (count + 1).astype(ms.float32)
        root_c2 = ops.sqrt(1.0 - ops.pow(ms.Tensor(b2, ms.float32), t))
        c1 = 1.0 - ops.pow(ms.Tensor(b1, ms.float32), t)
        lr = schedule(count) * root_c2 / c1
        decay = decay_mask(params)
        wd_on = ms.Tensor(weight_decay, ms.float32) * c1 / root_c2

        def one(p, m, v, g, d):
            wd = wd_on if d and weight_decay > 0 else wd_on * 0.0
            return kernel(p, m, v, lr, b1, b2, eps * root_c2, wd, (g * factor).astype(ms.float32))
        done = tree_map(one, params, state["mu"], state["nu"], grads, decay)
        return ops.depend(count + 1, done)

    def advance(state, count):
        return {"count": count, "mu": state["mu"], "nu": state["nu"]}

    return GradientTransformation(init, update, current_lr, elementwise=mask is None or callable(mask),
                                  inplace=InPlace(write, advance))


def _zeros_f32(p):
    return ops.zeros(p.shape, ms.float32)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations in order (e.g. chain(clip_by_global_norm(1.0), adamw(...))).
    The state is a tuple of the members' states."""
    if not transforms:
        raise ValueError("chain needs at least one transformation")

    inits = tuple(t.init for t in transforms)
    updates = tuple(t.update for t in transforms)
    with_lr = [i for i, t in enumerate(transforms) if t.learning_rate is not None]
    lr_index = with_lr[0] if with_lr else None
    lr_fn = transforms[lr_index].learning_rate if with_lr else None

    def init(params):
        return tuple([f(params) for f in inits])

    def update(grads, state, params=None):
        new_state = ()
        for i in range(len(updates)):
            grads, s = updates[i](grads, state[i], params)
            new_state = new_state + (s,)
        return grads, new_state

    def current_lr(state):
        return lr_fn(state[lr_index])

    return GradientTransformation(init, update, current_lr if with_lr else None,
                                  elementwise=all(t.elementwise for t in transforms))


# --------------------------------------------------------------------------- from a config


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + lr schedule (`make_optimizer`) + global-norm clipping (`clip`, done by the train step).
    Defaults: the release's recipe (spec §9)."""
    lr: float = 1.5e-4
    end_lr: float = 1.5e-5
    schedule: str = "cosine"                  # "cosine" | "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0                 # warmup as a fraction of the steps (MF style)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: Optional[float] = 1.0          # None or 0: no clipping
    no_decay: Optional[Tuple[str, ...]] = None  # None: norms and biases; names to exclude; (): none

    @property
    def clip(self) -> Optional[float]:
        """The clip norm for `train_step` (None when clipping is off)."""
        return self.clip_norm or None

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        checks = {"lr": self.lr >= 0, "end_lr": self.end_lr >= 0, "warmup_ratio": 0 <= self.warmup_ratio < 1,
                  "b1": 0 <= self.b1 < 1, "b2": 0 <= self.b2 < 1, "eps": self.eps > 0,
                  "weight_decay": self.weight_decay >= 0,
                  "clip_norm": self.clip_norm is None or self.clip_norm >= 0}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            rule = {"lr": ">= 0", "end_lr": ">= 0", "warmup_ratio": "in [0, 1)", "b1": "in [0, 1)",
                    "b2": "in [0, 1)", "eps": "> 0", "weight_decay": ">= 0", "clip_norm": ">= 0 or null"}[bad[0]]
            raise ValueError(f"--optim.{bad[0]} must be {rule}, got {getattr(self, bad[0])!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"--optim.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")


@functools.lru_cache(maxsize=32)
def make_optimizer(ocfg: OptimConfig, total_steps: int) -> GradientTransformation:
    """AdamW with the schedule an OptimConfig describes, spanning `total_steps`. Clipping is not
    part of it: pass `clip_norm=ocfg.clip` to `train_step`, which clips with the norm it
    already computes (counting tensor-parallel shards once). Cached: equal configs give the
    same object, so the compiled train step is reused (e.g. on resume)."""
    warmup = ocfg.warmup_steps or int(round(ocfg.warmup_ratio * total_steps))
    if ocfg.schedule == "constant":
        schedule = constant_schedule(ocfg.lr)
    else:
        schedule = cosine_schedule(ocfg.lr, max(total_steps, warmup + 1), ocfg.end_lr, warmup)
    if ocfg.no_decay is None:
        mask = decay_matrices
    elif len(ocfg.no_decay) == 0:
        mask = None
    else:
        mask = exclude_names(*ocfg.no_decay)
    return adamw(schedule, ocfg.b1, ocfg.b2, ocfg.eps, ocfg.weight_decay, mask=mask)
