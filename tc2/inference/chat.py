"""An interactive multi-turn chat: the conversation, its commands, and the loop over input lines.

`ChatSession.answer` renders the history with the chat template, streams the answer as it is
generated and keeps the history within the context (oldest rounds dropped). `chat_loop` reads
lines and dispatches commands. Under msrun (tensor parallel) only rank 0 reads the terminal;
each line is shared with the other processes (`share_line`), which generate in lockstep and
write nowhere.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from typing import Optional

import numpy as np

from tc2.context import LOCAL, ParallelContext
from tc2.data.chat import DEFAULT_SYSTEM_PROMPT, render_chat
from tc2.generate import generate, stream_text

HELP = """commands: /reset, /system <text>, /system, /help, /quit; Ctrl-D quits"""


class ChatSession:
    """The conversation state and one turn of it; I/O streams are injectable (tests, msrun ranks
    other than 0 write to a null sink)."""

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


class InputLines:
    """Lines of the chat's input, read so that Ctrl-C always reaches the prompt.

    A signal goes to any thread of the process, and MindSpore runs several: one that lands on
    another thread does not interrupt a blocking read in the main thread, so Python would run
    its handler only once the line arrives. Here the main thread waits in short selects on the
    file descriptor and reads it itself (its own buffer, so lines that arrived together are
    not hidden from select by Python's). A terminal gets `input()` (line editing); a stream
    without a descriptor (a test's StringIO) is read as it is.
    """

    def __init__(self, stream, poll_s: float = 0.1):
        self.stream, self.poll_s, self.buf = stream, poll_s, b""
        try:
            self.fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None
        self.tty = stream is sys.stdin and stream.isatty()

    def read(self, out, prompt: str) -> Optional[str]:
        """One line (without its newline), or None at end of input (Ctrl-D)."""
        if self.tty:
            try:
                return input(prompt)
            except EOFError:
                out.write("\n")
                return None
        out.write(prompt)
        out.flush()
        if self.fd is None:
            line = self.stream.readline()
            return None if line == "" else line.rstrip("\n")
        while b"\n" not in self.buf:
            if not select.select([self.fd], [], [], self.poll_s)[0]:
                continue                                   # Python runs pending signal handlers here
            chunk = os.read(self.fd, 65536)
            if not chunk:                                  # end of input
                line, self.buf = self.buf, b""
                return line.decode("utf-8", "replace") if line else None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode("utf-8", "replace")


def share_line(line: Optional[str], ctx: ParallelContext = LOCAL) -> Optional[str]:
    """Rank 0's line (None: end of input) on every process, as UTF-8 bytes through `host_sum`."""
    if ctx.size == 1:
        return line
    data = line.encode("utf-8") if ctx.is_main and line is not None else b""
    n = int(ctx.host_sum(np.array([len(data) + 1 if ctx.is_main and line is not None else 0]))[0])
    if n == 0:
        return None
    buf = np.zeros(n - 1, np.float32)
    if ctx.is_main:
        buf[:] = np.frombuffer(data, np.uint8)
    return bytes(ctx.host_sum(buf).astype(np.uint8)).decode("utf-8")


class Interrupts:
    """Ctrl-C in a chat: at the prompt it drops the line being typed, during an answer it stops
    the answer; the session goes on. MindSpore 2.10 turns SIGINT into SIGTERM once it has run a
    graph (tc2.train.guard), which would end the session. So while active: at the prompt SIGINT
    is Python's own again (KeyboardInterrupt) and a SIGTERM there is a real one (the session
    ends, exit status 143); during an answer a SIGTERM (a forwarded Ctrl-C, or a real one) stops
    the answer. Inactive outside the main thread."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.prompting, self._old = False, None

    def __enter__(self) -> "Interrupts":
        if self.enabled:
            self._old = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, self._old if self._old is not None else signal.SIG_DFL)

    def _on_term(self, signum, frame) -> None:
        if self.prompting:
            raise SystemExit(128 + signum)
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def prompt(self):
        if self.enabled:
            # MindSpore registers its handler before each run, also from its asynchronous queue:
            # wait for the queue first, or a run still in flight re-registers it after ours.
            import mindspore as ms
            ms.runtime.synchronize()
            signal.signal(signal.SIGINT, signal.default_int_handler)   # MindSpore's handler is not Python's
        self.prompting = True
        try:
            yield
        finally:
            self.prompting = False


def chat_loop(session: ChatSession, stdin, ctx: ParallelContext = LOCAL) -> int:
    """Read lines until end of input or /quit; commands start with '/'. Returns the exit status."""
    lines = InputLines(stdin)
    with Interrupts(enabled=ctx.is_main) as keys:
        while True:
            line = None
            if ctx.is_main:
                try:
                    with keys.prompt():
                        line = lines.read(session.out, "user> ")
                except KeyboardInterrupt:
                    session.out.write("\n(Ctrl-D quits)\n")
                    line = ""
            line = share_line(line, ctx)
            if line is None or line.strip() in ("/quit", "/exit"):
                return 0
            try:
                _dispatch(session, line.strip())
            except KeyboardInterrupt:                 # between the answer's stream and the prompt
                session.err.write(" (interrupted)\n")


def _dispatch(session: ChatSession, line: str) -> None:
    if not line:
        return
    if line.startswith("/"):
        session.command(line)
        return
    session.out.write("bot> ")
    try:
        session.answer(line)
    except ValueError as e:
        session.out.write("\n")
        session.err.write(f"error: {e}\n")


def null_streams():
    """(out, err) that discard everything: the output of processes other than rank 0."""
    sink = open(os.devnull, "w", encoding="utf-8")
    return sink, sink
