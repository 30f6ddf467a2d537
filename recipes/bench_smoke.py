"""`benchmark.py smoke`: TeleChat2-7B's real layer widths, 2 layers, on this machine.

Generation: the exact 7B shapes (hidden 4096, 32 heads, ffn 12288, vocab 131072; 1.5B
parameters with 2 layers) saved as an HF directory (bfloat16 on disk), loaded in a fresh
process, 32 greedy tokens generated: load time, first generate (compile + prefill + decode),
decode tokens/s of a second call, peak RSS.

Training: one step per rank under msrun, dp=2, ZeRO-1, recompute full (the 7B recipe's
modes), same widths. With the release vocabulary the 2-layer model is 1.51B parameters:
float32 weights + gradients + half the Adam moments are 18 GB per rank, 36 GB for two ranks,
more than this 24 GiB machine, so the training vocabulary is smaller (`train_vocab`, printed)
and the plan for the full vocabulary is printed beside it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from bench_memory import plan_gib, run_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = dict(hidden_size=4096, n_layer=2, n_head=32, num_key_value_heads=32, ffn_hidden_size=12288)


def _generate(hf_dir: str) -> dict:
    """In a fresh process: load the HF directory, generate 32 tokens twice."""
    import resource
    import tc2
    t0 = time.perf_counter()
    params, cfg = tc2.load_hf(hf_dir)
    load_s = time.perf_counter() - t0
    prompt = [list(range(100, 164))]
    t0 = time.perf_counter()
    tc2.generate_ids(params, cfg, prompt, max_new_tokens=32, stop_ids=())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = tc2.generate_ids(params, cfg, prompt, max_new_tokens=32, stop_ids=())
    second = time.perf_counter() - t0
    return dict(params=tc2.count_params(cfg), load_s=load_s, first_generate_s=first, generate_s=second,
                tokens=len(out[0]), peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


def _save(hf_dir: str) -> float:
    import tc2
    cfg = tc2.telechat2_7b(**WIDTHS)
    t0 = time.perf_counter()
    tc2.save_hf(tc2.init_params(cfg, 0), cfg, hf_dir, dtype="bfloat16")
    return time.perf_counter() - t0


def _child(fn: str, arg: str) -> dict:
    """fn(arg) in a fresh interpreter (the memory of one stage is returned before the next)."""
    code = (f"import sys, json; sys.path[:0] = [{ROOT!r}, {os.path.dirname(os.path.abspath(__file__))!r}]; "
            f"import bench_smoke as b; print('RESULT ' + json.dumps(b.{fn}({arg!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, GLOG_v="3"))
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{fn} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


def main(argv=None) -> int:
    from jsonargparse import CLI

    def run(train_vocab: int = 8192, seq: int = 128, timeout: int = 3000, generate: bool = True, train: bool = True):
        """TeleChat2-7B widths with 2 layers: HF load + 32 generated tokens; a dp=2 ZeRO-1 step.

        Args:
            train_vocab: vocabulary of the training model (the release's 131072 does not fit here).
            seq: tokens per row; each rank trains on one row.
            timeout: seconds for each part.
            generate: run the generation part.
            train: run the training part.
        """
        print(f"widths: {WIDTHS}")
        if generate:
            with tempfile.TemporaryDirectory(dir=os.environ.get("TC2_SMOKE_DIR")) as tmp:
                hf_dir = os.path.join(tmp, "tc2-7b-2layers")
                save_s = _child("_save", hf_dir)
                g = _child("_generate", hf_dir)
            print(f"generate (vocab 131072, {g['params']:,} params, bf16 HF dir written in {save_s:.0f} s): "
                  f"load {g['load_s']:.1f} s, first generate (compile + 64-token prefill + 32 tokens) "
                  f"{g['first_generate_s']:.1f} s, second {g['generate_s']:.1f} s = "
                  f"{g['tokens'] / g['generate_s']:.2f} tokens/s, peak RSS {g['peak_gib']:.1f} GiB", flush=True)
        if train:
            args = dict(model={**WIDTHS, "vocab_size": train_vocab}, dp=2, pp=1, zero=1, recompute="full",
                        seq=seq, batch=2, micro=1, steps=2)
            full = dict(args, model={**WIDTHS, "vocab_size": 131072})
            res = run_layout(args, timeout)
            tokens = args["batch"] * seq
            for r in res:
                print(f"train rank {r['rank']} (vocab {train_vocab}, dp=2 ZeRO-1 recompute full, {tokens} tokens/step): "
                      f"first step {r['first_step_s']:.1f} s, step {r['step_s']:.1f} s = {tokens / r['step_s']:.1f} "
                      f"tokens/s, peak RSS {r['peak_gib']:.1f} GiB (base {r['base_gib']:.1f}), loss {r['loss']:.3f}")
            print(f"plan_memory per rank: {plan_gib(args):.1f} GiB at vocab {train_vocab}; "
                  f"{plan_gib(full):.1f} GiB at the release vocab 131072 (x2 ranks > this machine's 24 GiB)")
        return 0

    return CLI(run, args=argv, as_positional=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
