"""`benchmark.py compile`: the first train step and the first generate against depth.

Each measurement runs in a fresh process (nothing compiled or cached before it): the time of the
first `train_step` (compile + one step) and of the first `generate` (compile + prefill + 32
tokens), for 4 / 8 / 16 / 32 layers of a narrow model (hidden 64, as the issue that asked for
it), once layer by layer (one compiled decoder layer, the default) and once as one unrolled
graph of the whole model. The table also gives the steady step time of each, so the price of
the layer-by-layer host loop is visible next to what it saves.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import time
from typing import List

import numpy as np
from jsonargparse import CLI


def _measure(n_layer: int, layered: bool, hidden: int, seq: int, batch: int) -> dict:
    import mindspore as ms  # noqa: F401  (imported here: one fresh runtime per measurement)
    import tc2
    from tc2.train.batches import synthetic_batches
    cfg = tc2.tiny(n_layer=n_layer, hidden_size=hidden, n_head=4, num_key_value_heads=2, ffn_hidden_size=3 * hidden,
                   vocab_size=512, training_seqlen=seq, base_seqlen=seq, seq_length=seq + 64)
    params = tc2.init_params(cfg, 0)
    opt = tc2.make_optimizer(tc2.OptimConfig(), 100)
    state = tc2.init_train_state(params, opt)
    data = synthetic_batches(cfg, batch, seq)
    recompute = "selective" if layered else "none"
    t0 = time.perf_counter()
    state, _ = tc2.train_step(state, next(data), cfg, opt, clip_norm=1.0, recompute=recompute)
    first_step = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        state, _ = tc2.train_step(state, next(data), cfg, opt, clip_norm=1.0, recompute=recompute)
        times.append(time.perf_counter() - t0)
    prompt = [list(range(4, 36))]
    t0 = time.perf_counter()
    tc2.generate_ids(state.params, cfg, prompt, max_new_tokens=32, stop_ids=(), layered=layered)
    first_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    tc2.generate_ids(state.params, cfg, prompt, max_new_tokens=32, stop_ids=(), layered=layered)
    second_gen = time.perf_counter() - t0
    return dict(n_layer=n_layer, layered=layered, first_step=first_step, step=float(np.median(times)),
                first_generate=first_gen, generate=second_gen)


def _in_child(*args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, args)


def main(argv=None) -> int:
    def run(layers: List[int] = [4, 8, 16, 32], hidden: int = 64, seq: int = 64, batch: int = 4,
            unrolled: bool = True):
        """First train step and first generate (32 new tokens) per depth, each in a fresh process.

        Args:
            layers: depths to measure.
            hidden: hidden size (4 heads / 2 KV heads, ffn 3 x hidden, vocab 512).
            seq: training sequence length.
            batch: rows per training batch.
            unrolled: also measure the single unrolled graph (recompute none, unrolled generate).
        """
        rows = []
        for n in layers:
            for layered in ([True, False] if unrolled else [True]):
                rows.append(_in_child(n, layered, hidden, seq, batch))
                print(json.dumps(rows[-1]), flush=True)
        base = {r["layered"]: r for r in rows if r["n_layer"] == layers[0]}
        print(f"\nfresh process each; hidden {hidden}, batch {batch} x {seq}; first = compile + run; "
              f"ratio = first / first at {layers[0]} layers")
        head = (f"{'layers':>6} {'mode':<9} {'first step s':>12} {'ratio':>6} {'step s':>7} "
                f"{'first generate s':>16} {'ratio':>6} {'generate s':>10}")
        print(head)
        print("-" * len(head))
        for r in rows:
            b = base[r["layered"]]
            print(f"{r['n_layer']:>6} {'layered' if r['layered'] else 'unrolled':<9} {r['first_step']:>12.1f} "
                  f"{r['first_step'] / b['first_step']:>6.2f} {r['step']:>7.3f} {r['first_generate']:>16.1f} "
                  f"{r['first_generate'] / b['first_generate']:>6.2f} {r['generate']:>10.3f}")
        return 0

    return CLI(run, args=argv, as_positional=False)


if __name__ == "__main__":
    import sys
    sys.exit(main())
