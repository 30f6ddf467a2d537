"""Convert, re-shard and compare TeleChat2 checkpoints (HF, MindFormers .ckpt, tc2 tensor-parallel).

    python recipes/convert.py hf-to-mf  TeleChat2-7B/ telechat2_7b.ckpt [--dtype bfloat16]
    python recipes/convert.py mf-to-hf  output/checkpoint/ hf_out/ --mf_yaml finetune_telechat_35b.yaml \\
                                        [--pattern '*-1_1500.ckpt'] [--max_shard_size 5GB]
    python recipes/convert.py mf-to-hf  small.ckpt hf_out/ --n_head 8 --seq_length 4096   # a non-release size
    python recipes/convert.py tc2-to-hf runs/sft/step_001000/ export/ --dtype bfloat16 --max_shard_size 5GB
    python recipes/convert.py split     TeleChat2-35B/ tp4/ --tp 4
    python recipes/convert.py merge     tp4/ merged/
    python recipes/convert.py verify    TeleChat2-7B/ telechat2_7b.ckpt [--atol 0]

Replaces MindFormers' convert_weight.py / convert_reversed.py / transform_ckpt.py for TeleChat2.
A thin shell over `tc2.checkpoint.convert` (formats, split rules, atomic writes: see that module) and
`tc2.checkpoint.mindformers` (.ckpt files and rank-directory merging). Every conversion streams one tensor
at a time and shows progress on stderr; exit code 0 = done, 1 = verify found differences,
2 = error (the message names the file / tensor; the destination is left untouched).
"""
from __future__ import annotations

import sys
from typing import Literal, Optional

from jsonargparse import ActionYesNo, ArgumentParser

from tc2.checkpoint.convert import convert_checkpoint, verify_checkpoints
from tc2.train.checkpoints import export_training_checkpoint

DType = Literal["float32", "float16", "bfloat16"]

# subcommand -> (source kinds accepted, output format, help)
COMMANDS = {
    "hf-to-mf": (("hf",), "mf", "an HF directory -> a MindFormers .ckpt (MF names, no transposes)"),
    "mf-to-hf": (("mindformers",), "hf", "a MindFormers .ckpt or rank_*/ directory -> an HF directory"),
    "tc2-to-hf": (("hf",), "hf", "a tc2 training checkpoint (step_* dir, or a run dir: its newest complete "
                                 "step) -> an HF directory of its weights only"),
    "split": ((), "tp", "any checkpoint -> tc2 tensor-parallel shards rank_*/model.safetensors"),
    "merge": (("tc2-tp",), "hf", "tc2 tensor-parallel shards -> an HF directory"),
}


def _source_flags(p: ArgumentParser) -> None:
    p.add_argument("--n_head", type=Optional[int], default=None,
                   help="attention heads, when the source has no config (only needed for non-release sizes)")
    p.add_argument("--mf_yaml", type=Optional[str], default=None,
                   help="MindFormers yaml of the run: model_config, parallel_config (model_parallel, "
                        "data_parallel, vocab_emb_dp) and parallel (enable_parallel_optimizer: needed to merge "
                        "an optimizer-parallel rank_*/ checkpoint)")
    p.add_argument("--config", type=Optional[str], default=None,
                   help="an HF config.json (or its directory) describing the model")
    p.add_argument("--pattern", type=str, default="*.ckpt",
                   help="glob choosing the .ckpt in each rank_* directory (when there are several)")
    p.add_argument("--seq_length", type=Optional[int], default=None,
                   help="seq_length = training_seqlen = base_seqlen of a non-release size when no --mf_yaml or "
                        "--config gives them (the weights do not; they set where dynamic NTK starts)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="convert.py", description=__doc__.split("\n")[0])
    sub = p.add_subcommands(dest="command")
    for name, (_, to, help_text) in COMMANDS.items():
        sp = ArgumentParser(description=help_text)
        sp.add_argument("src", type=str, help="source checkpoint")
        sp.add_argument("dest", type=str, help="destination (.ckpt file for hf-to-mf, else a directory)")
        sp.add_argument("--dtype", type=DType, default="float32", help="stored dtype of the output")
        if to == "hf":
            sp.add_argument("--max_shard_size", type=Optional[str], default=None,
                            help="e.g. 5GB: write model-0000i-of-0000n.safetensors + index.json")
        if to == "tp":
            sp.add_argument("--tp", type=int, required=True, help="tensor-parallel ranks")
        _source_flags(sp)
        sp.add_argument("--progress", action=ActionYesNo, default=True, help="progress on stderr")
        sub.add_subcommand(name, sp, help=help_text)
    sp = ArgumentParser(description="compare two checkpoints of any formats, tensor by tensor")
    sp.add_argument("a", type=str)
    sp.add_argument("b", type=str)
    sp.add_argument("--atol", type=float, default=0.0, help="largest |a - b| accepted (default: exact)")
    sp.add_argument("--quiet", action=ActionYesNo, default=False, help="print only mismatches and the summary")
    _source_flags(sp)
    sub.add_subcommand("verify", sp, help="max |a-b| per tensor, missing/extra names; exit 1 on mismatch")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cmd = args.command
    a = args[cmd]
    hints = {k: a[k] for k in ("n_head", "mf_yaml", "config", "seq_length") if a[k] is not None}
    hints["pattern"] = a.pattern
    try:
        if cmd == "verify":
            report = verify_checkpoints(a.a, a.b, atol=a.atol, **hints)
            for line in report.lines():
                if not a.quiet or "MISMATCH" in line or line.startswith(("missing", "extra", "OK")):
                    print(line)
            return 0 if report.ok else 1
        expect, to, _ = COMMANDS[cmd]
        if cmd == "tc2-to-hf":
            done = export_training_checkpoint(a.src, a.dest, dtype=a.dtype, progress=a.progress,
                                              max_shard_size=a.max_shard_size)
        else:
            done = convert_checkpoint(a.src, a.dest, to=to, dtype=a.dtype, expect=expect, progress=a.progress,
                                      max_shard_size=a.get("max_shard_size"), tp=a.get("tp"), **hints)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    c = done.config
    print(f"wrote {a.dest} from {done.source}: {done.tensors} tensors, {done.nbytes / 1e6:,.1f} MB {a.dtype} "
          f"({done.source_kind} -> {to}; {c.n_layer} layers, hidden {c.hidden_size}, heads {c.n_head}/"
          f"{c.num_key_value_heads}, vocab {c.vocab_size}) in {done.seconds:.1f}s")
    if done.ignored:
        print(f"skipped {len(done.ignored)} non-weight entries of the source (e.g. {done.ignored[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
