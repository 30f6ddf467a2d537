"""The SPMD train step and per-rank checkpoints, on top of `tc2.parallel`.

    ctx   = spmd_context(Mesh(dp=2, tp=2))                    # under msrun, 4 workers
    local = shard_params(params, cfg, ctx.mesh, ctx.rank)      # or load a tc2-tp checkpoint
    state = init_train_state(local, optimizer)                 # tc2.train's TrainState
    state, metrics = spmd_train_step(state, global_batch, cfg, optimizer, ctx, max_grad_norm=1.0)

Every rank is given the same GLOBAL batch (cheap: token ids) and takes its own rows and
sequence share (`shard_batch`), so the loss normaliser (the global loss-token count) is known
on the host without communication. The update equals `tc2.train.train_step` on the global
batch: gradients are summed over dp x cp, the global norm counts tp shards once each, and the
clip happens here, before the optimizer (an optimizer-internal `clip_by_global_norm` with the
same or a larger max_norm then sees a local norm <= max_norm and does nothing).

Checkpoints use tc2's tensor-parallel directory (`tc2.convert`: tp_layout.json, config.json,
rank_{r}/model.safetensors with HF names), so `recipes/convert.py merge` or
`merge_checkpoint` turns them into one HF directory.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Optional

import mindspore as ms
import numpy as np
from mindspore import ops

from tc2.checkpoint.hf import hf_name
from tc2.config import ModelConfig
from tc2.model import IGNORE_INDEX
from tc2.optim import GradientTransformation, apply_updates
from tc2.parallel.collectives import SpmdContext, shard_batch, spmd_loss_sums
from tc2.checkpoint.safetensors import encode_tensor, write_safetensors
from tc2.parallel.sharding import local_param_specs, param_mesh_axes, param_specs, split_dim
from tc2.step import TrainState, as_micro_batches
from tc2.tree import tree_flatten_with_names, tree_map

LOCAL_KEYS = ("tokens", "labels", "positions", "segment_ids", "seq_len")


# ---------------------------------------------------------------------------------------------
# gradients across ranks
def reduce_gradients(grads, ctx: SpmdContext):
    """Sum over dp x cp (each rank's loss is already its share of the global mean)."""
    if ctx.mesh.dp * ctx.mesh.cp == 1:
        return grads
    return _map(ctx.sum_dpcp, grads)


def _map(fn, tree):
    if isinstance(tree, dict):
        return {k: _map(fn, tree[k]) for k in tree}
    if isinstance(tree, tuple):
        return tuple([_map(fn, t) for t in tree])
    return fn(tree)


def tp_sharded_mask(cfg: ModelConfig, local_params) -> Any:
    """Pytree of bools like `local_params`: which leaves are split over tp (host side)."""
    axes = param_mesh_axes(cfg)

    def walk(tree, prefix):
        if isinstance(tree, dict):
            return {k: walk(tree[k], prefix + k + ".") for k in tree}
        if isinstance(tree, tuple):
            return tuple(walk(t, f"{prefix}{i}.") for i, t in enumerate(tree))
        return "tp" in axes[prefix[:-1]]
    return walk(local_params, "")


def _sum_squares(tree, mask, want: bool):
    if isinstance(tree, dict):
        total = 0.0
        for k in tree:
            total = total + _sum_squares(tree[k], mask[k], want)
        return total
    if isinstance(tree, tuple):
        total = 0.0
        for i in range(len(tree)):
            total = total + _sum_squares(tree[i], mask[i], want)
        return total
    if mask != want:
        return 0.0
    x = tree.astype(ms.float32)
    return (x * x).sum()


def global_grad_norm(grads, mask, ctx: SpmdContext):
    """sqrt(sum of squares over the FULL model): tp shards summed over tp, replicas counted once."""
    sharded = _sum_squares(grads, mask, True)
    replicated = _sum_squares(grads, mask, False)
    if ctx.tp > 1:
        sharded = ctx.sum_tp(ops.reshape(ms.Tensor(0.0, ms.float32) + sharded, (1,)))[0]
    return ops.sqrt(sharded + replicated)



def _scalar_sum(ctx: SpmdContext, x):
    if ctx.mesh.dp * ctx.mesh.cp == 1:
        return x
    return ctx.sum_dpcp(x.reshape(1))[0]


@functools.lru_cache(maxsize=8)
def _compiled(cfg: ModelConfig, optimizer: GradientTransformation, ctx: SpmdContext,
              max_grad_norm: Optional[float]):
    specs = local_param_specs(cfg, ctx.mesh, ctx.rank)
    mask = tp_sharded_mask(cfg, specs)
    update, current_lr = optimizer.update, optimizer.learning_rate

    def objective(params, tokens, labels, positions, segment_ids, seq_len, weight):
        s, _ = spmd_loss_sums(params, tokens, labels, cfg, ctx, positions=positions, seq_len=seq_len,
                              segment_ids=segment_ids)
        return s * weight, s

    value_and_grad = ms.value_and_grad(objective, grad_position=0, has_aux=True)

    def finish(params, opt_state, step, grads, loss_sum, inv_count):
        grads = reduce_gradients(grads, ctx)
        loss = _scalar_sum(ctx, loss_sum) * inv_count
        gnorm = global_grad_norm(grads, mask, ctx)
        if max_grad_norm is not None:
            factor = max_grad_norm / ops.maximum(gnorm, max_grad_norm)
            grads = tree_map(lambda g: g * factor.astype(g.dtype), grads)
        lr = inv_count * 0.0 if current_lr is None else current_lr(opt_state)
        ok = ops.logical_and(ops.isfinite(gnorm), ops.isfinite(loss))
        updates, new_opt = update(grads, opt_state, params)
        new_params = apply_updates(params, updates)
        params = tree_map(lambda n, o: ops.where(ok, n, o), new_params, params)
        opt_state = tree_map(lambda n, o: ops.where(ok, n, o), new_opt, opt_state)
        return params, opt_state, step + 1, (loss, gnorm, lr, ok)

    @ms.jit
    def fused_step(params, opt_state, step, tokens, labels, positions, segment_ids, seq_len, inv_count):
        (_, loss_sum), grads = value_and_grad(params, tokens, labels, positions, segment_ids, seq_len,
                                              inv_count)
        return finish(params, opt_state, step, grads, loss_sum, inv_count)

    @ms.jit
    def grad_step(params, acc, tokens, labels, positions, segment_ids, seq_len, weight):
        (_, loss_sum), grads = value_and_grad(params, tokens, labels, positions, segment_ids, seq_len, weight)
        return tree_map(lambda a, g: a + g, acc, grads), loss_sum

    @ms.jit
    def apply_step(params, opt_state, step, grads, loss_sum, inv_count):
        return finish(params, opt_state, step, grads, loss_sum, inv_count)

    return fused_step, grad_step, apply_step


def local_micro_batches(batch: dict, ctx: SpmdContext, *, pad_id: int = 3):
    """(this rank's micro-batches: list of dicts of int32 arrays, global loss-token count)."""
    mb = as_micro_batches(batch)
    n_loss = int((mb["labels"] != IGNORE_INDEX).sum())
    parts = []
    for i in range(mb["tokens"].shape[0]):
        parts.append(shard_batch({k: v[i] for k, v in mb.items()}, ctx.mesh, ctx.rank, layout=ctx.layout,
                                 pad_id=pad_id))
    return parts, n_loss


def spmd_train_step(state: TrainState, batch: dict, cfg: ModelConfig, optimizer: GradientTransformation,
                    ctx: SpmdContext, *, max_grad_norm: Optional[float] = None, pad_id: int = 3):
    """One optimizer step of this rank on the GLOBAL batch ([B, T] or [k, B, T]) -> (state, metrics).

    state.params are this rank's local params. metrics as `tc2.train.train_step` (global loss
    and grad norm, identical on every rank). No loss scaling (float32 / bfloat16 compute).
    """
    if state.loss_scale is not None:
        raise ValueError("spmd_train_step does not do float16 loss scaling; compute in float32 or bfloat16")
    parts, n_loss = local_micro_batches(batch, ctx, pad_id=pad_id)
    inv_count = ms.Tensor(1.0 / max(n_loss, 1), ms.float32)
    fused_step, grad_step, apply_step = _compiled(cfg, optimizer, ctx, max_grad_norm)
    params = ms.mutable(state.params)

    def args(p):
        return [ms.Tensor(p[k]) if k in p else None for k in LOCAL_KEYS]
    if len(parts) == 1:
        out = fused_step(params, ms.mutable(state.opt_state), state.step, *args(parts[0]), inv_count)
    else:
        acc = tree_map(lambda p: ops.zeros(p.shape, ms.float32), state.params)
        loss_sum = ms.Tensor(0.0, ms.float32)
        for p in parts:
            acc, s = grad_step(params, ms.mutable(acc), *args(p), inv_count)
            loss_sum = loss_sum + s
        out = apply_step(params, ms.mutable(state.opt_state), state.step, ms.mutable(acc), loss_sum, inv_count)
    new_params, opt_state, step, (loss, gnorm, lr, ok) = out
    tokens = int(np.asarray(batch["tokens"]).size)
    metrics = {"loss": float(loss.asnumpy()), "grad_norm": float(gnorm.asnumpy()), "lr": float(lr.asnumpy()),
               "tokens": tokens, "loss_tokens": n_loss, "skipped": 0.0 if bool(ok.asnumpy()) else 1.0}
    return TrainState(params=new_params, opt_state=opt_state, step=step, loss_scale=None), metrics


# ---------------------------------------------------------------------------------------------
# per-rank checkpoints in tc2's tensor-parallel format
LAYOUT = "tp_layout.json"          # the same names and schema as tc2.convert (merge reads them)
RANK_FILE = "rank_{rank}/model.safetensors"


def barrier():
    """Wait for every rank (eager; msrun)."""
    from mindspore import mint
    mint.distributed.barrier()


def save_checkpoint(params, cfg: ModelConfig, ctx: SpmdContext, path: str, *, dtype: str = "float32") -> None:
    """Every rank calls this; the dp = cp = 0 replica of each tp rank writes its shard.

    path/rank_{tp}/model.safetensors (HF names, this rank's slice), then, once all shards are
    on disk, tp rank 0 writes config.json and tp_layout.json: a directory with a layout file is
    complete. Merge with `merge_checkpoint` or `recipes/convert.py merge`.
    """
    if ctx.mesh.pp > 1:
        raise NotImplementedError("per-rank checkpoints of pipeline stages are not implemented")
    c = ctx.mesh.coords(ctx.rank)
    writer = c["dp"] == 0 and c["cp"] == 0
    if writer:
        local = tree_flatten_with_names(params)
        arrays = {hf_name(n): encode_tensor(x.asnumpy(), dtype) for n, x in local.items()}
        target = os.path.join(path, RANK_FILE.format(rank=ctx.tp_rank))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write_safetensors(target, arrays, metadata={"format": "pt", "tc2_tp_rank": str(ctx.tp_rank),
                                                    "tc2_tp": str(ctx.tp)})
    if ctx.mesh.size > 1:
        barrier()
    if writer and ctx.tp_rank == 0:
        full = tree_flatten_with_names(param_specs(cfg))
        layout = {"format": "tc2-tp", "version": 1, "tp": ctx.tp, "dtype": dtype, "files": RANK_FILE,
                  "tensors": {hf_name(n): {"shape": list(s.shape), "split_dim": split_dim(n) if ctx.tp > 1 else None}
                              for n, s in full.items()}}
        _write_json(os.path.join(path, "config.json"), {**cfg.to_hf(), "torch_dtype": dtype})
        _write_json(os.path.join(path, LAYOUT), layout)
    if ctx.mesh.size > 1:
        barrier()


def _write_json(final: str, obj) -> None:
    tmp = f"{final}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, final)


def merge_checkpoint(path: str, dest: str, *, dtype: str = "float32", max_shard_size=None):
    """A tc2 tensor-parallel directory -> one HF directory (what `convert.py merge` does)."""
    from tc2.checkpoint.convert import convert_checkpoint
    return convert_checkpoint(path, dest, to="hf", dtype=dtype, max_shard_size=max_shard_size,
                              expect=("tc2-tp",), progress=False)
