"""From a fine-tuning recipe's settings to the arguments of `fit`, as library calls.

    run = prepare_finetune(ModelSource(preset="tiny"), DataConfig(train="sft.jsonl", tokenizer="tok.model",
                           seq_length=512), RunConfig(global_batch=8, micro_batch=2), ParallelConfig())
    fit(run.params, run.cfg, run.batches, optim=OptimConfig(), train=run.train, parallel=..., eval_batches=run.evals)

`recipes/finetune.py` is this plus argument parsing. The settings are plain data (frozen
dataclasses with scalar fields): a YAML config can set values, never construct objects.
Under msrun each process prepares the same run; with tensor parallelism weights loaded from an
HF directory are read tensor by tensor and only the process's shards are kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from tc2.checkpoint.hf import load_hf
from tc2.config import PRESETS, ModelConfig
from tc2.context import ParallelContext
from tc2.data.records import BatchIterator
from tc2.data.tokenizer import Tokenizer
from tc2.model import count_params, init_params
from tc2.train.batches import TrainBatches, eval_batches, load_rows, split_rows
from tc2.train.loop import TrainConfig

Scalar = Union[bool, int, float, str, None]
DTYPES = ("float32", "float16", "bfloat16")


def check_ints(obj, group: str, minimum: int, names, optional: bool = False) -> None:
    """ValueError naming the flag (`--group.name`) of the first field that is not an int >= minimum
    (None allowed when optional)."""
    for name in names:
        v = getattr(obj, name)
        if optional and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"--{group}.{name} must be an int >= {minimum}{' or null' if optional else ''}, "
                             f"got {v!r}")


@dataclass(frozen=True)
class ModelSource:
    """Which model to fine-tune: a preset (+ overrides) initialised from a seed, or HF weights."""
    preset: Optional[str] = "tiny"            # tc2.config.PRESETS: tiny, telechat2_7b/35b/115b
    load: Optional[str] = None                # official HF dir: start from these weights
    dtype: str = "float32"                    # compute dtype: float32 | float16 | bfloat16
    overrides: Dict[str, Scalar] = field(default_factory=dict)   # ModelConfig fields
    init_seed: int = 0                        # parameter init seed (preset only)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"--model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        check_ints(self, "model", 0, ("init_seed",))


@dataclass(frozen=True)
class DataConfig:
    train: Optional[str] = None               # .jsonl, or a MindRecord file / directory
    eval: Optional[str] = None                # held-out data in the same formats
    eval_fraction: float = 0.0                # or: hold out this fraction of the train rows
    tokenizer: Optional[str] = None           # SentencePiece model (needed for jsonl)
    seq_length: int = 8192                    # tokens per row (rows hold seq_length + 1)
    document_masking: bool = False            # attention stops at packed-conversation borders
    mask_pad: bool = True                     # no token attends to <_pad> (MindFormers' training mask)
    pack_seed: int = 2024                     # MindFormers' packing shuffle seed
    shuffle_seed: int = 0                     # batch order seed (per epoch)
    skip_bad_lines: bool = False              # jsonl: skip (and list) bad lines instead of failing

    def __post_init__(self):
        check_ints(self, "data", 1, ("seq_length",))
        check_ints(self, "data", 0, ("pack_seed", "shuffle_seed"))
        if isinstance(self.eval_fraction, bool) or not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--data.eval_fraction must be in [0, 1) (the rest trains), got {self.eval_fraction!r}")
        if self.eval and self.eval_fraction:
            raise ValueError("give --data.eval or --data.eval_fraction, not both")


@dataclass(frozen=True)
class RunConfig:
    """How long and in what batches (the rest is `TrainConfig`, built from it)."""
    steps: Optional[int] = None               # optimizer steps; default: epochs over the data
    epochs: Optional[int] = None              # passes over the train rows (default 1)
    global_batch: int = 8                     # rows per optimizer step (over every process)
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

    def __post_init__(self):
        check_ints(self, "train", 1, ("global_batch", "micro_batch", "log_every", "keep",
                                      "loss_scale_growth_interval"))
        check_ints(self, "train", 0, ("eval_every", "save_every"))
        check_ints(self, "train", 1, ("steps", "epochs", "stop_after"), optional=True)
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --train.steps or --train.epochs, not both")


@dataclass
class FinetuneRun:
    params: dict                              # the full model, or this process's shards
    cfg: ModelConfig
    batches: TrainBatches                     # global batches, resumable cursor
    evals: Optional[List[dict]]
    train: TrainConfig


def load_model(model: ModelSource, ctx: ParallelContext, log=print):
    """(params, cfg) from HF weights (this process's tp shards) or a seeded preset."""
    if model.load:
        params, cfg = load_hf(model.load, ctx=ctx)
        cfg = cfg.replace(dtype=model.dtype, **model.overrides)
        log(f"model: {model.load} ({count_params(cfg):,} parameters, compute {cfg.dtype})")
    else:
        if model.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {model.preset!r}")
        cfg = PRESETS[model.preset](**{**model.overrides, "dtype": model.dtype})
        params = init_params(cfg, model.init_seed)
        log(f"model: preset {model.preset} ({count_params(cfg):,} parameters, compute {cfg.dtype}), "
            f"init seed {model.init_seed}")
    if cfg.dtype == "bfloat16" and _device() == "CPU":
        raise ValueError("model.dtype bfloat16 has no CPU compute kernels in MindSpore 2.10: use float32 "
                         "or float16 on CPU (bfloat16 is the Ascend setting of the release configs)")
    return params, cfg


def prepare_finetune(model: ModelSource, data: DataConfig, run: RunConfig, ctx: ParallelContext,
                     log=print) -> FinetuneRun:
    """Model, packed rows, batch iterators and the TrainConfig of one fine-tuning run."""
    params, cfg = load_model(model, ctx, log)
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
    pad_id = tokenizer.pad_id if tokenizer is not None else cfg.pad_token_id
    kw = dict(tokenizer=tokenizer, document_masking=data.document_masking, pack_seed=data.pack_seed,
              on_error="skip" if data.skip_bad_lines else "raise", vocab_size=cfg.vocab_size, log=log)
    rows = load_rows(data.train, data.seq_length, **kw)
    eval_rows = load_rows(data.eval, data.seq_length, **kw) if data.eval else None
    if data.eval_fraction:
        rows, eval_rows = split_rows(rows, data.eval_fraction, seed=data.shuffle_seed)
    steps, per_epoch = _steps(run, len(rows["input_ids"]), data.train, ctx)
    batches = TrainBatches(BatchIterator(rows, run.global_batch, seed=data.shuffle_seed, num_epochs=None), pad_id,
                           mask_pad=data.mask_pad)
    evals = (eval_batches(eval_rows, run.micro_batch * ctx.dp, pad_id, mask_pad=data.mask_pad)
             if eval_rows is not None else None)
    log(f"data: {len(rows['input_ids'])} train rows x {data.seq_length} tokens, {per_epoch} steps per epoch "
        f"of {run.global_batch} rows ({run.global_batch // run.micro_batch // ctx.dp} micro-batches of "
        f"{run.micro_batch} per process); {steps} steps (~{steps / max(per_epoch, 1):.2f} epochs)"
        + (f"; eval {len(eval_rows['input_ids'])} rows" if eval_rows is not None else ""))
    train = TrainConfig(
        out_dir=run.out_dir, steps=steps, micro_batches=run.global_batch // (run.micro_batch * ctx.dp),
        log_every=run.log_every, eval_every=run.eval_every, save_every=run.save_every, keep=run.keep,
        resume=run.resume, stop_after=run.stop_after, loss_scale=run.loss_scale,
        loss_scale_growth_interval=run.loss_scale_growth_interval, max_shard_size=run.max_shard_size,
        plot=run.plot)
    return FinetuneRun(params=params, cfg=cfg, batches=batches, evals=evals, train=train)


def _steps(run: RunConfig, n_rows: int, where: str, ctx: ParallelContext):
    """(optimizer steps, steps per epoch), checking the batch arithmetic (RunConfig checked the signs)."""
    if run.global_batch % (run.micro_batch * ctx.dp):
        raise ValueError(f"--train.global_batch {run.global_batch} is not a multiple of --train.micro_batch "
                         f"{run.micro_batch} x dp {ctx.dp}")
    if n_rows < run.global_batch:
        raise ValueError(f"{where}: {n_rows} packed rows cannot fill one global batch of "
                         f"{run.global_batch}; lower --train.global_batch")
    per_epoch = n_rows // run.global_batch
    return (run.steps if run.steps is not None else per_epoch * (run.epochs or 1)), per_epoch


def _device() -> str:
    import mindspore as ms
    return ms.get_context("device_target")


def check_groups(args, groups) -> None:
    """Refuse a parsed config whose settings group is not a mapping of its fields (jsonargparse
    parses `parallel: [1, 2]` and only fails when building the dataclass, with a TypeError
    about `**`): a ValueError that names the config key."""
    from jsonargparse import Namespace
    for name in groups:
        value = args.get(name)
        if value is not None and not isinstance(value, Namespace):
            raise ValueError(f"config key '{name}' must be a mapping of --{name}.* settings, "
                             f"got a {type(value).__name__}: {str(value)[:80]}")


def record_of(args) -> dict:
    """A recipe's parsed arguments as JSON-able data (stored in every checkpoint's state.json)."""
    import json
    record = json.loads(json.dumps(args.as_dict(), default=str))
    record.pop("config", None)
    return record
