"""The training loop: one `fit` for one process and for every process of an msrun job.

A library function, not a Trainer object: the recipe (recipes/finetune.py) only parses its
arguments and calls `fit`; a researcher can call it the same way from Python:

    result = fit(params, cfg, batches, optim=OptimConfig(lr=1e-4),
                 train=TrainConfig(out_dir="runs/x", steps=200, eval_every=50),
                 eval_batches=held_out)                      # + parallel=ParallelConfig(dp=2, tp=2)

Under msrun every process runs `fit` with the same arguments and the same (seeded) batch
iterator: each sees the same global batches and `train_step` takes its share (`tc2.context`).
Every `log_every` steps rank 0 prints a progress line (step, loss, lr, grad norm, tokens/s,
elapsed, ETA) and appends the same record to `out_dir/metrics.jsonl`; eval records (loss and
perplexity over the whole eval set, token-weighted) go to the same file. Checkpoints are
`out_dir/step_*` HF directories plus optimizer state (`tc2.train.checkpoints`), written in one
format at every scale; `resume=True` continues from the newest complete one, restoring the
data iterator's cursor, so N straight steps and n + resume + (N - n) steps give the same
parameters bit for bit, in one process or many.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Union

import numpy as np

from tc2.config import ModelConfig
from tc2.context import LOCAL, ParallelContext
from tc2.optim import GradientTransformation, OptimConfig, make_optimizer
from tc2.parallel.collectives import context_for, local_params
from tc2.parallel.mesh import ParallelConfig
from tc2.step import (LossScaleConfig, TrainState, default_loss_scale, eval_loss_sums, init_loss_scale,
                      donatable, init_train_state, split_micro_batches, train_step)
from tc2.update import can_donate
from tc2.train.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from tc2.train.guard import StopSignals, TrainingInterrupted, out_dir_lock
from tc2.train.log import MetricsLog, Window, eval_line, progress_line


class NonFiniteLossError(FloatingPointError):
    """A step produced a non-finite loss or gradient without loss scaling: the run stops."""


@dataclass(frozen=True)
class TrainConfig:
    """What the loop does around the step. Steps count optimizer steps (one batch each)."""
    out_dir: str = "runs/finetune"
    steps: int = 100
    micro_batches: int = 1                    # gradient accumulation: split each batch in k
    log_every: int = 10
    eval_every: int = 0                       # 0: evaluate only at the end (if eval data)
    save_every: int = 0                       # 0: save only at the end
    keep: int = 3                             # newest complete checkpoints kept
    resume: bool = False                      # continue from the newest complete checkpoint
    stop_after: Optional[int] = None          # end this run (with a checkpoint) after this step;
                                              # the schedule still spans `steps` (time-limited jobs)
    loss_scale: Union[str, float] = "auto"    # "auto" (float16 only), "none", or initial scale
    loss_scale_growth_interval: int = 2000
    max_shard_size: Optional[str] = None      # e.g. "5GB": shard checkpoint weights
    plot: bool = True                         # loss_curve.png next to metrics.jsonl at the end

    def __post_init__(self):
        for name in ("steps", "micro_batches", "log_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class FitResult:
    state: TrainState                         # this process's (local) state
    cfg: ModelConfig
    history: List[dict]                       # every metrics record written by this call
    checkpoint: Optional[str]                 # the last checkpoint written or resumed from


def resolve_loss_scale(train: TrainConfig, cfg: ModelConfig) -> Optional[LossScaleConfig]:
    ls = train.loss_scale
    if isinstance(ls, str):
        if ls == "auto":
            base = default_loss_scale(cfg)
            return None if base is None else dataclasses.replace(
                base, growth_interval=train.loss_scale_growth_interval)
        if ls == "none":
            return None
        try:
            ls = float(ls)
        except ValueError:
            raise ValueError(f"train.loss_scale must be 'auto', 'none' or a number, got {ls!r}") from None
    return LossScaleConfig(init_scale=float(ls), growth_interval=train.loss_scale_growth_interval)


def evaluate(params, cfg: ModelConfig, batches: Iterable[dict], *,
             ctx: ParallelContext = LOCAL) -> Dict[str, float]:
    """Token-weighted loss over every batch -> {"eval_loss", "eval_ppl", "eval_tokens"}."""
    total, count = 0.0, 0.0
    for batch in batches:
        s, c = eval_loss_sums(params, batch, cfg, ctx=ctx)
        total, count = total + s, count + c
    if count == 0:
        raise ValueError("evaluation data has no loss tokens (all labels are -100)")
    loss = total / count
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": int(count)}


def fit(params, cfg: ModelConfig, batches: Iterable[dict], *,
        optim: Union[OptimConfig, GradientTransformation] = OptimConfig(),
        train: TrainConfig = TrainConfig(), parallel: ParallelConfig = ParallelConfig(),
        eval_batches: Optional[Iterable[dict]] = None, meta: Optional[dict] = None,
        log: Callable[[str], None] = print) -> FitResult:
    """Train `params` (float32 pytree: the full model, or this process's shards) for
    `train.steps` optimizer steps over `batches`, on the layout `parallel` (under msrun when
    its size > 1).

    `batches`: an iterator of global batches {"tokens", "labels"[, "positions", "segment_ids"]},
    each [B, T] (split into `train.micro_batches`) or [k, B, T]. If it has `state_dict()` /
    `load_state_dict()` its cursor is checkpointed; otherwise resume skips the batches already
    used. `eval_batches`: a re-iterable of batches (e.g. a list). `meta`: JSON-able extras
    stored in every checkpoint's state.json (e.g. the recipe's full config). `optim`: an
    OptimConfig (AdamW, schedule, clipping), or any GradientTransformation (no clipping added).

    One run per out_dir: a second `fit` on it while this one runs raises OutDirInUse (naming
    the holder's pid). In one process, Ctrl-C / SIGTERM stop the run after the current step
    with a checkpoint of it and raise TrainingInterrupted (a KeyboardInterrupt) saying how to
    resume (tc2.train.guard).
    """
    ctx = context_for(parallel)
    run = _Run(cfg, batches, eval_batches, optim, train, ctx, meta, log, parallel.recompute)
    with out_dir_lock(train.out_dir, enabled=ctx.is_main), StopSignals(enabled=ctx.size == 1) as stop:
        run.stop = stop
        run.start(params)
        try:
            while run.step < run.end and stop.received is None:
                batch = run.next_batch()
                if batch is None:
                    break
                run.train_on(batch)
        except KeyboardInterrupt:                    # a second signal, or raised by the caller's code
            run.interrupted(during_step=True)
        if stop.received is not None:
            run.interrupted(during_step=False)
        return run.finish()


def _quiet(_msg: str) -> None:
    return None


class _Run:
    """One call of `fit`: the state, the data, the metrics log and the checkpoints it writes."""

    def __init__(self, cfg, batches, eval_batches, optim, train: TrainConfig, ctx: ParallelContext, meta, log,
                 recompute: str):
        self.cfg, self.batches, self.eval_batches, self.train, self.ctx = cfg, batches, eval_batches, train, ctx
        self.recompute = recompute
        self.say = log if ctx.is_main else _quiet
        if isinstance(optim, OptimConfig):
            self.optimizer, self.clip = make_optimizer(optim, train.steps), optim.clip
            optim_record = dataclasses.asdict(optim)
        else:
            self.optimizer, self.clip, optim_record = optim, None, None
        self.loss_scale = resolve_loss_scale(train, cfg)
        self.meta = {**(meta or {}), "optim": optim_record, "train": dataclasses.asdict(train)}
        self.it, self.has_cursor = iter(batches), hasattr(batches, "state_dict")
        self.end = train.steps if train.stop_after is None else min(train.steps, train.stop_after)
        self.window, self.last, self.tokens_seen = Window(), {}, 0
        self.ckpt, self.saved_step, self.cursor = None, None, (None, None)

    def start(self, params) -> None:
        """Resume from the newest complete checkpoint, or begin at step 0 (refusing an out_dir
        that already holds checkpoints)."""
        train, say, state = self.train, self.say, None
        os.makedirs(train.out_dir, exist_ok=True)
        if train.resume:
            self.ckpt, refused = latest_checkpoint(train.out_dir)
            for why in refused:
                say(f"resume: skipping {why}")
            if self.ckpt is None:
                say(f"resume: no complete checkpoint in {train.out_dir}; starting from step 0")
            else:
                state, _, record = load_checkpoint(self.ckpt, self.optimizer, expect_config=self.cfg, ctx=self.ctx)
                state = _match_loss_scale(state, self.loss_scale, say)
                self.tokens_seen = int(record.get("tokens_seen", 0))
                _restore_data(self.batches, self.it, record, int(state.step.asnumpy()), say)
                say(f"resume: continuing from {self.ckpt} (step {int(state.step.asnumpy())})")
        elif list_checkpoints(train.out_dir):
            raise FileExistsError(f"{train.out_dir} already holds checkpoints "
                                  f"({os.path.basename(list_checkpoints(train.out_dir)[-1][1])}, ...): "
                                  "pass resume=True (--train.resume true) to continue that run, or "
                                  "choose another out_dir")
        if state is None:
            state = init_train_state(local_params(params, self.cfg, self.ctx), self.optimizer, self.loss_scale,
                                     ctx=self.ctx)
        self.donate = can_donate(self.optimizer, self.ctx)
        if self.donate:
            state = donatable(state)                 # the buffers every step writes into, made once
        self.state, self.start_step = state, int(state.step.asnumpy())
        self.step = self.start_step
        self.saved_step = self.start_step if self.ckpt else None
        self.metrics = MetricsLog(train.out_dir, self.start_step if self.ckpt else None, write=self.ctx.is_main)
        if self.ctx.size > 1:
            say(f"parallel: dp={self.ctx.dp} cp={self.ctx.cp} tp={self.ctx.tp} on {self.ctx.size} processes "
                f"({self.ctx.layout} sequence layout); rank 0 logs")
        self.t_start, self.t_first = time.perf_counter(), None

    def next_batch(self) -> Optional[dict]:
        # (state step, data cursor) before this batch: an interruption saves the cursor that
        # matches the state it saves (`interrupted`)
        self.cursor = (self.step, self.batches.state_dict() if self.has_cursor else None)
        try:
            batch = next(self.it)
        except StopIteration:
            self.say(f"data exhausted after step {self.step} (of {self.train.steps} planned)")
            return None
        if self.train.micro_batches > 1 and np.ndim(batch["tokens"]) == 2:
            batch = split_micro_batches(batch, self.train.micro_batches)
        return batch

    def train_on(self, batch: dict) -> None:
        t0 = time.perf_counter()
        with self.stop.holding():                 # the step writes into self.state's buffers
            self.state, m = train_step(self.state, batch, self.cfg, self.optimizer, self.loss_scale,
                                       clip_norm=self.clip, ctx=self.ctx, recompute=self.recompute,
                                       donate=self.donate)
        dt = time.perf_counter() - t0
        self.step += 1
        if m.get("no_loss_tokens"):
            self.say(f"step {self.step}: the batch has no loss tokens (every label is -100): "
                     "skipped without an update")
        elif m["skipped"] and self.loss_scale is None:
            last = self.ckpt if self.ckpt else f"none (nothing saved in {self.train.out_dir} yet)"
            raise NonFiniteLossError(f"step {self.step}: loss {m['loss']} / grad norm {m['grad_norm']} is "
                                     f"not finite; the run stopped without applying it. Last good "
                                     f"checkpoint: {last}")
        self.tokens_seen += m["tokens"]
        first = self.step == self.start_step + 1
        if first:                                    # the first step includes compilation
            self.t_first = time.perf_counter()
        self.window.add(m, dt)
        self.last = m
        train = self.train
        if first or self.step % train.log_every == 0 or self.step == self.end:
            self.log_progress(m, dt if first else None)
        if self.eval_batches_due():
            self.run_eval()
        if train.save_every and self.step % train.save_every == 0:
            self.save()

    def log_progress(self, m: dict, first_step_s: Optional[float]) -> None:
        rec = self.window.record(self.step, m, self.tokens_seen, time.perf_counter() - self.t_start)
        self.metrics.write(rec)
        done = self.step - self.start_step - 1       # wall time per step since the first, evals
        per_step = (time.perf_counter() - self.t_first) / done if done else float("nan")   # and saves in
        self.say(progress_line(rec, self.train.steps, per_step * (self.end - self.step), first_step_s))
        self.window = Window()

    def eval_batches_due(self) -> bool:
        return bool(self.eval_batches is not None and self.train.eval_every
                    and self.step % self.train.eval_every == 0)

    def run_eval(self) -> None:
        rec = {"kind": "eval", "step": self.step, **evaluate(self.state.params, self.cfg, self.eval_batches,
                                                            ctx=self.ctx)}
        self.metrics.write(rec)
        self.say(eval_line(rec))

    def save(self, cursor=None) -> None:
        extra = {**self.meta, "tokens_seen": self.tokens_seen, "metrics": self.last}
        if self.has_cursor:
            extra["data"] = cursor if cursor is not None else self.batches.state_dict()
        self.ckpt = save_checkpoint(self.train.out_dir, self.state, self.cfg, ctx=self.ctx, meta=extra,
                                    keep=self.train.keep, max_shard_size=self.train.max_shard_size)
        self.saved_step = self.step
        self.say(f"checkpoint: {self.ckpt}")

    def interrupted(self, during_step: bool) -> None:
        """Save the last complete step (`self.state`, whatever moment the interruption came)
        with the data cursor that matches it, then raise TrainingInterrupted."""
        if self.ctx.size > 1:                        # saving needs every process: only save_every helps
            raise KeyboardInterrupt
        done = int(self.state.step.asnumpy())
        cursor_step, cursor = self.cursor
        if done != cursor_step:                      # the batch fetched after the cursor is in the state
            cursor = None                            # (or none was fetched): the cursor of now
        pending = during_step and done == cursor_step and done < self.end
        self.step = done
        self.say(f"interrupted {'during step ' + str(done + 1) if pending else 'after step ' + str(done)}: "
                 f"saving step {done}")
        if self.saved_step != done and done > self.start_step:
            self.save(cursor)
        where = self.ckpt or f"nothing saved in {self.train.out_dir} (no step completed)"
        msg = (f"interrupted after step {done}: checkpoint {where}; resume with --train.resume true "
               "(TrainConfig(resume=True) from Python)")
        self.say(msg)
        raise TrainingInterrupted(msg)

    def finish(self) -> FitResult:
        if self.eval_batches is not None and self.step > self.start_step and not self.eval_batches_due():
            self.run_eval()
        if self.saved_step != self.step:
            self.save()
        if self.train.plot and self.ctx.is_main:
            from tc2.train.plot import plot_loss_curve
            png, why = plot_loss_curve(self.metrics.path)
            self.say(f"loss curve: {png}" if png else f"loss curve: not written ({why})")
        return FitResult(state=self.state, cfg=self.cfg, history=self.metrics.records, checkpoint=self.ckpt)


def _match_loss_scale(state: TrainState, loss_scale, log) -> TrainState:
    if (state.loss_scale is None) == (loss_scale is None):
        return state
    if loss_scale is None:
        log("resume: this run uses no loss scaling; dropping the checkpoint's loss scale")
        return state.replace(loss_scale=None)
    log(f"resume: the checkpoint has no loss scale; starting at {loss_scale.init_scale:g}")
    return state.replace(loss_scale=init_loss_scale(loss_scale))


def _restore_data(batches, it, record: dict, step: int, log) -> None:
    if hasattr(batches, "load_state_dict") and "data" in record:
        batches.load_state_dict(record["data"])
        return
    log(f"resume: the data iterator has no saved cursor; skipping {step} batches")
    for _ in range(step):
        next(it)
