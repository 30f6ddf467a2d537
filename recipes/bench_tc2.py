"""tc2 on one benchmark case: one JSON line on stdout, the fields `bench_peer.py` prints.

The tc2 side of `benchmark.py side`, one case per process (peak RSS is the process's). The
cases, the timing loop and the JSON line are `bench_protocol`'s, shared with the official
PyTorch driver; the steps are the ones `benchmark.py train` and `decode` time:

  train    `tc2.step.train_step` (`bench_train.make_train`: the release's AdamW recipe, clip
           1.0, float32, graph mode) on ONE [B, T] batch per optimizer step, as the official
           code runs it; --micro_batch splits it into micro-batches of that many rows.
           --recompute: auto (the step's default: one unrolled graph for a small model, layer
           by layer for a big one), none, selective or full.
  decode   `tc2.generate.generate`, greedy, no stop ids, its defaults otherwise (layer by
           layer); prefill = the time to the first new token, excluded from tokens/s.
  prefill  one `generate(..., max_new_tokens=1)` of [1, T]: the forward that produces the
           first token.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

from bench_protocol import CASES, SEQ_LENGTH, SHAPES, decode_fields, limit_threads, measure, result, tokens_per_step


def train_case(case: dict, recompute: str, micro_batch: Optional[int], seed: int):
    """(cfg, step, fields): one train_step per call on one of 4 fixed synthetic batches."""
    from bench_train import make_train
    from tc2.step import resolve_recompute
    B = case["batch"]
    micro = micro_batch or B
    if B % micro:
        raise ValueError(f"--micro_batch {micro} does not divide the batch {B}")
    cfg, state, batches, train = make_train(SHAPES[case["shape"]], B, case["seq"], B // micro, recompute, seed)
    data = [next(batches) for _ in range(4)]
    losses = []

    def step(i):
        nonlocal state
        state, metrics = train(state, data[i % len(data)])
        losses.append(metrics["loss"])

    def fields(timed):
        return dict(loss_first=losses[0], loss_last=losses[-1], recompute=recompute,
                    recompute_resolved=resolve_recompute(recompute, cfg), micro_batches=B // micro)

    return cfg, step, fields


def _generation_model(case: dict, seed: int):
    """The seeded float32 model of the case's shape, configured as the official driver's."""
    import tc2
    from tc2.config import ModelConfig
    cfg = ModelConfig(**SHAPES[case["shape"]], dtype="float32", training_seqlen=SEQ_LENGTH,
                      base_seqlen=SEQ_LENGTH, seq_length=SEQ_LENGTH)
    return cfg, tc2.init_params(cfg, seed)


def decode_case(case: dict, seed: int, layered: bool):
    """(cfg, step, fields): one greedy generation of N tokens from B random prompts per call."""
    from bench_decode import random_prompts, timed_generate
    cfg, params = _generation_model(case, seed)
    prompts = random_prompts(cfg, case["batch"], case["prompt"], seed + 1)
    prefill_times, decode_times, outputs = [], [], []

    def step(i):
        pre, dec, steps = timed_generate(params, cfg, prompts, case["new_tokens"], layered)
        prefill_times.append(pre)
        decode_times.append(dec)
        outputs.append(steps)
        return dec

    def fields(timed):
        return dict(decode_fields(case, prefill_times, decode_times, timed),
                    same_tokens_every_run=all(o == outputs[0] for o in outputs),
                    tokens_row0_head=[s[0] for s in outputs[0][:8]])

    return cfg, step, fields


def prefill_case(case: dict, seed: int, layered: bool):
    """(cfg, step, fields): the first new token of one [B, T] prompt batch per call."""
    from bench_decode import random_prompts, timed_generate
    cfg, params = _generation_model(case, seed)
    prompts = random_prompts(cfg, case["batch"], case["seq"], seed + 1)

    def step(i):
        timed_generate(params, cfg, prompts, 1, layered)

    return cfg, step, lambda timed: {}


def run(case: str, recompute: str = "auto", micro_batch: Optional[int] = None, steps: int = 5, warmup: int = 3,
        threads: int = 2, seed: int = 0, layered: Optional[bool] = None) -> dict:
    """One case of `bench_protocol` on tc2 -> the JSON object (also printed as one line).

    Args:
        case: a bench_protocol case (train_S, train_M, decode_b1, decode_b8, prefill_1024, *_tiny).
        recompute: train cases: auto, none, selective or full (ignored by the others).
        micro_batch: train cases: rows per forward/backward (default: the whole batch).
        steps: timed steps (the median is reported).
        warmup: untimed steps before, the first (compiling) one included.
        threads: CPU kernel threads (the official driver uses as many torch threads).
        seed: weights and data.
        layered: decode and prefill cases: `generate(layered=...)` (layer by layer, or one graph;
            default: generate's own choice).
    """
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; choose from {sorted(CASES)}")
    train = CASES[case]["kind"] == "train"
    if not train and (recompute != "auto" or micro_batch is not None):
        raise ValueError(f"--recompute and --micro_batch apply to train cases, not {case}")
    if train and layered is not None:
        raise ValueError(f"--layered applies to decode and prefill cases, not {case}")
    loadavg_start = os.getloadavg()
    limit_threads(threads)                              # before MindSpore and numpy's BLAS start
    import mindspore as ms
    import tc2
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.device_context.cpu.op_tuning.threads_num(threads)
    spec = CASES[case]
    if spec["kind"] == "train":
        cfg, step, fields = train_case(spec, recompute, micro_batch, seed)
    else:
        cfg, step, fields = (decode_case if spec["kind"] == "decode" else prefill_case)(spec, seed, layered)
    measured = measure(step, tokens_per_step(spec), warmup, steps)
    if not train and layered is None:
        from tc2.step import unrolled_suits
        layered = not unrolled_suits(cfg)
    variant = recompute if train else ("layered" if layered else "unrolled")
    res = result(case, "tc2", variant, measured, loadavg_start, **fields(steps), mode="tc2", backend="graph",
                 params=tc2.count_params(cfg), mindspore=ms.__version__, threads=threads, steps=steps,
                 warmup=warmup, seed=seed)
    print(json.dumps(res), flush=True)
    return res


def main(argv=None) -> int:
    from jsonargparse import CLI
    CLI(run, args=argv, as_positional=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
