"""`fit_parallel`: the training loop of `tc2.train_loop.fit` on an SPMD mesh under msrun.

    msrun --worker_num=4 --local_worker_num=4 --master_port=8118 --log_dir=logs --join=True \\
        recipes/finetune.py --config recipes/configs/finetune_tiny.yaml --parallel.dp 2 --parallel.tp 2

Every rank runs this with the same arguments and the same (seeded) batch iterator, so each
sees the same global batches and takes its own rows / sequence share; rank 0 logs and writes
metrics.jsonl. Checkpoints: each tp rank's shard (dp = cp = 0 replica) goes to
`out_dir/tp_step_N/` (tc2's tensor-parallel layout), and at the end rank 0 merges the last one
into the HF directory `out_dir/hf_step_N/` (what `recipes/convert.py merge` does).
Not here yet: resume of a parallel run (optimizer state is not saved per rank), pipeline
execution, ZeRO sharding and recompute (the memory plan models them; execution is plain).
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable, Dict, Iterable, Optional

import mindspore as ms
import numpy as np

from tc2.config import ModelConfig
from tc2.parallel.collectives import SpmdContext, shard_batch, spmd_context, spmd_loss_sums
from tc2.parallel.spmd_step import merge_checkpoint, save_checkpoint, spmd_train_step
from tc2.parallel.sharding import shard_params
from tc2.step import as_micro_batches, init_train_state, split_micro_batches
from tc2.train.loop import (FitResult, OptimConfig, ParallelConfig, TrainConfig, _MetricsLog, _new_window,
                         _progress_line, _train_record, make_optimizer)
from tc2.train.checkpoints import list_checkpoints


def _quiet(_msg: str) -> None:
    pass


def context_for(parallel: ParallelConfig, layout: str = "zigzag") -> SpmdContext:
    """This rank's SPMD context for a ParallelConfig (clear errors for what does not run)."""
    if parallel.pp > 1:
        raise ValueError(f"parallel.pp={parallel.pp}: pipeline execution is not implemented (the layout "
                         "and memory plan support pp; train with pp=1)")
    return spmd_context(parallel.mesh(), layout=layout)


def spmd_evaluate(params, cfg: ModelConfig, ctx: SpmdContext, batches: Iterable[dict]) -> Dict[str, float]:
    """Token-weighted eval loss over global batches, every rank computing its share."""
    fn = _eval_fn(cfg, ctx)
    total, count = 0.0, 0.0
    for batch in batches:
        mb = as_micro_batches(batch)
        for i in range(mb["tokens"].shape[0]):
            local = shard_batch({k: v[i] for k, v in mb.items()}, ctx.mesh, ctx.rank, layout=ctx.layout)
            s = fn(ms.mutable(params), *[ms.Tensor(local[k]) if k in local else None for k in
                                         ("tokens", "labels", "positions", "segment_ids", "seq_len")])
            total += float(s[0].asnumpy())
            count += float(s[1].asnumpy())
    if count == 0:
        raise ValueError("evaluation data has no loss tokens (all labels are -100)")
    loss = total / count
    return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 700.0))), "eval_tokens": int(count)}


@functools.lru_cache(maxsize=8)
def _eval_fn(cfg: ModelConfig, ctx: SpmdContext):
    """(loss sum, loss-token count) over the whole mesh, compiled once per (config, context)."""
    both = ctx.mesh.dp * ctx.mesh.cp > 1

    @ms.jit
    def sums(params, tokens, labels, positions, segment_ids, seq_len):
        s, n = spmd_loss_sums(params, tokens, labels, cfg, ctx, positions=positions, seq_len=seq_len,
                              segment_ids=segment_ids)
        if both:
            return ctx.sum_dpcp(s.reshape(1))[0], ctx.sum_dpcp(n.reshape(1))[0]
        return s, n
    return sums


