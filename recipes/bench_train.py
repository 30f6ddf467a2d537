"""`benchmark.py train`: training throughput and MFU against this machine's matmul peak.

One full optimizer step (forward, backward over the whole parameter dict, global-norm clip,
AdamW) of `tc2.step.train_step` in graph mode, float32, for the issue's shapes S and M.
MFU = model FLOPs per second / the float32 matmul peak measured in the same process (a
jitted 2048^3 matmul, best of several, measured before and after the models; the larger is
used). Model FLOPs per token (PaLM appendix B convention, forward + backward):

    6 * N_matmul + 12 * n_layer * (n_head * head_dim) * seq

N_matmul counts the weights that enter matmuls (q, kv, dense, gate, up, down, lm_head; not
the embedding table, which is a gather, nor norms and biases); the second term is QK^T and
PV over the full (masked, not skipped) T x T score matrix. Steps get faster over the first
calls, so each shape is warmed up before timing; the median step is reported.

Each shape runs in its own process (memory is returned between shapes), as one [B, T] batch
(`--micro_batch` splits it). The step is the donated one `fit` runs (the optimizer writes into
the state's buffers). Before the blockwise attention and the in-place AdamW (issue 14) shape M
needed 4 micro-batches of 1: one [4, 512] step took more than 16 GB; now 3.7 GB layer by layer.
"""
from __future__ import annotations

import statistics
import time
from functools import partial
from typing import List, Optional

import mindspore as ms
import numpy as np
from jsonargparse import CLI

from tc2.config import ModelConfig
from tc2.model import init_params, param_specs
from tc2.optim import OptimConfig, make_optimizer
from tc2.step import donatable, init_train_state, split_micro_batches, train_step
from tc2.train.batches import synthetic_batches
from tc2.tree import tree_flatten_with_names

from bench_protocol import SHAPES as MODEL_SHAPES

