"""A model ready to answer: weights (this process's shards under tp), tokenizer, generation kwargs.

`GenerationOptions` is the set of flags `recipes/predict.py` and `recipes/chat.py` share (the
release's generation_config defaults, spec §8); `load_for_generation` turns them into library
objects. Under msrun with tensor parallelism each process reads every tensor once and keeps
its own slice, so no process ever holds the whole model.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional

from tc2.checkpoint.hf import load_hf
from tc2.config import ModelConfig
from tc2.context import LOCAL, ParallelContext
from tc2.data.tokenizer import Tokenizer
from tc2.sampling import SamplingConfig

STYLES = ("template", "115b")


@dataclass(frozen=True)
class GenerationOptions:
    checkpoint: str                           # HF TeleChat2 dir, or a tc2 run dir (newest step_*)
    tokenizer: Optional[str] = None           # tokenizer.model (default: the one in the checkpoint)
    dtype: Optional[str] = None               # compute dtype float32|float16|bfloat16 (default: config's)
    style: str = "template"                   # 'template' (7B/35B chat template) or '115b' (115B chat())
    system: Optional[str] = None              # system prompt (template style; default: the release's)
    max_new_tokens: int = 4096
    max_len: Optional[int] = None             # tokens per row, prompt + answer (default: seq_length)
    do_sample: bool = False
    temperature: float = 0.3
    top_k: int = 5
    top_p: float = 0.85
    repetition_penalty: float = 1.03
    seed: int = 0
    stop_ids: Optional[List[int]] = None      # ids that end an answer (default: the tokenizer's <_end>)

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"--style must be one of {STYLES}, got {self.style!r}")
        for name, low in (("max_new_tokens", 1), ("max_len", 2), ("seed", 0)):
            v = getattr(self, name)
            if (v is not None or name != "max_len") and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"--{name} must be an int >= {low}, got {v!r}")


@dataclass
class LoadedModel:
    params: dict                              # this process's shards
    cfg: ModelConfig
    tokenizer: Tokenizer
    gen: dict                                 # keyword arguments of tc2.generate (+ ctx)
    checkpoint: str                           # the directory the weights came from
    max_len: int


def resolve_checkpoint(path: str) -> str:
    """The directory holding config.json: `path` itself, or its newest step sub-directory."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint: no directory at {path}")
    subs = [d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "config.json"))]
    if not subs:
        raise FileNotFoundError(f"--checkpoint {path}: no config.json there or in any sub-directory "
                                f"(found {sorted(os.listdir(path))[:8]})")

    def step(d):
        m = re.search(r"(\d+)$", d)
        return (int(m.group(1)) if m else -1, os.path.getmtime(os.path.join(path, d)))
    return os.path.join(path, max(subs, key=step))


def load_for_generation(opts: GenerationOptions, ctx: ParallelContext = LOCAL) -> LoadedModel:
    """Weights, tokenizer and sampling settings; errors name the path or flag at fault."""
    if opts.style not in STYLES:
        raise ValueError(f"--style must be one of {STYLES}, got {opts.style!r}")
    if ctx.cp > 1 or ctx.pp > 1:
        raise ValueError("generation runs without context or pipeline parallelism: use --parallel.tp / "
                         "--parallel.dp")
    ckpt = resolve_checkpoint(opts.checkpoint)
    params, cfg = load_hf(ckpt, ctx=ctx)
    if opts.dtype:
        cfg = cfg.replace(dtype=opts.dtype)
    tok_path = opts.tokenizer or os.path.join(ckpt, "tokenizer.model")
    if not os.path.isfile(tok_path):
        raise FileNotFoundError(f"no tokenizer at {tok_path}: pass --tokenizer")
    tokenizer = Tokenizer(tok_path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tokenizer.vocab_size} pieces but the model "
                         f"{ckpt} only {cfg.vocab_size} embeddings")
    max_len = opts.max_len or cfg.seq_length
    if opts.max_new_tokens < 1 or opts.max_new_tokens >= max_len:
        raise ValueError(f"--max_new_tokens must be in [1, max_len={max_len}), got {opts.max_new_tokens}")
    if opts.style == "115b" and opts.system is not None:
        raise ValueError("--system: the 115b prompt format has no system prompt (use --style template)")
    sampling = SamplingConfig(do_sample=opts.do_sample, temperature=opts.temperature, top_k=opts.top_k,
                              top_p=opts.top_p, repetition_penalty=opts.repetition_penalty)
    stop_ids = tuple(opts.stop_ids) if opts.stop_ids else (tokenizer.eos_id,)
    gen = dict(sampling=sampling, stop_ids=stop_ids, seed=opts.seed, ctx=ctx,
               vocab_limit=min(tokenizer.vocab_size, cfg.vocab_size))   # never emit ids it cannot decode
    return LoadedModel(params=params, cfg=cfg, tokenizer=tokenizer, gen=gen, checkpoint=ckpt, max_len=max_len)
