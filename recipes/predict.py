"""Batch prediction: chat-render each input, generate, write {"input", "output"} jsonl.

    python recipes/predict.py --checkpoint TeleChat2-7B --tokenizer TeleChat2-7B/tokenizer.model \\
        --input_file input.json --output_file predict.jsonl [--batch_size 8] [--do_sample true]
    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=logs --join=True \\
        recipes/predict.py --checkpoint TeleChat2-7B --input_file input.json --parallel.tp 2

`--input_file`: one JSON object per line (`{"input": "..."}`; an optional "system" sets that
line's system prompt), or one JSON list of such objects or of plain strings. An input may
carry history inline, MindFormers style: `<_user>q1<_bot>a1<_user>q2`. `--checkpoint` is an
official Hugging Face TeleChat2 directory or a tc2 training checkpoint (its HF-layout weights;
a directory of step sub-directories resolves to the newest). Outputs are printed as they
finish and written, in input order, atomically to `--output_file`. Under msrun,
`--parallel.tp N` splits every layer over N processes and `--parallel.dp M` splits the
prompts over M groups. A thin shell over `tc2.inference`; defaults are the release's
generation_config (spec §8).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from jsonargparse import ActionConfigFile, ArgumentParser

from tc2.files import write_jsonl_atomic
from tc2.inference.chat import Interrupts
from tc2.inference.load import GenerationOptions, load_for_generation
from tc2.inference.predict import predict, read_inputs
from tc2.parallel.collectives import context_for
from tc2.parallel.mesh import ParallelConfig
from tc2.train.setup import check_groups


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="predict.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of these flags")
    p.add_class_arguments(GenerationOptions, None)
    p.add_argument("--input_file", type=str, required=True)
    p.add_argument("--output_file", type=str, default="predict_output.jsonl")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--print_outputs", type=bool, default=True)
    p.add_class_arguments(ParallelConfig, "parallel", help="tp / dp layout under msrun")
    return p


def options(args) -> GenerationOptions:
    return GenerationOptions(**{k: args[k] for k in GenerationOptions.__dataclass_fields__})


def fail(e: BaseException) -> int:
    """A user error (bad path, input line, flag): one line on stderr, exit status 2."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg}", file=sys.stderr)
    return 2


def check_writable(path: str) -> None:
    """OSError (naming the directory) unless a file can be created next to `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
        raise OSError(f"--output_file {path}: cannot write in {directory} ({e.strerror or e})") from None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        check_groups(args, ("parallel",))
        ctx = context_for(parser.instantiate(args).parallel)     # first: msrun's scheduler stops here
        if args.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
        if ctx.is_main:                    # fail now, not after generating every answer
            check_writable(args.output_file)
        model = load_for_generation(options(args), ctx)
        items = read_inputs(args.input_file)
    except (OSError, KeyError, ValueError, TypeError) as e:
        return fail(e)
    say = (lambda msg: print(msg, file=sys.stderr)) if ctx.is_main else (lambda msg: None)
    say(f"loaded {model.checkpoint} ({model.cfg.n_layer} layers, hidden {model.cfg.hidden_size}) and "
        f"{len(items)} inputs in {time.perf_counter() - t0:.1f}s")

    def show(i, text):
        if args.print_outputs and ctx.is_main:
            print(json.dumps({"input": items[i]["input"], "output": text}, ensure_ascii=False), flush=True)
    try:                                   # with dp groups, rank 0 sees the others' answers at the end
        with Interrupts(enabled=ctx.size == 1):   # Ctrl-C: a message, not MindSpore's silent SIGTERM
            answers = predict(model, items, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              system=args.system, style=args.style, on_answer=show if ctx.dp == 1 else None,
                              log=say)
    except (OSError, KeyError, ValueError, TypeError) as e:
        return fail(e)
    except KeyboardInterrupt:
        say(f"interrupted: nothing written to {args.output_file} (the answers printed so far are complete)")
        return 130
    if ctx.dp > 1:
        for i, text in enumerate(answers):
            show(i, text)
    if ctx.is_main:
        write_jsonl_atomic(args.output_file, [{"input": it["input"], "output": a} for it, a in zip(items, answers)])
    say(f"wrote {len(items)} predictions to {args.output_file} ({time.perf_counter() - t0:.1f}s total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
