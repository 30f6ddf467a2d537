"""`benchmark.py forward`: the model forward in graph mode (ms.jit) vs PyNative, same run.

Reports compile time, steady-state ms per call (median of --iters after --warmup) and the
PyNative/graph ratio. Reference: PyNative execution of the very same function and inputs.
"""
import statistics
import time

import mindspore as ms
import numpy as np
from jsonargparse import CLI

import tc2
from tc2.config import PRESETS


def _time(fn, iters):
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn().asnumpy()                      # asnumpy syncs
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def run(preset: str = "tiny", batch: int = 4, seq: int = 64, warmup: int = 3, iters: int = 10):
    """Time tc2.forward on a preset (default tiny) at [batch, seq] tokens."""
    cfg = PRESETS[preset]()
    params = tc2.init_params(cfg, seed=0)
    tokens = ms.Tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32))
    t0 = time.perf_counter()
    tc2.jit_forward(params, tokens, cfg).asnumpy()
    compile_s = time.perf_counter() - t0
    graph = lambda: tc2.jit_forward(params, tokens, cfg)            # noqa: E731
    eager = lambda: tc2.forward(params, tokens, cfg)[0]             # noqa: E731
    for _ in range(warmup):
        graph().asnumpy(), eager().asnumpy()
    g, e = _time(graph, iters), _time(eager, iters)
    print(f"forward  preset={preset}  batch={batch}  seq={seq}  params={tc2.count_params(cfg):,}")
    print(f"| mode      | ms/call | vs graph |\n|-----------|---------|----------|")
    print(f"| graph     | {g * 1e3:7.2f} | 1.00x    |")
    print(f"| PyNative  | {e * 1e3:7.2f} | {e / g:.2f}x    |")
    print(f"graph compile: {compile_s:.2f} s")
    return {"graph_ms": g * 1e3, "pynative_ms": e * 1e3, "ratio": e / g, "compile_s": compile_s}


def main(argv):
    CLI(run, args=argv)
    return 0