def fit_parallel(params, cfg: ModelConfig, batches: Iterable[dict], *, optim: OptimConfig = OptimConfig(),
                 train: TrainConfig = TrainConfig(), parallel: ParallelConfig = ParallelConfig(),
                 eval_batches: Optional[Iterable[dict]] = None, meta: Optional[dict] = None,
                 log: Callable[[str], None] = print, layout: str = "zigzag") -> FitResult:
    """Train full `params` (every rank passes the same) on the mesh of `parallel`; see the module doc."""
    if not isinstance(optim, OptimConfig):
        raise TypeError("fit_parallel needs an OptimConfig (the global-norm clip is done across ranks)")
    ctx = context_for(parallel, layout)
    say = log if ctx.rank == 0 else _quiet
    if train.resume:
        raise ValueError("resume is not implemented for parallel runs yet (per-rank optimizer state is not "
                         "checkpointed); start a new out_dir, or load the merged hf_step_* weights")
    if list_checkpoints(train.out_dir) or any(e.startswith(("tp_step_", "hf_step_"))
                                               for e in (os.listdir(train.out_dir) if os.path.isdir(train.out_dir) else [])):
        raise FileExistsError(f"{train.out_dir} already holds checkpoints: choose another out_dir")
    planned = [f"{k}={getattr(parallel, k)}" for k, d in (("zero", 0), ("recompute", "none"), ("micro_batches", 1))
               if getattr(parallel, k) != d]
    if planned:
        say(f"note: {', '.join(planned)} are used by the memory plan only; execution keeps full state per rank")
    optimizer = make_optimizer(optim, train.steps)
    state = init_train_state(shard_params(params, cfg, ctx.mesh, ctx.rank), optimizer)
    say(f"parallel: {ctx.mesh} on {ctx.mesh.size} processes ({layout} sequence layout); rank 0 logs")
    if ctx.rank == 0:
        os.makedirs(train.out_dir, exist_ok=True)
    metrics_log = None
    if ctx.rank == 0:
        metrics_log = _MetricsLog(train.out_dir, None)
        with open(os.path.join(train.out_dir, "run.json"), "w", encoding="utf-8") as f:
            json.dump({"parallel": str(ctx.mesh), "meta": meta or {}}, f, indent=2, default=str)
    history = []

    def write(rec):
        history.append(rec)
        if metrics_log is not None:
            metrics_log.write(rec)

    def save(step):
        path = os.path.join(train.out_dir, f"tp_step_{step:08d}")
        save_checkpoint(state.params, cfg, ctx, path)
        say(f"checkpoint: {path} ({ctx.tp} tensor-parallel shards)")
        return path

    it = iter(batches)
    window, last, step, saved = _new_window(), {}, 0, None
    t_start = t_first = time.perf_counter()
    tokens_seen = 0
    end = train.steps if train.stop_after is None else min(train.steps, train.stop_after)
    while step < end:
        try:
            batch = next(it)
        except StopIteration:
            say(f"data exhausted after step {step} (of {train.steps} planned)")
            break
        if train.micro_batches > 1 and np.ndim(batch["tokens"]) == 2:
            batch = split_micro_batches(batch, train.micro_batches)
        t0 = time.perf_counter()
        state, m = spmd_train_step(state, batch, cfg, optimizer, ctx, max_grad_norm=optim.clip_norm or None)
        dt = time.perf_counter() - t0
        step += 1
        if m["skipped"]:
            raise FloatingPointError(f"step {step}: loss {m['loss']} / grad norm {m['grad_norm']} is not finite")
        tokens_seen += m["tokens"]
        first = step == 1
        if first:
            t_first = time.perf_counter()
        window["loss_sum"] += m["loss"] * m["loss_tokens"]
        window["loss_tokens"] += m["loss_tokens"]
        window["tokens"] += m["tokens"]
        window["time"] += dt
        window["steps"] += 1
        last = m
        if first or step % train.log_every == 0 or step == train.steps:
            rec = _train_record(step, m, window, tokens_seen, time.perf_counter() - t_start)
            write(rec)
            per_step = (time.perf_counter() - t_first) / (step - 1) if step > 1 else dt
            say(_progress_line(rec, train.steps, per_step * (end - step), first, dt))
            window = _new_window()
        if eval_batches is not None and train.eval_every and step % train.eval_every == 0:
            rec = {"kind": "eval", "step": step, **spmd_evaluate(state.params, cfg, ctx, eval_batches)}
            write(rec)
            say(f"eval  step {step:>6} | eval loss {rec['eval_loss']:.4f} | perplexity {rec['eval_ppl']:.3f}")
        if train.save_every and step % train.save_every == 0:
            saved = (step, save(step))
    if eval_batches is not None and (not train.eval_every or step % train.eval_every != 0) and step > 0:
        rec = {"kind": "eval", "step": step, **spmd_evaluate(state.params, cfg, ctx, eval_batches)}
        write(rec)
        say(f"eval  step {step:>6} | eval loss {rec['eval_loss']:.4f} | perplexity {rec['eval_ppl']:.3f}")
    if saved is None or saved[0] != step:
        saved = (step, save(step))
    merged = os.path.join(train.out_dir, f"hf_step_{step:08d}")
    if ctx.rank == 0:
        merge_checkpoint(saved[1], merged)
        say(f"merged: {merged} (an HF directory: tc2.load_hf / the official code)")
    return FitResult(state=state, cfg=cfg, history=history, checkpoint=merged)
