"""The training loop: `fit(params, cfg, batches, ...)` with logging, eval, checkpoints, resume.

A library function, not a Trainer object: the recipe (recipes/finetune.py) only parses its
arguments and calls `fit`; a researcher can call it the same way from Python:

    result = fit(params, cfg, batches, optim=OptimConfig(lr=1e-4),
                 train=TrainConfig(out_dir="runs/x", steps=200, eval_every=50),
                 eval_batches=held_out)

Every `log_every` steps it prints a progress line (step, loss, lr, grad norm, tokens/s,
elapsed, ETA) and appends the same record to `out_dir/metrics.jsonl`; eval records (loss
and perplexity over the whole eval set, token-weighted) go to the same file. Checkpoints are
`out_dir/step_*` directories (tc2.train_checkpoint); `resume=True` continues from the newest
complete one, restoring the data iterator's cursor, so N straight steps and n + resume +
(N - n) steps give the same parameters bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from tc2.config import ModelConfig
from tc2.optim import (GradientTransformation, adamw, chain, clip_by_global_norm, constant_schedule,
                    cosine_schedule, decay_matrices, exclude_names)
from tc2.step import (LossScaleConfig, TrainState, default_loss_scale, eval_loss_sums, init_loss_scale,
                    init_train_state, split_micro_batches, train_step)
from tc2.train.checkpoints import latest_checkpoint, load_checkpoint, list_checkpoints, save_checkpoint

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(FloatingPointError):
    """A step produced a non-finite loss or gradient without loss scaling: the run stops."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + global-norm clipping + lr schedule. Defaults: the release's recipe (spec §9)."""
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

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {self.schedule!r}")


@functools.lru_cache(maxsize=32)
def make_optimizer(ocfg: OptimConfig, total_steps: int) -> GradientTransformation:
    """The optimizer an OptimConfig describes, schedule spanning `total_steps`. Cached, so equal
    configs give the same object and the compiled train step is reused (e.g. on resume)."""
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
    opt = adamw(schedule, ocfg.b1, ocfg.b2, ocfg.eps, ocfg.weight_decay, mask=mask)
    return chain(clip_by_global_norm(ocfg.clip_norm), opt) if ocfg.clip_norm else opt


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


@dataclass(frozen=True)
class ParallelConfig:
    """A training layout (the release's, spec §9). `fit` runs one process and needs size 1; the
    SPMD trainer (tc2.parallel_train under msrun) and the memory planner read the rest."""
    dp: int = 1                               # data parallel
    tp: int = 1                               # tensor (model) parallel
    pp: int = 1                               # pipeline stages
    cp: int = 1                               # context (sequence-sharded ring attention)
    micro_batches: int = 1                    # pipeline micro batches (MF micro_batch_num)
    sequence_parallel: bool = True            # shard norm/residual activations over tp
    recompute: str = "none"                   # "none" | "selective" | "full"
    zero: int = 0                             # optimizer-state sharding stage over dp (MF parallel optimizer: 1)

    def __post_init__(self):
        for name in ("dp", "tp", "pp", "cp", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"parallel.recompute must be none/selective/full, got {self.recompute!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero must be 0-3, got {self.zero}")

    @property
    def size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def describe(self) -> str:
        return f"dp={self.dp} tp={self.tp} pp={self.pp} cp={self.cp}"

    def mesh(self):
        from tc2.parallel.sharding import Mesh
        return Mesh(dp=self.dp, cp=self.cp, tp=self.tp, pp=self.pp)


@dataclass
class FitResult:
    state: TrainState
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


def evaluate(params, cfg: ModelConfig, batches: Iterable[dict]) -> Dict[str, float]:
    """Token-weighted loss over every batch -> {"eval_loss", "eval_ppl", "eval_tokens"}."""
    total, count = 0.0, 0.0
    for batch in batches:
        s, c = eval_loss_sums(params, batch, cfg)
        total, count = total + s, count + c
    if count == 0:
        raise ValueError("evaluation data has no loss tokens (all labels are -100)")
    loss = total / count
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": int(count)}


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _MetricsLog:
    """metrics.jsonl: one JSON record per line, flushed as written; on resume, records past
    the resumed step are dropped first (they belong to the abandoned continuation)."""

    def __init__(self, out_dir: str, resume_step: Optional[int]):
        self.path = os.path.join(out_dir, METRICS_FILE)
        kept = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue                  # a torn last line from a crash
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        self.records: List[dict] = []

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.records.append(record)


