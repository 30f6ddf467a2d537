"""Interactive multi-turn chat in the terminal, answers streamed as they are generated.

    python recipes/chat.py --checkpoint TeleChat2-7B [--tokenizer .../tokenizer.model]

Type a message and press Enter. Commands:
    /reset            forget the conversation (keeps the system prompt)
    /system <text>    set the system prompt and start a new conversation
    /system           show the current system prompt
    /help             this list
    /quit             leave (as does Ctrl-D)
Ctrl-D (end of input) quits; Ctrl-C stops the answer being generated. When the conversation
outgrows the context (max_len minus the answer budget), the oldest rounds are dropped.
A thin shell over `tc2.generate.generate` + `tc2.chat.render_chat`.
"""
from __future__ import annotations

import os
import sys
import time

from jsonargparse import ArgumentParser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predict import add_model_args, fail, load_model  # noqa: E402  (sibling recipe: shared flags)

from tc2.data.chat import DEFAULT_SYSTEM_PROMPT, render_chat  # noqa: E402
from tc2.generate import generate, stream_text  # noqa: E402

HELP = """commands: /reset, /system <text>, /system, /help, /quit; Ctrl-D quits"""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="chat.py", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.set_defaults(max_new_tokens=1024)
    p.add_argument("--stats", type=bool, default=True, help="print tokens and tokens/s after answers")
    return p


class Chat:
    """The conversation state and one turn of it; I/O streams are injectable for tests."""

    def __init__(self, params, cfg, tokenizer, gen, *, style, system, max_len, max_new_tokens, out,
                 err, stats=True):
        """gen: keyword arguments of `generate` (sampling, stop_ids, seed, vocab_limit)."""
        self.params, self.cfg, self.tok, self.gen = params, cfg, tokenizer, dict(gen)
        self.style, self.system = style, system
        self.max_len, self.max_new_tokens = max_len, max_new_tokens
        self.out, self.err, self.stats = out, err, stats
        self.history = []
        self.turn = 0

    def messages(self, question):
        msgs = []
        if self.style == "template" and self.system is not None:
            msgs.append({"role": "system", "content": self.system})
        return msgs + self.history + [{"role": "user", "content": question}]

    def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        if name == "/reset":
            self.history = []
            self.err.write("(conversation cleared)\n")
        elif name == "/system" and arg.strip():
            if self.style != "template":
                self.err.write("(the 115b prompt format has no system prompt)\n")
                return
            self.system, self.history = arg.strip(), []
            self.err.write("(system prompt set; conversation cleared)\n")
        elif name == "/system":
            if self.style != "template":
                self.err.write("(the 115b prompt format has no system prompt)\n")
            else:
                self.err.write(f"system: {self.system if self.system is not None else DEFAULT_SYSTEM_PROMPT}\n")
        else:
            self.err.write(HELP + "\n")

    def prompt_ids(self, question: str, limit: int):
        """Prompt ids within `limit` tokens, dropping the oldest rounds of history (for good)."""
        while True:
            ids = render_chat(self.messages(question), self.tok, style=self.style)
            if len(ids) <= limit or not self.history:
                break
            self.history = self.history[2:]                 # one round: the user turn + the answer
            self.err.write(f"(oldest turn dropped to fit max_len={self.max_len})\n")
        if len(ids) > limit:
            raise ValueError(f"this message is {len(ids)} prompt tokens; at most {limit} fit "
                             f"(max_len {self.max_len} - answer budget)")
        return ids

    def answer(self, question: str) -> str:
        budget = min(self.max_new_tokens, self.max_len - 1)
        ids = self.prompt_ids(question, self.max_len - budget)
        t0 = time.perf_counter()
        gen = {**self.gen, "seed": self.gen.get("seed", 0) + self.turn}     # fresh noise each turn
        steps = generate(self.params, self.cfg, [ids], max_new_tokens=budget, max_len=self.max_len, **gen)
        new = []

        def row():
            for s in steps:
                if s[0] is not None:
                    new.append(s[0])
                    yield s[0]
        try:
            for delta in stream_text(self.tok, row()):
                self.out.write(delta)
                self.out.flush()
        except KeyboardInterrupt:
            self.err.write(" (interrupted)")
        self.out.write("\n")
        self.out.flush()
        text = self.tok.decode(new, skip_special_tokens=True)
        self.history += [{"role": "user", "content": question}, {"role": "bot", "content": text}]
        self.turn += 1
        if self.stats:
            dt = time.perf_counter() - t0
            self.err.write(f"[{len(ids)} prompt tokens, {len(new)} new tokens, "
                           f"{len(new) / max(dt, 1e-9):.1f} tok/s]\n")
        return text


def read_line(stdin, out, prompt: str):
    """One line of input, or None at end of input (Ctrl-D). A terminal gets line editing."""
    if stdin is sys.stdin and stdin.isatty():
        try:
            return input(prompt)
        except EOFError:
            out.write("\n")
            return None
    out.write(prompt)
    out.flush()
    line = stdin.readline()
    return None if line == "" else line.rstrip("\n")


def main(argv=None, *, stdin=None, stdout=None, stderr=None) -> int:
    stdin, out, err = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        params, cfg, tokenizer, gen = load_model(args)
        max_len = args.max_len or cfg.seq_length
        if args.max_new_tokens < 1 or args.max_new_tokens >= max_len:
            raise ValueError(f"--max_new_tokens must be in [1, max_len={max_len}), "
                             f"got {args.max_new_tokens}")
        if args.style == "115b" and args.system is not None:
            raise ValueError("--system: the 115b prompt format has no system prompt (use --style template)")
    except (OSError, KeyError, ValueError, TypeError) as e:
        return fail(e)
    chat = Chat(params, cfg, tokenizer, gen, style=args.style, system=args.system, max_len=max_len,
                max_new_tokens=args.max_new_tokens, out=out, err=err, stats=args.stats)
    err.write(f"TeleChat2 ({cfg.n_layer} layers, hidden {cfg.hidden_size}), context {max_len} tokens. "
              f"{HELP}\n")
    while True:
        try:
            line = read_line(stdin, out, "user> ")
        except KeyboardInterrupt:
            out.write("\n(Ctrl-D quits)\n")
            continue
        if line is None:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line.startswith("/"):
            chat.command(line)
            continue
        out.write("bot> ")
        try:
            chat.answer(line)
        except ValueError as e:
            out.write("\n")
            err.write(f"error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
