"""`benchmark.py memory`: peak memory per process of each executed layout, against `plan_memory`.

Memory is what recompute, pipeline stages and ZeRO are for, so it is measured: the peak resident
set (ru_maxrss) of every process after a few training steps, each configuration in fresh
processes (one process, or msrun with 2 workers), next to what `tc2.plan_memory` predicts for
that process. The plan counts weights, gradients, AdamW state and the activations the
recompute mode keeps; the measured peak also holds the MindSpore runtime, compiled graphs,
the data and framework buffers, so the table also gives that baseline (a process that only
imported MindSpore and built the model).

Model: vocab 32000, hidden 512, 4 layers, 8 / 2 heads, ffn 1536 (45M parameters: weights,
gradients and Adam moments are 720 MB).
"""
from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(vocab_size=32000, hidden_size=512, n_layer=4, n_head=8, num_key_value_heads=2, ffn_hidden_size=1536)


def _cfg(args: dict):
    import tc2
    seq = args["seq"]
    return tc2.ModelConfig(**args.get("model", MODEL), training_seqlen=seq, base_seqlen=seq, seq_length=seq)


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _train(args: dict) -> dict:
    """A few steps of `tc2.fit`'s step on this process's share; returns its peak and timings."""
    import tc2
    from tc2.step import split_micro_batches
    from tc2.train.batches import synthetic_batches
    parallel = tc2.ParallelConfig(dp=args["dp"], pp=args["pp"], zero=args["zero"], recompute=args["recompute"])
    ctx = tc2.context_for(parallel)
    cfg = _cfg(args)
    base = _peak_gib()
    params = tc2.init_params(cfg, 0)
    from tc2.parallel.collectives import local_params
    params = local_params(params, cfg, ctx)
    opt = tc2.make_optimizer(tc2.OptimConfig(), 100)
    state = tc2.init_train_state(params, opt, ctx=ctx)
    data = synthetic_batches(cfg, args["batch"], args["seq"])
    k = args["batch"] // (args["micro"] * ctx.dp)
    times = []
    for _ in range(args["steps"]):
        batch = split_micro_batches(next(data), k) if k > 1 else next(data)
        t0 = time.perf_counter()
        state, m = tc2.train_step(state, batch, cfg, opt, clip_norm=1.0, ctx=ctx, recompute=args["recompute"])
        times.append(time.perf_counter() - t0)
    return dict(rank=ctx.rank, peak_gib=_peak_gib(), base_gib=base, step_s=min(times[1:] or times), loss=m["loss"],
                first_step_s=times[0])


def plan_gib(args: dict) -> float:
    import tc2
    from tc2.layerwise import head_chunk_rows
    cfg = _cfg(args)
    mesh = tc2.Mesh(dp=args["dp"], pp=args["pp"])
    k = args["batch"] // (args["micro"] * args["dp"])
    layered = args["recompute"] != "none"                  # tc2.layerwise: GPipe, the head in row chunks
    head_rows = head_chunk_rows(args["micro"] * args["seq"], cfg.vocab_size) if layered else None
    p = tc2.plan_memory(cfg, mesh, seq_len=args["seq"], micro_batch=args["micro"], recompute=args["recompute"],
                        micro_batches=k if args["pp"] > 1 else 1, zero=args["zero"], sequence_parallel=False,
                        flash_attention=False, schedule="gpipe", head_rows=head_rows)
    return p.total / 2 ** 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(args: dict, timeout: int) -> List[dict]:
    """The configuration in fresh processes: [per-rank result]."""
    n = args["dp"] * args["pp"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r{rank}.json")
        bin_dir = os.path.dirname(sys.executable)
        env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
        worker = [os.path.abspath(__file__), "worker", out, json.dumps(args)]
        if n == 1:
            cmd = [sys.executable] + worker
        else:
            cmd = [os.path.join(bin_dir, "msrun"), f"--worker_num={n}", f"--local_worker_num={n}",
                   f"--master_port={_free_port()}", f"--log_dir={os.path.join(tmp, 'log')}", "--join=True"] + worker
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        results = []
        for r in range(n):
            path = out.format(rank=r)
            if not os.path.isfile(path):
                log = os.path.join(tmp, "log", f"worker_{r}.log")
                tail = open(log, errors="replace").read()[-3000:] if os.path.isfile(log) else proc.stderr[-3000:]
                raise RuntimeError(f"{args}: rank {r} wrote nothing (exit {proc.returncode})\n{tail}")
            with open(path) as f:
                results.append(json.load(f))
        return results


def worker(out: str, args: dict) -> None:
    if args["dp"] * args["pp"] > 1:
        from mindspore.communication import init
        init()                                       # msrun's scheduler process stops here
    res = _train(args)
    with open(out.format(rank=res["rank"]), "w") as f:
        json.dump(res, f)


CASES = {
    "recompute": [dict(dp=1, pp=1, zero=0, recompute=r, seq=1024, batch=1, micro=1) for r in ("none", "selective", "full")],
    "layouts": [dict(dp=1, pp=1, zero=0, recompute="selective", seq=128, batch=8, micro=4),
                dict(dp=2, pp=1, zero=0, recompute="selective", seq=128, batch=8, micro=4),
                dict(dp=2, pp=1, zero=1, recompute="selective", seq=128, batch=8, micro=4),
                dict(dp=1, pp=2, zero=0, recompute="selective", seq=128, batch=8, micro=4)],
}


def main(argv=None) -> int:
    from jsonargparse import CLI

    def run(groups: List[str] = ["recompute", "layouts"], steps: int = 3, timeout: int = 1200):
        """Peak RSS per process (max over ranks) and the plan, per configuration.

        Args:
            groups: "recompute" (one process, [1, 1024] rows, none / selective / full) and/or
                "layouts" (rows of 128, global batch 8, micro-batch 4: one process, dp=2, dp=2 ZeRO-1, pp=2).
            steps: training steps per configuration (the peak is taken after them).
            timeout: seconds per configuration.
        """
        print(f"model: {MODEL} (45M parameters); peak = max over ranks of ru_maxrss after {steps} steps; "
              "base = the process before building the model")
        head = (f"{'layout':<18} {'recompute':<10} {'rows':>9} {'plan GiB':>9} {'peak GiB':>9} {'base GiB':>9} "
                f"{'peak-base':>9} {'(peak-base)/plan':>17} {'step s':>7}")
        print(head)
        print("-" * len(head))
        for g in groups:
            for args in CASES[g]:
                res = run_layout({**args, "steps": steps}, timeout)
                top = max(res, key=lambda r: r["peak_gib"])
                plan = plan_gib(args)
                name = f"dp{args['dp']} pp{args['pp']}" + (" zero1" if args["zero"] else "")
                print(f"{name:<18} {args['recompute']:<10} {args['batch']:>3}x{args['seq']:<5} {plan:>9.2f} "
                      f"{top['peak_gib']:>9.2f} {top['base_gib']:>9.2f} {top['peak_gib'] - top['base_gib']:>9.2f} "
                      f"{(top['peak_gib'] - top['base_gib']) / plan:>17.2f} {top['step_s']:>7.2f}", flush=True)
        return 0

    return CLI(run, args=argv, as_positional=False)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.path.insert(0, ROOT)
        worker(sys.argv[2], json.loads(sys.argv[3]))
    else:
        sys.exit(main(sys.argv[1:]))