def fit(params, cfg: ModelConfig, batches: Iterable[dict], *,
        optim: Union[OptimConfig, GradientTransformation] = OptimConfig(),
        train: TrainConfig = TrainConfig(), eval_batches: Optional[Iterable[dict]] = None,
        meta: Optional[dict] = None, log: Callable[[str], None] = print) -> FitResult:
    """Train `params` (float32 pytree) for `train.steps` optimizer steps over `batches`.

    `batches`: an iterator of dicts {"tokens", "labels"[, "positions", "segment_ids"]}, each
    [B, T] (split into `train.micro_batches`) or [k, B, T]. If it has `state_dict()` /
    `load_state_dict()` its cursor is checkpointed; otherwise resume skips the batches already
    used. `eval_batches`: a re-iterable of batches (e.g. a list). `meta`: JSON-able extras
    stored in every checkpoint's state.json (e.g. the recipe's full config).
    """
    if isinstance(optim, OptimConfig):
        optimizer, optim_record = make_optimizer(optim, train.steps), dataclasses.asdict(optim)
    else:
        optimizer, optim_record = optim, None
    loss_scale = resolve_loss_scale(train, cfg)
    os.makedirs(train.out_dir, exist_ok=True)
    it = iter(batches)
    state, ckpt, tokens_seen = None, None, 0
    if train.resume:
        ckpt, refused = latest_checkpoint(train.out_dir)
        for why in refused:
            log(f"resume: skipping {why}")
        if ckpt is None:
            log(f"resume: no complete checkpoint in {train.out_dir}; starting from step 0")
        else:
            state, _, record = load_checkpoint(ckpt, optimizer, expect_config=cfg)
            state = _match_loss_scale(state, loss_scale, log)
            tokens_seen = int(record.get("tokens_seen", 0))
            _restore_data(batches, it, record, int(state.step.asnumpy()), log)
            log(f"resume: continuing from {ckpt} (step {int(state.step.asnumpy())})")
    elif list_checkpoints(train.out_dir):
        raise FileExistsError(f"{train.out_dir} already holds checkpoints "
                              f"({os.path.basename(list_checkpoints(train.out_dir)[-1][1])}, ...): "
                              "pass resume=True (--train.resume true) to continue that run, or "
                              "choose another out_dir")
    if state is None:
        state = init_train_state(params, optimizer, loss_scale)
    start = int(state.step.asnumpy())
    metrics_log = _MetricsLog(train.out_dir, start if ckpt else None)
    base_meta = {**(meta or {}), "optim": optim_record, "train": dataclasses.asdict(train)}

    has_cursor = hasattr(batches, "state_dict")

    def save(state, last_metrics, cursor=None):
        extra = {**base_meta, "tokens_seen": tokens_seen, "metrics": last_metrics}
        if has_cursor:
            extra["data"] = cursor if cursor is not None else batches.state_dict()
        path = save_checkpoint(train.out_dir, state, cfg, meta=extra, keep=train.keep,
                               max_shard_size=train.max_shard_size)
        log(f"checkpoint: {path}")
        return path

    def run_eval(step):
        rec = {"kind": "eval", "step": step, **evaluate(state.params, cfg, eval_batches)}
        metrics_log.write(rec)
        log(f"eval  step {step:>6} | eval loss {rec['eval_loss']:.4f} | "
            f"perplexity {rec['eval_ppl']:.3f} | {rec['eval_tokens']} tokens")

    window = _new_window()
    t_start, t_first = time.perf_counter(), None       # t_first: wall clock after the first step
    last, saved_step = {}, start if ckpt else None
    step = start
    end = train.steps if train.stop_after is None else min(train.steps, train.stop_after)
    while step < end:
        cursor = batches.state_dict() if has_cursor else None      # before this step's batch
        try:
            batch = next(it)
        except StopIteration:
            log(f"data exhausted after step {step} (of {train.steps} planned)")
            break
        if train.micro_batches > 1 and np.ndim(batch["tokens"]) == 2:
            batch = split_micro_batches(batch, train.micro_batches)
        t0 = time.perf_counter()
        try:
            state, m = train_step(state, batch, cfg, optimizer, loss_scale)
        except KeyboardInterrupt:                        # `state` is still the last complete step
            log(f"interrupted during step {step + 1}: saving step {step} (resume=True continues)")
            if saved_step != step:
                save(state, last, cursor)
            raise
        dt = time.perf_counter() - t0
        step += 1
        if m["skipped"] and loss_scale is None:
            raise NonFiniteLossError(
                f"step {step}: loss {m['loss']} / grad norm {m['grad_norm']} is not finite; the run "
                f"stopped without applying it. Last good checkpoint: {saved_path(train.out_dir, ckpt)}")
        tokens_seen += m["tokens"]
        first = step == start + 1
        if first:                                        # the first step includes compilation
            t_first = time.perf_counter()
        if not m["skipped"]:
            window["loss_sum"] += m["loss"] * m["loss_tokens"]
            window["loss_tokens"] += m["loss_tokens"]
        window["tokens"] += m["tokens"]
        window["time"] += dt
        window["steps"] += 1
        window["skipped"] += int(m["skipped"])
        last = m
        if first or step % train.log_every == 0 or step == end:
            rec = _train_record(step, m, window, tokens_seen, time.perf_counter() - t_start)
            metrics_log.write(rec)
            done = step - start - 1                      # wall time per step since the first,
            per_step = (time.perf_counter() - t_first) / done if done else float("nan")  # evals, saves in
            log(_progress_line(rec, train.steps, per_step * (end - step), first, dt))
            window = _new_window()
        if eval_batches is not None and train.eval_every and step % train.eval_every == 0:
            run_eval(step)
        if train.save_every and step % train.save_every == 0:
            ckpt, saved_step = save(state, last), step
    if eval_batches is not None and (not train.eval_every or step % train.eval_every != 0) and step > start:
        run_eval(step)
    if saved_step != step:
        ckpt = save(state, last)
    if train.plot:
        from tc2.train.plot import plot_loss_curve
        png, why = plot_loss_curve(metrics_log.path)
        log(f"loss curve: {png}" if png else f"loss curve: not written ({why})")
    return FitResult(state=state, cfg=cfg, history=metrics_log.records, checkpoint=ckpt)


