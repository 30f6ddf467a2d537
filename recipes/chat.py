"""Interactive multi-turn chat in the terminal, answers streamed as they are generated.

    python recipes/chat.py --checkpoint TeleChat2-7B [--tokenizer .../tokenizer.model]
    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=logs --join=True \\
        recipes/chat.py --checkpoint TeleChat2-35B --parallel.tp 2

Type a message and press Enter. Commands:
    /reset            forget the conversation (keeps the system prompt)
    /system <text>    set the system prompt and start a new conversation
    /system           show the current system prompt
    /help             this list
    /quit             leave (as does Ctrl-D)
Ctrl-D (end of input) quits; Ctrl-C stops the answer being generated. When the conversation
outgrows the context (max_len minus the answer budget), the oldest rounds are dropped.
A thin shell over `tc2.inference.chat` (under msrun rank 0 reads the terminal).
"""
from __future__ import annotations

import sys

from jsonargparse import ActionConfigFile, ArgumentParser

from tc2.inference.chat import HELP, ChatSession, chat_loop, null_streams
from tc2.inference.load import GenerationOptions, load_for_generation
from tc2.parallel.collectives import context_for
from tc2.parallel.mesh import ParallelConfig
from tc2.train.setup import check_groups


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="chat.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of these flags")
    p.add_class_arguments(GenerationOptions, None)
    p.set_defaults(max_new_tokens=1024)
    p.add_argument("--stats", type=bool, default=True, help="print tokens and tokens/s after answers")
    p.add_class_arguments(ParallelConfig, "parallel", help="tp layout under msrun")
    return p


def main(argv=None, *, stdin=None, stdout=None, stderr=None) -> int:
    stdin, out, err = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_groups(args, ("parallel",))
        ctx = context_for(parser.instantiate(args).parallel)     # first: msrun's scheduler stops here
        opts = GenerationOptions(**{k: args[k] for k in GenerationOptions.__dataclass_fields__})
        model = load_for_generation(opts, ctx)
    except (OSError, KeyError, ValueError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        err.write(f"error: {msg}\n")
        return 2
    if not ctx.is_main:
        out, err = null_streams()
    session = ChatSession(model.params, model.cfg, model.tokenizer, model.gen, style=opts.style, system=opts.system,
                          max_len=model.max_len, max_new_tokens=opts.max_new_tokens, out=out, err=err,
                          stats=args.stats)
    err.write(f"TeleChat2 ({model.cfg.n_layer} layers, hidden {model.cfg.hidden_size}), context "
              f"{model.max_len} tokens. {HELP}\n")
    return chat_loop(session, stdin, ctx)


if __name__ == "__main__":
    sys.exit(main())
