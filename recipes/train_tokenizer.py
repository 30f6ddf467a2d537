"""Train a small TeleChat2-layout SentencePiece tokenizer on a local corpus (no download).

    python recipes/train_tokenizer.py --input corpus.txt --out_prefix out/tc2_tiny --vocab_size 8000

The corpus is a UTF-8 text file (one sentence per line) or a jsonl file whose lines carry
"text" (pretraining), "input"/"output" (MindFormers) or "dialog" (official SFT) fields.
A thin shell over `tc2.data.tokenizer.train_tokenizer`; the result has the TeleChat special pieces
at ids 0-12, digits at 18-27, byte fallback and split digits, like the release's tokenizer.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Iterator

from jsonargparse import ArgumentParser

from tc2.data.tokenizer import Tokenizer, train_tokenizer


def jsonl_texts(path: str) -> Iterator[str]:
    """The text fields of a jsonl corpus, so SFT/pretraining files can train a tokenizer."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                continue
            for key in ("text", "system", "input", "output"):
                if isinstance(obj.get(key), str):
                    yield obj[key]
            for m in obj.get("dialog") or obj.get("conversation") or []:
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    yield m["content"]


def main(argv=None) -> int:
    p = ArgumentParser(prog="train_tokenizer.py", description=__doc__.split("\n")[0])
    p.add_argument("--input", type=str, required=True, help="text file or .jsonl corpus")
    p.add_argument("--out_prefix", type=str, required=True, help="writes <out_prefix>.model")
    p.add_argument("--vocab_size", type=int, default=8000,
                   help="upper bound; a small corpus may give fewer pieces")
    p.add_argument("--num_threads", type=int, default=2)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        corpus = list(jsonl_texts(args.input)) if args.input.endswith(".jsonl") else args.input
        path = train_tokenizer(corpus, args.out_prefix, vocab_size=args.vocab_size,
                               num_threads=args.num_threads)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = Tokenizer(path)
    print(f"wrote {path}: {tok.vocab_size} pieces in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