def saved_path(out_dir: str, ckpt: Optional[str]) -> str:
    return ckpt if ckpt else f"none (nothing saved in {out_dir} yet)"


def _new_window() -> dict:
    return {"loss_sum": 0.0, "loss_tokens": 0, "tokens": 0, "time": 0.0, "steps": 0, "skipped": 0}


def _train_record(step, m, window, tokens_seen, elapsed) -> dict:
    loss = window["loss_sum"] / window["loss_tokens"] if window["loss_tokens"] else float("nan")
    rec = {"kind": "train", "step": step, "loss": loss, "lr": m["lr"], "grad_norm": m["grad_norm"],
           "tokens_per_s": window["tokens"] / window["time"] if window["time"] else 0.0,
           "tokens": tokens_seen, "loss_tokens": window["loss_tokens"], "steps": window["steps"],
           "skipped": window["skipped"], "elapsed_s": elapsed}
    if "loss_scale" in m:
        rec["loss_scale"] = m["loss_scale"]
    return rec


def _progress_line(rec, total, eta, first, dt) -> str:
    width = len(str(total))
    parts = [f"step {rec['step']:>{width}}/{total}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}",
             f"gnorm {rec['grad_norm']:.3f}", f"{rec['tokens_per_s']:,.0f} tok/s",
             f"elapsed {_fmt_time(rec['elapsed_s'])}", f"ETA {_fmt_time(eta)}"]
    if "loss_scale" in rec:
        parts.append(f"scale {rec['loss_scale']:g}")
    if rec["skipped"]:
        parts.append(f"skipped {rec['skipped']}")
    line = " | ".join(parts)
    return line + (f" (first step of this run: {dt:.1f}s, including any compilation)" if first else "")


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
