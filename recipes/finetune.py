"""Fine-tune TeleChat2: a thin shell over `tc2.train_loop.fit`.

    python recipes/finetune.py --config recipes/configs/finetune_tiny.yaml
    python recipes/finetune.py --config recipes/configs/finetune_tiny.yaml --optim.lr 1e-4 \\
        --train.steps 50 --train.resume true

Data: a jsonl file (MindFormers {input, output}, inline turns, or the official dialog format;
packed here with tc2.data) or a MindRecord written by recipes/preprocess.py / MindFormers.
Model: a preset (`model.preset`, with `model.overrides`) initialised from `model.init_seed`,
or official HF weights (`model.load DIR`). Everything this script does is a few library calls
(`build_run` then `fit`); see `tc2.train_loop` for the loop, logging, eval and checkpoints.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

from jsonargparse import ArgumentParser

from tc2.train.loop import OptimConfig, ParallelConfig, TrainConfig, fit


@dataclass
class ModelArgs:
    preset: Optional[str] = "tiny"            # tc2.config.PRESETS: tiny, telechat2_7b/35b/115b
    load: Optional[str] = None                # official HF dir: start from these weights
    dtype: str = "float32"                    # compute dtype: float32 | float16 | bfloat16
    overrides: Dict[str, Any] = field(default_factory=dict)   # ModelConfig fields for the preset
    init_seed: int = 0                        # parameter init seed (preset only)


@dataclass
class DataArgs:
    train: Optional[str] = None               # .jsonl, or a MindRecord file / directory
    eval: Optional[str] = None                # held-out data in the same formats
    eval_fraction: float = 0.0                # or: hold out this fraction of the train rows
    tokenizer: Optional[str] = None           # SentencePiece model (needed for jsonl)
    seq_length: int = 8192                    # tokens per row (rows hold seq_length + 1)
    document_masking: bool = False            # attention stops at packed-conversation borders
    pack_seed: int = 2024                     # MindFormers' packing shuffle seed
    shuffle_seed: int = 0                     # batch order seed (per epoch)
    skip_bad_lines: bool = False              # jsonl: skip (and list) bad lines instead of failing


@dataclass
class RunArgs:
    steps: Optional[int] = None               # optimizer steps; default: epochs over the data
    epochs: Optional[int] = None              # passes over the train rows (default 1)
    global_batch: int = 8                     # rows per optimizer step
    micro_batch: int = 1                      # rows per forward/backward (accumulation)
    out_dir: str = "runs/finetune"
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep: int = 3
    resume: bool = False
    stop_after: Optional[int] = None
    loss_scale: Union[str, float] = "auto"
    loss_scale_growth_interval: int = 2000
    max_shard_size: Optional[str] = None
    plot: bool = True


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="finetune.py", description=__doc__.split("\n")[0], default_config_files=[])
    p.add_argument("--config", action="config", help="YAML with the groups below")
    p.add_class_arguments(ModelArgs, "model")
    p.add_class_arguments(DataArgs, "data")
    p.add_class_arguments(OptimConfig, "optim")
    p.add_class_arguments(RunArgs, "train")
    p.add_class_arguments(ParallelConfig, "parallel",
                          help="layout of the release (read by the SPMD trainer; single process here)")
    return p


def build_run(model: ModelArgs, data: DataArgs, run: RunArgs, parallel: ParallelConfig, log=print):
    """-> (params, cfg, train batches, eval batches or None, TrainConfig): the library calls."""
    from tc2.checkpoint.hf import load_hf
    from tc2.config import PRESETS
    from tc2.model import count_params, init_params
    from tc2.data.records import BatchIterator
    from tc2.data.tokenizer import Tokenizer
    from tc2.train.batches import TrainBatches, eval_batches, load_rows, split_rows

    if parallel.size > 1:
        raise ValueError(f"parallel layout {parallel.describe()} needs {parallel.size} devices: run it "
                         "with the SPMD trainer under msrun (tc2.parallel_train); this recipe trains in "
                         "one process (set parallel.dp/tp/pp/cp to 1)")
    if model.load:
        params, cfg = load_hf(model.load)
        cfg = cfg.replace(dtype=model.dtype, **model.overrides)
        log(f"model: {model.load} ({count_params(cfg):,} parameters, compute {cfg.dtype})")
    else:
        if model.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {model.preset!r}")
        cfg = PRESETS[model.preset](**{**model.overrides, "dtype": model.dtype})
        params = init_params(cfg, model.init_seed)
        log(f"model: preset {model.preset} ({count_params(cfg):,} parameters, compute {cfg.dtype}), "
            f"init seed {model.init_seed}")
    if cfg.dtype == "bfloat16" and ms_device() == "CPU":
        raise ValueError("model.dtype bfloat16 has no CPU compute kernels in MindSpore 2.10: use float32 "
                         "or float16 on CPU (bfloat16 is the Ascend setting of the release configs)")
    if data.seq_length > cfg.training_seqlen:
        log(f"note: data.seq_length {data.seq_length} > the model's training_seqlen "
            f"{cfg.training_seqlen}: dynamic-NTK RoPE scaling is active while training "
            "(set model.overrides training_seqlen/base_seqlen/seq_length for a model trained from scratch)")
    if not data.train:
        raise ValueError("data.train is required (a .jsonl file or a MindRecord)")
    tokenizer = Tokenizer(data.tokenizer) if data.tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {data.tokenizer} has {tokenizer.vocab_size} pieces but the model's "
                         f"vocab_size is {cfg.vocab_size}")
    pad_id = tokenizer.token_id("<_pad>") if tokenizer is not None else cfg.pad_token_id
    kw = dict(tokenizer=tokenizer, document_masking=data.document_masking, pack_seed=data.pack_seed,
              on_error="skip" if data.skip_bad_lines else "raise", log=log)
    rows = load_rows(data.train, data.seq_length, **kw)
    eval_rows = load_rows(data.eval, data.seq_length, **kw) if data.eval else None
    if data.eval_fraction:
        if eval_rows is not None:
            raise ValueError("give data.eval or data.eval_fraction, not both")
        rows, eval_rows = split_rows(rows, data.eval_fraction, seed=data.shuffle_seed)
    if run.global_batch % run.micro_batch:
        raise ValueError(f"train.global_batch {run.global_batch} is not a multiple of train.micro_batch "
                         f"{run.micro_batch}")
    n_rows = len(rows["input_ids"])
    if n_rows < run.global_batch:
        raise ValueError(f"{data.train}: {n_rows} packed rows cannot fill one global batch of "
                         f"{run.global_batch}; lower train.global_batch")
    per_epoch = n_rows // run.global_batch
    if run.steps is not None and run.epochs is not None:
        raise ValueError("give train.steps or train.epochs, not both")
    steps = run.steps if run.steps is not None else per_epoch * (run.epochs or 1)
    it = BatchIterator(rows, run.global_batch, seed=data.shuffle_seed, num_epochs=None)
    batches = TrainBatches(it, pad_id)
    evals = eval_batches(eval_rows, run.micro_batch, pad_id) if eval_rows is not None else None
    log(f"data: {n_rows} train rows x {data.seq_length} tokens, {per_epoch} steps per epoch of "
        f"{run.global_batch} rows ({run.global_batch // run.micro_batch} micro-batches of "
        f"{run.micro_batch}); {steps} steps (~{steps / max(per_epoch, 1):.2f} epochs)"
        + (f"; eval {len(eval_rows['input_ids'])} rows" if eval_rows is not None else ""))
    train = TrainConfig(
        out_dir=run.out_dir, steps=steps, micro_batches=run.global_batch // run.micro_batch,
        log_every=run.log_every, eval_every=run.eval_every, save_every=run.save_every, keep=run.keep,
        resume=run.resume, stop_after=run.stop_after, loss_scale=run.loss_scale,
        loss_scale_growth_interval=run.loss_scale_growth_interval, max_shard_size=run.max_shard_size,
        plot=run.plot)
    return params, cfg, batches, evals, train


def ms_device() -> str:
    import mindspore as ms
    return ms.get_context("device_target")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    init = parser.instantiate(args)
    if init.parallel.size > 1:                      # [parallel] SPMD under msrun (tc2.parallel_fit)
        return main_parallel(args, init)
    t0 = time.perf_counter()
    try:
        params, cfg, batches, evals, train = build_run(init.model, init.data, init.train, init.parallel)
        config_record = json.loads(json.dumps(args.as_dict(), default=str))
        config_record.pop("config", None)
        result = fit(params, cfg, batches, optim=init.optim, train=train, eval_batches=evals,
                     meta={"recipe": "finetune", "config": config_record})
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    last = next((r for r in reversed(result.history) if r.get("kind") == "eval"), None)
    summary = f"done in {time.perf_counter() - t0:.1f}s; checkpoint {result.checkpoint}"
    if last:
        summary += f"; eval loss {last['eval_loss']:.4f} (perplexity {last['eval_ppl']:.2f})"
    print(summary)
    print(f"metrics: {os.path.join(train.out_dir, 'metrics.jsonl')}")
    return 0


# ---- [parallel] --parallel.dp/cp/tp > 1: the SPMD loop, one process per device under msrun ----
def main_parallel(args, init) -> int:
    """Every msrun worker runs this with the same arguments; rank 0 logs and merges checkpoints.

    msrun --worker_num=N --local_worker_num=N --master_port=PORT --log_dir=LOGS --join=True \\
        recipes/finetune.py --config ... --parallel.dp 2 --parallel.tp 2 (N = dp*cp*tp)
    """
    from tc2.parallel.spmd_fit import context_for, fit_parallel
    t0 = time.perf_counter()
    try:
        ctx = context_for(init.parallel)             # first: msrun's scheduler process stops here
        log = print if ctx.rank == 0 else (lambda msg: None)
        params, cfg, batches, evals, train = build_run(init.model, init.data, init.train, ParallelConfig(),
                                                       log=log)
        config_record = json.loads(json.dumps(args.as_dict(), default=str))
        config_record.pop("config", None)
        result = fit_parallel(params, cfg, batches, optim=init.optim, train=train, parallel=init.parallel,
                              eval_batches=evals, meta={"recipe": "finetune", "config": config_record}, log=log)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    log(f"done in {time.perf_counter() - t0:.1f}s; merged checkpoint {result.checkpoint}")
    return 0
# ---- [parallel] end ----


if __name__ == "__main__":
    sys.exit(main())
