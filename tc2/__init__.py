"""tc2: TeleChat2 as pure functions over MindSpore ops. The public API, re-exported."""
from tc2.cache import init_cache
from tc2.data.chat import render_chat, render_chat_text
from tc2.checkpoint.hf import load_hf, save_hf
from tc2.config import ModelConfig, telechat2_7b, telechat2_35b, telechat2_115b, tiny
from tc2.checkpoint.convert import convert_checkpoint, verify_checkpoints
from tc2.data.sft import PackConfig, pack_examples, preprocess, read_examples
from tc2.generate import generate, generate_batched, generate_ids, stream_text
from tc2.parallel.memory import MemoryPlan, plan_memory
from tc2.checkpoint.mindformers import load_mindformers, save_mindformers
from tc2.model import (ParamSpec, count_params, cross_entropy_sum, forward, init_params, jit_forward,
                    loss_fn, param_specs)
from tc2.nn.ring import ring_attention
from tc2.data.records import BatchIterator, read_mindrecord, write_mindrecord
from tc2.sampling import SamplingConfig
from tc2.parallel.sharding import Mesh, ShardingError, shard_params, split_dim, unshard_params
from tc2.data.tokenizer import Tokenizer, train_tokenizer

__all__ = ["ModelConfig", "telechat2_7b", "telechat2_35b", "telechat2_115b", "tiny", "ParamSpec",
           "param_specs", "count_params", "init_params", "forward", "jit_forward", "loss_fn",
           "cross_entropy_sum", "init_cache", "load_hf", "save_hf", "Tokenizer", "train_tokenizer",
           "render_chat", "render_chat_text", "read_examples", "pack_examples", "PackConfig",
           "preprocess", "read_mindrecord", "write_mindrecord", "BatchIterator", "generate",
           "generate_ids", "generate_batched", "stream_text", "SamplingConfig", "load_mindformers",
           "save_mindformers", "convert_checkpoint", "verify_checkpoints", "Mesh", "ShardingError",
           "shard_params", "unshard_params", "split_dim", "plan_memory", "MemoryPlan", "ring_attention"]
