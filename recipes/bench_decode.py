"""`benchmark.py decode`: KV-cache decoding speed against the memory-bandwidth bound, same run.

Decoding one token per row reads every weight once per step (the embedding table excepted:
only B rows are gathered), so a step cannot beat weight_bytes / bandwidth. The bandwidth is
measured here, in the same process, as a STREAM-style copy of a large float32 array
(bytes read + written per second); the table prints measured tokens/s next to that bound
and their ratio. Two decode numbers are given: `generate` end to end (the Python loop that
streams and checks stop ids) and the compiled decode step alone (the same graph called back
to back), whose difference is the host overhead per token. Also: prefill time of a long
prompt at batch 1, and compile times. Greedy, graph mode (ms.jit), shape M by default.
"""
from __future__ import annotations

import statistics
import time
from typing import List

import mindspore as ms
import numpy as np
from jsonargparse import CLI

import tc2
from tc2.cache import init_cache
from tc2.config import ModelConfig
from tc2.generate import compiled_steps, generate, pack_prompts
from tc2.nn import linear

from bench_protocol import SHAPES as MODEL_SHAPES

SHAPES = {name: MODEL_SHAPES[name] for name in ("M", "tiny")}     # M: the trainer issue's shape M


def copy_bandwidth(mbytes: int = 256, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by the best of `repeats` copies of an array."""
    src = np.random.default_rng(0).random(mbytes * (1 << 20) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


@ms.jit
def _weight_matmuls(params, x):
    """Only the matmuls of one decode step (every weight but the embedding, once) on x [B, H]."""
    acc = x
    for lp in params["layers"]:
        q = linear(acc, lp["query"])                                         # [B, Nq*D]
        kv = linear(acc, lp["key_value"])
        h = linear(q, lp["dense"], lp["dense_bias"])                         # [B, H]
        m = linear(acc, lp["gate_proj"]) * linear(acc, lp["up_proj"])        # [B, F]
        acc = acc + h + linear(m, lp["down_proj"], lp["down_proj_bias"]) + kv.mean()
    return linear(acc, params["lm_head"])                                    # [B, V]


def time_weight_matmuls(params, cfg, batch, repeats, iters=10):
    """Seconds for the matmuls alone: the floor MindSpore's CPU MatMul sets for a decode step."""
    p = ms.mutable(params)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((batch, cfg.hidden_size)).astype(np.float32))
    for _ in range(2):
        _weight_matmuls(p, x).asnumpy()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            y = _weight_matmuls(p, x)
        y.asnumpy()
        out.append((time.perf_counter() - t0) / iters)
    return statistics.median(out)


def random_prompts(cfg, batch, length, seed=0):
    """`batch` prompts of `length` random ids (ids 0-3 left out: the special tokens)."""
    r = np.random.default_rng(seed)
    return [r.integers(4, cfg.vocab_size, length).tolist() for _ in range(batch)]


def timed_generate(params, cfg, prompts, new_tokens, layered=None):
    """One greedy `generate` without stop ids -> (seconds to the first new token: the prefill,
    seconds for the other new_tokens - 1: the cached decode steps, the yielded steps)."""
    t0 = time.perf_counter()
    it = generate(params, cfg, prompts, max_new_tokens=new_tokens, stop_ids=(), layered=layered)
    steps = [next(it)]
    t1 = time.perf_counter()
    steps.extend(it)
    return t1 - t0, time.perf_counter() - t1, steps


def time_generate(params, cfg, batch, prompt_len, steps, repeats):
    """Seconds per decode step of `generate` (prefill excluded: the clock starts at step 1)."""
    prompts = random_prompts(cfg, batch, prompt_len)
    return statistics.median(timed_generate(params, cfg, prompts, steps)[1] / (steps - 1) for _ in range(repeats))


def time_decode_step(params, cfg, batch, prompt_len, steps, repeats):
    """Seconds per call of the compiled decode step alone (same shapes as `generate` uses)."""
    b = pack_prompts(random_prompts(cfg, batch, prompt_len), cfg, max_new_tokens=steps)
    prefill, decode = compiled_steps(cfg, None)
    p = ms.mutable(params)
    flags = ms.Tensor(np.zeros((batch, 1), np.bool_))
    noise = ms.Tensor(np.zeros(batch, np.float32))
    tok, _, parts, _ = prefill(p, ms.Tensor(b.tokens), ms.Tensor(b.positions),
                               ms.mutable(init_cache(cfg, batch, b.cache_len)), flags, noise)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in range(steps - 1):
            pos = ms.Tensor((b.lengths + s).reshape(batch, 1))
            tok, _, parts, _ = decode(p, tok.reshape(batch, 1), pos,
                                      ms.mutable({"k": parts[0], "v": parts[1], "pos": parts[2],
                                                  "length": parts[3]}), flags, noise)
        tok.asnumpy()
        out.append((time.perf_counter() - t0) / (steps - 1))
        parts = (parts[0], parts[1], parts[2], parts[3] * 0 + b.tokens.shape[1])   # rewind the cache
    return statistics.median(out)