SHAPES = {
    "S": dict(model=MODEL_SHAPES["S"], seq=256, batch=4, micro=4),
    "M": dict(model=MODEL_SHAPES["M"], seq=512, batch=4, micro=4),
    "tiny": dict(model=MODEL_SHAPES["tiny"], seq=64, batch=4, micro=4),
}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """float32 FLOP/s of the best of `repeats` jitted n^3 matmuls (after a warmup call)."""
    from mindspore import ops
    rng = np.random.default_rng(0)
    a = ms.Tensor(rng.standard_normal((n, n), dtype=np.float32))
    b = ms.Tensor(rng.standard_normal((n, n), dtype=np.float32))
    mm = ms.jit(ops.matmul)
    mm(a, b).asnumpy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).asnumpy()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that enter matmuls: every 2-D parameter except the embedding table."""
    return sum(s.size for n, s in tree_flatten_with_names(param_specs(cfg)).items()
               if len(s.shape) == 2 and n != "word_embeddings")


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq


def make_train(model: dict, batch: int, seq: int, micro_batches: int = 1, recompute: str = "auto", seed: int = 0,
               donate: bool = True):
    """(cfg, state, batches, step) for timing `tc2.step.train_step` with the release's optimizer
    recipe on a seeded float32 model of `model`'s dims: batches yields synthetic [batch, seq]
    batches (split into `micro_batches`), step(state, batch) -> (state, metrics) is one
    optimizer step (the metrics are host floats, so the step has finished when it returns).
    One place builds the step, so `train` and `side` time the same thing. donate: the step
    `fit` runs (the optimizer writes into the state's buffers, `train_step(donate=True)`)."""
    cfg = ModelConfig(**model, training_seqlen=seq, base_seqlen=seq, seq_length=seq, dtype="float32")
    ocfg = OptimConfig()                                              # the release's recipe
    opt = make_optimizer(ocfg, total_steps=1000)
    state = init_train_state(init_params(cfg, seed), opt)
    if donate:
        state = donatable(state)                       # the buffers the step writes into, made once
    stream = synthetic_batches(cfg, batch, seq, seed=seed)
    batches = (split_micro_batches(b, micro_batches) if micro_batches > 1 else b for b in stream)
    return cfg, state, batches, partial(train_step, cfg=cfg, optimizer=opt, clip_norm=ocfg.clip, recompute=recompute,
                                          donate=donate)


def bench_shape(name: str, warmup: int, steps: int, micro: Optional[int] = None, recompute: str = "selective") -> dict:
    import resource
    spec = SHAPES[name]
    micro = micro or spec["micro"]
    if spec["batch"] % micro:
        raise ValueError(f"micro batch {micro} does not divide batch {spec['batch']}")
    k = spec["batch"] // micro
    cfg, state, data, step = make_train(spec["model"], spec["batch"], spec["seq"], k, recompute)
    t0 = time.perf_counter()
    state, _ = step(state, next(data))                                # compile + first step
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, _ = step(state, next(data))
    times: List[float] = []
    for _ in range(steps):
        batch = next(data)
        t0 = time.perf_counter()
        state, m = step(state, batch)                                 # metrics read = synced
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = spec["batch"] * spec["seq"]
    return dict(shape=name, params=sum(s.size for s in tree_flatten_with_names(param_specs(cfg)).values()),
                n_matmul=matmul_params(cfg), tokens=tokens, compile_s=compile_s, step_s=step_s,
                step_min=min(times), tok_s=tokens / step_s, flops=flops_per_token(cfg, spec["seq"]) * tokens,
                loss=m["loss"], micro=f"{k}x{micro}",
                peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


def _in_child(name: str, warmup: int, steps: int, micro: Optional[int], recompute: str) -> dict:
    """bench_shape in a fresh process, so each shape starts with the memory returned."""
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(bench_shape, (name, warmup, steps, micro, recompute))


def main(argv=None) -> int:
    def run(shapes: List[str] = ["S", "M"], warmup: int = 3, steps: int = 5, peak_size: int = 2048,
            micro_batch: Optional[int] = None, recompute: List[str] = ["selective", "none"]):
        """Train-step throughput and MFU.

        Args:
            shapes: which of S, M, tiny to run.
            warmup: steps after the compiling one before timing.
            steps: timed steps per shape (the median is reported).
            peak_size: n of the n^3 matmul that measures the peak.
            micro_batch: rows per forward/backward for every shape (default: the whole batch).
            recompute: the step's modes, each measured per shape: "selective" / "full" (layer by
                layer, one compiled layer) and "none" (one unrolled graph of the whole model).
        """
        for s in shapes:
            if s not in SHAPES:
                raise ValueError(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")
        ms.set_context(mode=ms.GRAPH_MODE)
        peak_before = matmul_peak(peak_size)
        rows = [dict(_in_child(s, warmup, steps, micro_batch, r), recompute=r) for s in shapes for r in recompute]
        peak_after = matmul_peak(peak_size)
        peak = max(peak_before, peak_after)
        print(f"float32 matmul peak ({peak_size}^3, jitted, best of 5): before {peak_before / 1e9:.1f}, "
              f"after {peak_after / 1e9:.1f} GFLOP/s -> using {peak / 1e9:.1f} GFLOP/s")
        print("model FLOPs/token = 6 * N_matmul + 12 * n_layer * (n_head * head_dim) * seq "
              "(N_matmul: q, kv, dense, gate, up, down, lm_head)")
        print("one step = forward + backward + global-norm clip + AdamW, graph mode, float32, median of "
              f"{steps} after {warmup} warmup steps; compile s = compile + first step; k x mb = "
              "micro-batches x rows; each shape in its own process")
        head = (f"{'shape':<6}{'recompute':>10}{'params':>12}{'N_matmul':>12}{'tok/step':>10}{'k x mb':>8}{'compile s':>11}"
                f"{'step s':>9}{'tokens/s':>10}{'GFLOP/step':>12}{'GFLOP/s':>9}{'MFU':>8}{'peak GiB':>10}")
        print(head)
        print("-" * len(head))
        for r in rows:
            achieved = r["flops"] / r["step_s"]
            print(f"{r['shape']:<6}{r['recompute']:>10}{r['params']:>12,}{r['n_matmul']:>12,}{r['tokens']:>10}{r['micro']:>8}"
                  f"{r['compile_s']:>11.1f}{r['step_s']:>9.3f}{r['tok_s']:>10.0f}{r['flops'] / 1e9:>12.1f}"
                  f"{achieved / 1e9:>9.1f}{achieved / peak:>8.1%}{r['peak_gib']:>10.1f}")
        return 0

    return CLI(run, args=argv, as_positional=False)


if __name__ == "__main__":
    import sys
    sys.exit(main())
