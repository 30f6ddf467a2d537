"""Benchmarks (not tests): `python recipes/benchmark.py {forward,train,decode,parallel,compile,memory,smoke,side} [flags]`.

Each subcommand lives in its own module next to this file and prints a table of ratios against
a reference measured in the same run (absolute times on shared machines are noise). `side` puts
tc2 beside the official PyTorch TeleChat2 code (torch eager and torch.compile), runs
interleaved, when an interpreter with torch (`pip install 'tc2[peer]'`) and the official
model/115B files are given; without them it prints tc2's numbers and says why the peer's are missing.
"""
import importlib
import os
import sys

SUBCOMMANDS = {"forward": "bench_forward", "train": "bench_train", "decode": "bench_decode", "parallel": "bench_parallel",
               "compile": "bench_compile", "memory": "bench_memory", "smoke": "bench_smoke",
               "side": "bench_side"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: benchmark.py {{{','.join(SUBCOMMANDS)}}} [--help]", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