def run(shape: str = "M", batches: List[int] = [1, 8], prompt_len: int = 32, steps: int = 64,
        prefill_len: int = 1024, repeats: int = 3, dtype: str = "float32"):
    """Decode tokens/s at each batch size and prefill time of a `prefill_len` prompt (batch 1)."""
    cfg = ModelConfig(**SHAPES[shape], dtype=dtype, training_seqlen=8192, base_seqlen=8192,
                      seq_length=8192)
    params = tc2.init_params(cfg, seed=0)
    n_params = tc2.count_params(cfg)
    weight_bytes = 4 * (n_params - cfg.vocab_size * cfg.hidden_size)      # embedding: only B rows read
    bw = copy_bandwidth()
    print(f"decode  shape={shape}  params={n_params:,}  dtype={dtype}  graph mode, greedy")
    print(f"copy bandwidth (numpy, read+write): {bw / 1e9:.2f} GB/s;  weights read per decode step: "
          f"{weight_bytes / 1e6:.1f} MB (float32, embedding table excluded)")
    rows = []
    for B in batches:
        t0 = time.perf_counter()
        list(generate(params, cfg, random_prompts(cfg, B, prompt_len), max_new_tokens=steps, stop_ids=()))
        compile_s = time.perf_counter() - t0                       # prefill + decode compile + one run
        list(generate(params, cfg, random_prompts(cfg, B, prompt_len), max_new_tokens=steps, stop_ids=()))
        gen = time_generate(params, cfg, B, prompt_len, steps, repeats)
        step = time_decode_step(params, cfg, B, prompt_len, steps, repeats)
        mm = time_weight_matmuls(params, cfg, B, repeats)
        bound = weight_bytes / bw                                  # seconds per step at full bandwidth
        rows.append((B, gen, step, mm, bound, compile_s))
    print("| batch | generate ms/step | tokens/s | step-only ms | matmuls-only ms | bound ms "
          "| bound tokens/s | generate / bound | matmuls / bound | first run (compile) s |")
    print("|------:|-----------------:|---------:|-------------:|----------------:|---------:"
          "|---------------:|-----------------:|----------------:|----------------------:|")
    for B, gen, step, mm, bound, compile_s in rows:
        print(f"| {B:5d} | {gen * 1e3:16.2f} | {B / gen:8.1f} | {step * 1e3:12.2f} | {mm * 1e3:15.2f} | "
              f"{bound * 1e3:8.2f} | {B / bound:14.1f} | {bound / gen:15.1%} | {bound / mm:14.1%} | "
              f"{compile_s:21.1f} |")
    print("generate / bound is the headline ratio; matmuls-only is the same weights through "
          "MindSpore's CPU MatMul alone (no attention, cache, norms or sampling): the kernel's floor.")

    long_prompt = random_prompts(cfg, 1, prefill_len, seed=1)
    compile_s = timed_generate(params, cfg, long_prompt, 1)[0]
    times = [timed_generate(params, cfg, long_prompt, 1)[0] for _ in range(repeats + 1)]
    pre = statistics.median(times[1:])
    flops = 2 * (n_params - cfg.vocab_size * cfg.hidden_size) * prefill_len
    print(f"prefill {prefill_len} tokens (batch 1): {pre * 1e3:.0f} ms = {prefill_len / pre:.0f} tokens/s, "
          f"{flops / pre / 1e9:.1f} GFLOP/s of weight matmuls; first call (compile) {compile_s:.1f} s")
    return {"bandwidth_GBps": bw / 1e9, "weight_MB": weight_bytes / 1e6,
            "decode": [dict(batch=B, generate_ms=g * 1e3, step_ms=s * 1e3, matmul_ms=m * 1e3,
                            bound_tok_s=B / b) for B, g, s, m, b, _ in rows],
            "prefill_ms": pre * 1e3}


def main(argv):
    CLI(run, args=argv)
    return 0
