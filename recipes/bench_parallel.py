"""`benchmark.py parallel`: SPMD overhead on this machine, measured against one process.

1. Train step tokens/s on a global batch [batch, seq]: `tc2.step.train_step` in one process vs
   the same function under a dp=2 context in msrun (2 workers, each half the rows).
2. Attention forward+backward at `ring_seq` tokens: full causal attention in one process vs
   ring attention with cp=2 (zigzag, all-reduce rotation) under msrun.

On a 2-core CPU the workers share the cores, so expect no speed-up: the numbers show what the
collectives (sum-AllReduce for gradients, slot all-reduce for the K/V ring) cost. Times are
medians of `iters` calls after `warmup` calls; compile time is reported separately.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_cfg(hidden, n_layer, n_head, kv_heads, ffn, vocab, seq):
    from tc2.config import tiny
    return tiny(hidden_size=hidden, n_layer=n_layer, n_head=n_head, num_key_value_heads=kv_heads,
                ffn_hidden_size=ffn, vocab_size=vocab, training_seqlen=seq, base_seqlen=seq, seq_length=seq)


def _batch(cfg, batch, seq):
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, cfg.vocab_size, (batch, seq)).astype(np.int32)
    return {"tokens": tokens, "labels": np.roll(tokens, -1, axis=1)}


def _timed(fn, warmup, iters):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def _attention_inputs(seq, heads, kv_heads, head_dim):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, seq, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((1, seq, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((1, seq, kv_heads, head_dim)).astype(np.float32)
    return q, k, v, np.arange(seq, dtype=np.int32)[None]


def _attention_fwd_bwd(ring_ctx=None):
    """Jitted forward+backward of attention summed to a loss: full causal attention, or ring
    attention over `ring_ctx`'s context-parallel group."""
    import mindspore as ms
    from tc2.nn import attention_with_lse
    from tc2.nn.ring import ring_attention

    def loss(q, k, v, pos):
        if ring_ctx is None:
            out, _ = attention_with_lse(q, k, v, pos, pos)
        else:
            out, _ = ring_attention(q, k, v, pos, pos, rotate=ring_ctx.rotate, ring_size=ring_ctx.cp)
        return out.sum()

    @ms.jit
    def fwd_bwd(q, k, v, pos):
        return ms.grad(loss, grad_position=(0, 1, 2))(q, k, v, pos)
    return fwd_bwd


def _sync(out):
    for x in (out if isinstance(out, tuple) else (out,)):
        x.asnumpy()


