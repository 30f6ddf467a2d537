"""Fine-tuning jsonl -> packed MindRecord, with the flags of MindFormers' telechat_preprocess.py.

    python recipes/preprocess.py --input_dataset_file data.jsonl \\
        --vocab_file_path tokenizer.model --max_length 8192 --output_path out.mindrecord

A thin shell over `tc2.data.preprocess`; see that module for formats, masking and packing.
"""
from __future__ import annotations

import sys
import time

from jsonargparse import ActionYesNo, ArgumentParser

from tc2.data.sft import ChatTokens, DataError, PackConfig, preprocess
from tc2.data.tokenizer import Tokenizer

BAD_INPUT_HELP = """\
Bad input (malformed JSON, missing key, <_user>/<_bot>/<_end> turn count mismatch, a dialog
that does not end with a bot answer, non-UTF-8 text): by default the run stops with an error
naming the file and line and writes nothing; with --skip_bad_lines such lines are skipped,
counted in the summary and listed on stderr. An empty file, a missing path or a file with
no usable line is always an error. Blank lines are ignored. The output is written atomically.
"""


class ProgressBar:
    """A minimal progress bar over bytes read, on stderr (no tqdm dependency)."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width, self.last, self.open = stream, width, -1.0, False

    def __call__(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        now = time.monotonic()
        if frac < 1.0 and now - self.last < 0.2:
            return
        self.last, self.open = now, True
        self.stream.write(f"\rreading [{'#' * int(frac * self.width):<{self.width}}] {frac:6.1%}")
        if frac >= 1.0:
            self.close()
        self.stream.flush()

    def close(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.open = False


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="preprocess.py", description=__doc__.split("\n")[0],
                       epilog=BAD_INPUT_HELP)
    p.add_argument("--input_dataset_file", type=str, required=True,
                   help="jsonl: {input, output} (MF), {input} with inline turns, or {system, dialog}")
    p.add_argument("--vocab_file_path", type=str, required=True, help="SentencePiece tokenizer.model")
    p.add_argument("--output_path", type=str, required=True,
                   help="*.mindrecord file, or a directory that receives dataset.mindrecord")
    p.add_argument("--max_length", type=int, default=8192, help="rows hold max_length + 1 tokens")
    p.add_argument("--seed", type=int, default=2024, help="shuffle seed (MF's random.seed)")
    p.add_argument("--start_token", type=str, default="<_start>", help="'' for none")
    p.add_argument("--user_token", type=str, default="<_user>")
    p.add_argument("--bot_token", type=str, default="<_bot>")
    p.add_argument("--end_token", type=str, default="<_end>")
    p.add_argument("--pad_token", type=str, default="<_pad>")
    p.add_argument("--shuffle", action=ActionYesNo, default=True, help="shuffle before packing")
    p.add_argument("--skip_bad_lines", action=ActionYesNo, default=False,
                   help="skip and count bad lines instead of stopping (see below)")
    p.add_argument("--write_segments", action=ActionYesNo, default=False,
                   help="also write segment_ids/positions columns for document masking")
    p.add_argument("--progress", action=ActionYesNo, default=True, help="progress bar on stderr")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tokens = ChatTokens(start=args.start_token, user=args.user_token, bot=args.bot_token,
                        end=args.end_token, pad=args.pad_token)
    bar = ProgressBar() if args.progress else None
    t0 = time.perf_counter()
    try:
        tokenizer = Tokenizer(args.vocab_file_path)
        report = preprocess(args.input_dataset_file, tokenizer, args.output_path, tokens=tokens,
                            pack=PackConfig(args.max_length, args.seed, args.shuffle),
                            on_error="skip" if args.skip_bad_lines else "raise",
                            write_segments=args.write_segments,
                            progress=bar)
    except (DataError, OSError, KeyError, ValueError, RuntimeError) as e:
        if bar is not None:
            bar.close()
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {str(msg).splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    for line in report.skipped[:20]:
        print(f"skipped {line}", file=sys.stderr)
    if len(report.skipped) > 20:
        print(f"... and {len(report.skipped) - 20} more skipped lines", file=sys.stderr)
    print(report.summary() + f" | {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
