"""tc2: TeleChat2 as pure functions over MindSpore ops. The public API, re-exported.

The core (this folder's top level): config, tree, nn/, model, cache, context, optim, step,
sampling, generate. The periphery, by what it does: parallel/ (mesh, sharding rules,
collectives, Ascend layouts, memory plan), train/ (fit, train-state checkpoints, batches),
data/ (tokenizer, chat templates, SFT data, MindRecord), checkpoint/ (HF, safetensors,
MindSpore .ckpt, MindFormers, conversions), inference/ (predict, chat).
"""
from tc2.cache import init_cache
from tc2.checkpoint.convert import convert_checkpoint, verify_checkpoints
from tc2.checkpoint.hf import load_hf, save_hf
from tc2.checkpoint.mindformers import load_mindformers, save_mindformers
from tc2.config import ModelConfig, telechat2_7b, telechat2_35b, telechat2_115b, tiny
from tc2.context import LOCAL, ParallelContext
from tc2.data.chat import render_chat, render_chat_text
from tc2.data.records import BatchIterator, read_mindrecord, write_mindrecord
from tc2.data.sft import PackConfig, pack_examples, preprocess, read_examples
from tc2.data.tokenizer import Tokenizer, train_tokenizer
from tc2.generate import generate, generate_batched, generate_ids, stream_text
from tc2.model import (ParamSpec, count_params, cross_entropy_sum, forward, gather_logits, init_params,
                       jit_forward, loss_fn, loss_sums, param_specs)
from tc2.nn.ring import ring_attention
from tc2.optim import OptimConfig, adamw, chain, clip_by_global_norm, cosine_schedule, make_optimizer
from tc2.parallel.collectives import context_for, local_context, spmd_context
from tc2.parallel.memory import MemoryPlan, plan_memory
from tc2.parallel.mesh import Mesh, ParallelConfig, ShardingError
from tc2.parallel.sharding import shard_params, split_dim, unshard_params
from tc2.sampling import SamplingConfig
from tc2.step import LossScaleConfig, TrainState, eval_loss_sums, init_train_state, train_step
from tc2.train.checkpoints import load_checkpoint, save_checkpoint
from tc2.train.loop import FitResult, TrainConfig, evaluate, fit

__all__ = [
    # model
    "ModelConfig", "telechat2_7b", "telechat2_35b", "telechat2_115b", "tiny", "ParamSpec", "param_specs",
    "count_params", "init_params", "forward", "jit_forward", "gather_logits", "loss_fn", "loss_sums",
    "cross_entropy_sum", "init_cache", "ring_attention",
    # training
    "OptimConfig", "make_optimizer", "adamw", "chain", "clip_by_global_norm", "cosine_schedule", "TrainState",
    "LossScaleConfig", "init_train_state", "train_step", "eval_loss_sums", "TrainConfig", "FitResult", "fit",
    "evaluate", "save_checkpoint", "load_checkpoint",
    # parallel
    "ParallelConfig", "ParallelContext", "LOCAL", "context_for", "spmd_context", "local_context", "Mesh",
    "ShardingError", "shard_params", "unshard_params", "split_dim", "plan_memory", "MemoryPlan",
    # generation
    "generate", "generate_ids", "generate_batched", "stream_text", "SamplingConfig",
    # data
    "Tokenizer", "train_tokenizer", "render_chat", "render_chat_text", "read_examples", "pack_examples",
    "PackConfig", "preprocess", "read_mindrecord", "write_mindrecord", "BatchIterator",
    # checkpoints
    "load_hf", "save_hf", "load_mindformers", "save_mindformers", "convert_checkpoint", "verify_checkpoints",
]