# ---------------------------------------------------------------------------------------------
def worker(out_file: str, args: dict) -> None:
    """Runs under msrun: dp=2 train step, then cp=2 ring attention."""
    from mindspore.communication import get_rank, init
    init()
    import mindspore as ms
    from tc2.model import init_params
    from tc2.nn.ring import fold_ranks
    from tc2.optim import adamw
    from tc2.parallel.collectives import spmd_context
    from tc2.parallel.mesh import Mesh
    from tc2.step import init_train_state, train_step

    cfg = _model_cfg(**{k: args[k] for k in ("hidden", "n_layer", "n_head", "kv_heads", "ffn", "vocab", "seq")})
    batch = _batch(cfg, args["batch"], args["seq"])
    ctx = spmd_context(Mesh(dp=2))
    opt = adamw(1e-4)
    state = {"s": init_train_state(init_params(cfg, 0), opt)}

    def step():
        state["s"], m = train_step(state["s"], batch, cfg, opt, clip_norm=1.0, ctx=ctx)
    dp_first, dp_step = _timed(step, args["warmup"], args["iters"])

    ctx = spmd_context(Mesh(cp=2))
    q, k, v, pos = _attention_inputs(args["ring_seq"], args["heads"], args["attn_kv_heads"], args["head_dim"])
    local = [ms.Tensor(fold_ranks(a, 2, "zigzag")[ctx.cp_rank:ctx.cp_rank + 1]) for a in (q, k, v, pos)]
    fn = _attention_fwd_bwd(ctx)
    ring_first, ring_t = _timed(lambda: _sync(fn(*local)), args["warmup"], args["iters"])
    if get_rank() == 0:
        with open(out_file, "w") as f:
            json.dump({"dp_first": dp_first, "dp_step": dp_step, "ring_first": ring_first, "ring": ring_t}, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(hidden: int = 256, n_layer: int = 2, n_head: int = 4, kv_heads: int = 2, ffn: int = 704,
        vocab: int = 1024, batch: int = 4, seq: int = 256, ring_seq: int = 2048, heads: int = 8,
        attn_kv_heads: int = 2, head_dim: int = 64, warmup: int = 2, iters: int = 5, timeout: int = 900):
    """Single process vs msrun (2 workers): dp=2 train step and cp=2 ring attention."""
    import mindspore as ms
    from tc2.model import count_params, init_params
    from tc2.optim import adamw
    from tc2.step import init_train_state, train_step

    args = dict(hidden=hidden, n_layer=n_layer, n_head=n_head, kv_heads=kv_heads, ffn=ffn, vocab=vocab,
                batch=batch, seq=seq, ring_seq=ring_seq, heads=heads, attn_kv_heads=attn_kv_heads,
                head_dim=head_dim, warmup=warmup, iters=iters)
    cfg = _model_cfg(hidden, n_layer, n_head, kv_heads, ffn, vocab, seq)
    data = _batch(cfg, batch, seq)
    print(f"parallel benchmark: model {count_params(cfg):,} params (hidden {hidden}, {n_layer} layers), "
          f"batch {batch} x {seq}; attention {heads}/{attn_kv_heads} heads x {head_dim} at {ring_seq} tokens",
          flush=True)

    opt = adamw(1e-4)
    state = {"s": init_train_state(init_params(cfg, 0), opt)}

    def step():
        state["s"], _ = train_step(state["s"], data, cfg, opt, clip_norm=1.0)
    one_first, one_step = _timed(step, warmup, iters)
    q, k, v, pos = (ms.Tensor(a) for a in _attention_inputs(ring_seq, heads, attn_kv_heads, head_dim))
    full = _attention_fwd_bwd()
    full_first, full_t = _timed(lambda: _sync(full(q, k, v, pos)), warmup, iters)

    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.json")
        bin_dir = os.path.dirname(sys.executable)
        env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3",
                   PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
        cmd = [os.path.join(bin_dir, "msrun"), "--worker_num=2", "--local_worker_num=2",
               f"--master_port={_free_port()}", f"--log_dir={os.path.join(tmp, 'log')}", "--join=True",
               os.path.abspath(__file__), "msrun-worker", out_file, json.dumps(args)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if not os.path.isfile(out_file):
            logs = ""
            log_dir = os.path.join(tmp, "log")
            for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
                with open(os.path.join(tmp, "log", name), errors="replace") as f:
                    logs += f"== {name}\n" + "".join(f.readlines()[-30:])
            print(f"msrun failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{logs}", file=sys.stderr)
            return None
        with open(out_file) as f:
            res = json.load(f)
    tokens = batch * seq
    rows = [("train step, 1 process", one_step, tokens / one_step, one_first, 1.0),
            ("train step, dp=2 (msrun)", res["dp_step"], tokens / res["dp_step"], res["dp_first"],
             one_step / res["dp_step"]),
            (f"attention fwd+bwd {ring_seq}, full", full_t, ring_seq / full_t, full_first, 1.0),
            (f"attention fwd+bwd {ring_seq}, ring cp=2", res["ring"], ring_seq / res["ring"], res["ring_first"],
             full_t / res["ring"])]
    print("| what | ms/step | tokens/s | first call s | speed vs 1 process |")
    print("|---|---|---|---|---|")
    for name, t, tps, first, ratio in rows:
        print(f"| {name} | {t * 1e3:.1f} | {tps:,.0f} | {first:.1f} | {ratio:.2f}x |")
    print(f"msrun job wall time (start-up, init, compiles, runs): {wall:.1f} s")
    return {"one_step_ms": one_step * 1e3, "dp2_step_ms": res["dp_step"] * 1e3,
            "full_attention_ms": full_t * 1e3, "ring_cp2_ms": res["ring"] * 1e3}


def main(argv):
    from jsonargparse import CLI
    CLI(run, args=argv)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "msrun-worker":     # not "--...": msrun abbreviates options
        sys.path.insert(0, ROOT)
        worker(sys.argv[2], json.loads(sys.argv[3]))
    else:
        sys.exit(main(sys.argv[1:]))
