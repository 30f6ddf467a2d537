"""Batched, streaming generation over the KV cache: one compiled prefill, one compiled decode step.

    for step in generate(params, cfg, [[1, 4, 77, 5], [1, 4, 9, 9, 9, 5]], max_new_tokens=32):
        step            # (token or None, token or None): one entry per prompt, this step

Prompts of different lengths share one left-padded block: padding gets position PAD_POS, so
no real token ever attends to it, and each row's tokens sit at positions 0..len-1 whatever
the padding. Shapes are static: the prompt block is rounded up to a bucket (16, 32, ..., 512,
then multiples of 512) and the cache holds block + the new-token budget (rounded up to 64), so
a call reuses the graphs compiled by any earlier call with the same buckets, and the decode
step never recompiles per token (the step's tokens and positions are Tensors, the cache a
`ms.mutable` pytree). The step loop stays in Python so it can stream and stop rows.
Randomness is host-side numpy noise (seeded) fed to the step; see `tc2.sampling`.
Dynamic NTK: each row's length L is its own real token count (prompt + generated so far),
whatever the padding, so a row decodes exactly as it would alone (the official code, at
batch 1, token for token).
Tensor parallel (`ctx`, under msrun): every process of a tp group runs the same steps on its
heads; its KV cache holds its own KV heads, and the vocabulary-sharded logits of the last
position are gathered before sampling, so every process picks the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import ops

from tc2.cache import PAD_POS, cache_slots, init_cache, write_slots
from tc2.compiled import forget_after_failure
from tc2.config import ModelConfig
from tc2.context import LOCAL, ParallelContext
from tc2.layer import decoder_layer
from tc2.model import embed, forward, gather_logits
from tc2.model import head as head_logits
from tc2.nn import rope_cos_sin
from tc2.nn.take import take
from tc2.step import unrolled_suits
from tc2.sampling import NEG, SamplingConfig, mark_present, next_token

__all__ = ["generate", "generate_ids", "generate_batched", "stream_text", "PromptBatch",
           "pack_prompts", "compiled_steps", "prompt_bucket"]

_STEP_QUANTUM = 64          # the new-token part of the cache is rounded up to this


def prompt_bucket(n: int) -> int:
    """Width of the prompt block holding a longest prompt of n tokens: few distinct shapes,
    at most 2x padding below 512 and < 512 padding tokens above."""
    if n <= 512:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 512) * 512


@dataclass(frozen=True)
class PromptBatch:
    """Prompts laid out for prefill (host numpy arrays)."""
    tokens: np.ndarray        # [B, P] int32, left-padded with cfg.pad_token_id
    positions: np.ndarray     # [B, P] int32, PAD_POS on padding, 0..len-1 on the prompt
    lengths: np.ndarray       # [B] int32 prompt lengths
    budgets: np.ndarray       # [B] int32 most new tokens each row may produce
    cache_len: int            # slots of the KV cache (block + rounded budget)

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])


def _check_prompts(prompts, vocab_size: int) -> List[np.ndarray]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)):
        raise TypeError("prompts must be a list of token-id lists (one per row), "
                        f"got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one token-id list")
    if isinstance(prompts[0], (int, np.integer)):
        raise TypeError("prompts must be a list of token-id lists; for a single prompt pass [ids]")
    rows = []
    for i, p in enumerate(prompts):
        a = np.asarray(p)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise TypeError(f"prompt {i} must be a flat list of int token ids, got {np.asarray(p).dtype} "
                            f"array of shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token (e.g. bos)")
        bad = (a < 0) | (a >= vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"prompt {i}, position {j}: token id {int(a[j])} is outside the "
                             f"vocabulary [0, {vocab_size})")
        rows.append(a.astype(np.int32))
    return rows


def pack_prompts(prompts, cfg: ModelConfig, *, max_new_tokens: int,
                 max_len: Optional[int] = None) -> PromptBatch:
    """Validate prompts and lay them out left-padded for prefill.

    max_len (default cfg.seq_length) is the most tokens a row may hold, prompt + generated:
    a prompt that leaves no room for one new token is an error, never silently truncated;
    each row's budget is min(max_new_tokens, max_len - its prompt length).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    max_len = cfg.seq_length if max_len is None else int(max_len)
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    rows = _check_prompts(prompts, cfg.vocab_size)
    lengths = np.array([len(r) for r in rows], np.int32)
    too_long = np.flatnonzero(lengths >= max_len)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(f"prompt {i} has {lengths[i]} tokens but the cache holds max_len={max_len} "
                         "tokens per row (prompt + at least one new token); shorten the prompt or "
                         "pass a larger max_len")
    budgets = np.minimum(int(max_new_tokens), max_len - lengths).astype(np.int32)
    block = prompt_bucket(int(lengths.max()))
    B = len(rows)
    tokens = np.full((B, block), cfg.pad_token_id, np.int32)
    positions = np.full((B, block), PAD_POS, np.int32)
    for r, ids in enumerate(rows):
        n = len(ids)
        tokens[r, block - n:] = ids
        positions[r, block - n:] = np.arange(n, dtype=np.int32)
    steps = max(int(budgets.max()), 1)
    cache_len = block + -(-steps // _STEP_QUANTUM) * _STEP_QUANTUM
    return PromptBatch(tokens, positions, lengths, budgets, cache_len)


@forget_after_failure
def compiled_steps(cfg: ModelConfig, sampling: Optional[SamplingConfig], vocab_limit: Optional[int] = None,
                   ctx: ParallelContext = LOCAL, layered: bool = False):
    """(prefill, decode): the same step under two `ms.jit` objects, compiled once per shapes.

    step(params, tokens [B, T] int32, positions [B, T] int32, cache, presence, uniform [B])
      -> (next tokens [B] int32, last-position logits [B, V] float32 (raw, before processing),
          (k tuple, v tuple, kv positions, length) = the new cache, presence)
    Pass params and cache wrapped in `ms.mutable`. presence [B, V] bool marks tokens already
    in each row (used only with a repetition penalty; otherwise pass any [B, 1] bool).
    vocab_limit: only ids below it are ever chosen (the returned logits stay raw).
    layered: the step as a host loop over one compiled decoder layer (compile time does not grow
    with depth, a few host calls per layer and token) instead of one graph of the whole model.
    """
    penalize = sampling is not None and sampling.uses_penalty
    limit = None if vocab_limit is None or vocab_limit >= cfg.vocab_size else int(vocab_limit)

    def step(params, tokens, positions, cache, presence, uniform):
        logits, cache = forward(params, tokens, cfg, positions=positions, cache=cache,
                                last_only=True, ctx=ctx)                                 # [B, 1, V/tp]
        last = gather_logits(logits.squeeze(1), ctx).astype(ms.float32)                  # [B, V]
        allowed = last
        if limit is not None:
            allowed = ops.where(ops.arange(cfg.vocab_size) < limit, last, NEG)          # [B, V]
        tok = next_token(allowed, presence, uniform, sampling)                           # [B]
        if penalize:
            presence = mark_present(presence, tok)
        return tok, last, (cache["k"], cache["v"], cache["pos"], cache["length"]), presence

    # two function objects: jitting one function twice makes MindSpore warn about recompiling
    def prefill(params, tokens, positions, cache, presence, uniform):
        return step(params, tokens, positions, cache, presence, uniform)

    def decode(params, tokens, positions, cache, presence, uniform):
        return step(params, tokens, positions, cache, presence, uniform)

    if not layered:
        return ms.jit(prefill), ms.jit(decode)
    return (_layered_step(cfg, sampling, limit, ctx, penalize), _layered_step(cfg, sampling, limit, ctx, penalize))


def _layered_step(cfg: ModelConfig, sampling, limit, ctx: ParallelContext, penalize: bool):
    """The step as a host loop over one compiled decoder layer (compile time independent of depth)."""
    @ms.jit
    def begin(table, tokens, positions, pos_buf, length):
        seq_len = ops.where(positions < PAD_POS, positions, -1).max(axis=1) + 1                # [B]
        cos, sin = rope_cos_sin(positions, seq_len, head_dim=cfg.head_dim, base_seqlen=cfg.base_seqlen,
                                training_seqlen=cfg.training_seqlen, theta=cfg.rope_theta)
        idx, hit = cache_slots(length, tokens.shape[1], pos_buf.shape[1])
        return embed(table, tokens, ctx), cos, sin, idx, hit, write_slots(pos_buf, positions, idx, hit)

    @ms.jit
    def layer(p, x, cos, sin, positions, k_buf, v_buf, idx, hit, kv_pos):
        x, (k, v), _ = decoder_layer(p, x, cos, sin, positions, cfg, ctx, (k_buf, v_buf, idx, hit, kv_pos))
        return x, k, v

    @ms.jit
    def finish(top, x, presence, uniform):
        x = take(x, 1, x.shape[1] - 1, x.shape[1])                                                 # [B, 1, H]
        last = gather_logits(head_logits(top, x, cfg, ctx).squeeze(1), ctx).astype(ms.float32)      # [B, V]
        allowed = last if limit is None else ops.where(ops.arange(cfg.vocab_size) < limit, last, NEG)
        tok = next_token(allowed, presence, uniform, sampling)                                      # [B]
        return tok, last, (mark_present(presence, tok) if penalize else presence)

    def step(params, tokens, positions, cache, presence, uniform):
        x, cos, sin, idx, hit, kv_pos = begin(params["word_embeddings"], tokens, positions, cache["pos"],
                                              cache["length"])
        ks, vs = (), ()
        for i, p in enumerate(params["layers"]):
            x, k, v = layer(ms.mutable(p), x, cos, sin, positions, cache["k"][i], cache["v"][i], idx, hit, kv_pos)
            ks, vs = ks + (k,), vs + (v,)
        top = ms.mutable({"ln_f": params["ln_f"], "lm_head": params["lm_head"]})
        tok, last, presence = finish(top, x, presence, uniform)
        return tok, last, (ks, vs, kv_pos, cache["length"] + tokens.shape[1]), presence
    return step


def _as_cache(parts) -> dict:
    k, v, pos, length = parts
    return {"k": k, "v": v, "pos": pos, "length": length}


def _initial_presence(batch: PromptBatch, cfg: ModelConfig, sampling) -> ms.Tensor:
    B = batch.batch
    if sampling is None or not sampling.uses_penalty:
        return ms.Tensor(np.zeros((B, 1), np.bool_))
    present = np.zeros((B, cfg.vocab_size), np.bool_)
    for r in range(B):
        present[r, batch.tokens[r, batch.positions[r] != PAD_POS]] = True
    return ms.Tensor(present)


def generate(params, cfg: ModelConfig, prompts, *, max_new_tokens: int,
             sampling: Optional[SamplingConfig] = None, stop_ids: Sequence[int] = (2,),
             seed: int = 0, max_len: Optional[int] = None, include_stop: bool = False,
             vocab_limit: Optional[int] = None, ctx: ParallelContext = LOCAL,
             layered: Optional[bool] = None) -> Iterator[Tuple[Optional[int], ...]]:
    """Stream new tokens for a batch of prompts (lists of token ids of any lengths).

    Yields once per step a tuple with one entry per prompt: the row's new token id, or None
    when the row produced nothing this step because it has finished. A row finishes when it
    emits a stop id (that step yields None for it, or the stop id when include_stop=True, as
    Hugging Face keeps the eos in its output) or when it has produced its budget of
    min(max_new_tokens, max_len - prompt length) tokens. The iterator ends when every row has
    finished. sampling=None is plain greedy (argmax); a SamplingConfig adds the release's
    repetition penalty and, with do_sample=True, seeded sampling (same seed, same tokens).
    vocab_limit: only ids below it are generated, e.g. the tokenizer's size when the model's
    embedding table is padded beyond it. Arguments are checked here, before the first step: a
    prompt that does not fit in max_len (default cfg.seq_length) raises ValueError.
    ctx: under tensor parallelism, params are this process's shards (every process of the tp
    group calls this with the same arguments and gets the same tokens).
    layered: run the step layer by layer (see `compiled_steps`): compile time independent of
    depth; False: one unrolled graph per step; None (default): unrolled for a model of at most 8
    layers and 64M parameters (`tc2.step.unrolled_suits`, as the train step's "auto"), layer by
    layer otherwise. At shape M (8 layers, 57M) unrolled decodes 327 vs 244 tokens/s at batch 8
    and 54 vs 51 at batch 1 (`benchmark.py side`); its compile time grows with depth.
    """
    if ctx.cp > 1 or ctx.pp > 1:
        raise ValueError("generation runs without context or pipeline parallelism (cp and pp must be 1)")
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig or None, got {type(sampling).__name__}")
    stop = frozenset(int(s) for s in (stop_ids or ()))
    if vocab_limit is not None and not 0 < int(vocab_limit) <= cfg.vocab_size:
        raise ValueError(f"vocab_limit must be in [1, {cfg.vocab_size}], got {vocab_limit}")
    batch = pack_prompts(prompts, cfg, max_new_tokens=max_new_tokens, max_len=max_len)
    if max_new_tokens == 0:
        return iter(())
    limit = None if vocab_limit is None or int(vocab_limit) >= cfg.vocab_size else int(vocab_limit)
    if layered is None:
        layered = not unrolled_suits(cfg, ctx)
    return _stream(params, cfg, batch, sampling, stop, int(seed), bool(include_stop), limit, ctx, bool(layered))


def _stream(params, cfg, batch: PromptBatch, sampling, stop, seed, include_stop, vocab_limit, ctx, layered):
    prefill, decode = compiled_steps(cfg, sampling, vocab_limit, ctx, layered)
    B = batch.batch
    rng = np.random.default_rng(seed)
    weights = params if layered else ms.mutable(params)
    cache = init_cache(cfg, B, batch.cache_len, ctx=ctx)
    presence = _initial_presence(batch, cfg, sampling)
    tok, _, parts, presence = prefill(weights, ms.Tensor(batch.tokens), ms.Tensor(batch.positions),
                                      ms.mutable(cache), presence,
                                      ms.Tensor(rng.random(B, dtype=np.float32)))
    done = np.zeros(B, np.bool_)
    produced = np.zeros(B, np.int32)
    for step in range(int(batch.budgets.max())):
        ids = tok.asnumpy()                                                        # [B]
        out: List[Optional[int]] = []
        for r in range(B):
            if done[r]:
                out.append(None)
                continue
            t = int(ids[r])
            produced[r] += 1
            hit_stop = t in stop
            done[r] = hit_stop or produced[r] >= batch.budgets[r]
            out.append(None if hit_stop and not include_stop else t)
        yield tuple(out)
        if done.all():
            return
        # Synchronous on purpose: queueing step n+1 before reading step n on the host measured
        # 2-3x slower on MindSpore 2.10 CPU (the read then waits on, and contends with, the queue).
        positions = (batch.lengths + step).reshape(B, 1).astype(np.int32)         # each row's next slot
        tok, _, parts, presence = decode(weights, ms.Tensor(ids.reshape(B, 1).astype(np.int32)),
                                         ms.Tensor(positions), ms.mutable(_as_cache(parts)), presence,
                                         ms.Tensor(rng.random(B, dtype=np.float32)))


def generate_ids(params, cfg: ModelConfig, prompts, *, max_new_tokens: int,
                 sampling: Optional[SamplingConfig] = None, stop_ids: Sequence[int] = (2,),
                 seed: int = 0, max_len: Optional[int] = None, include_stop: bool = False,
                 vocab_limit: Optional[int] = None, ctx: ParallelContext = LOCAL,
                 layered: Optional[bool] = None) -> List[List[int]]:
    """The new tokens of each prompt as lists (stop ids excluded unless include_stop);
    the arguments are those of `generate`."""
    rows: List[List[int]] = [[] for _ in range(len(prompts))]
    for step in generate(params, cfg, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                         stop_ids=stop_ids, seed=seed, max_len=max_len, include_stop=include_stop,
                         vocab_limit=vocab_limit, ctx=ctx, layered=layered):
        for r, t in enumerate(step):
            if t is not None:
                rows[r].append(t)
    return rows


def generate_batched(params, cfg: ModelConfig, prompts, *, batch_size: int = 8,
                     sort_by_length: bool = True, **kwargs) -> Iterator[Tuple[int, List[int]]]:
    """Many prompts, `batch_size` at a time: yields (index into prompts, new ids) per prompt as
    its batch finishes. Sorting by length first keeps padding (and wasted prefill work) small;
    the last batch is filled up with repeats so every batch has the same shape and no extra
    graph is compiled for it. kwargs go to `generate_ids`. All prompts are checked first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = _check_prompts(prompts, cfg.vocab_size)
    max_len = kwargs.get("max_len")
    limit = cfg.seq_length if max_len is None else int(max_len)
    for i, r in enumerate(rows):
        if len(r) >= limit:
            raise ValueError(f"prompt {i} has {len(r)} tokens but the cache holds max_len={limit} "
                             "tokens per row (prompt + at least one new token)")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i])) if sort_by_length else list(range(len(rows)))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        chunk = [rows[i] for i in idx]
        chunk += [chunk[0]] * (min(batch_size, len(order)) - len(chunk))
        outs = generate_ids(params, cfg, chunk, **kwargs)
        for i, out in zip(idx, outs):
            yield i, out


def stream_text(tokenizer, tokens, *, skip_special_tokens: bool = True) -> Iterator[str]:
    """Text deltas for a stream of token ids (e.g. one row of `generate`), for printing as they
    come: the whole prefix is re-decoded each time, so pieces that merge or need the next token
    (a multi-byte character split over byte-fallback pieces) come out right; a delta is held
    back while the text ends inside an incomplete character. `tokenizer` needs `decode`."""
    ids: List[int] = []
    shown = ""
    for t in tokens:
        if t is None:
            continue
        ids.append(int(t))
        text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if text.endswith("\ufffd"):
            continue
        if text.startswith(shown):
            delta, shown = text[len(shown):], text
            if delta:
                yield delta
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    if text != shown and text.startswith(shown):
        yield text[len(shown):]
