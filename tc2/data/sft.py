"""Fine-tuning data: jsonl conversations -> token ids + loss labels -> packed fixed-length rows.

Three line formats (detected per line):
  (a) MindFormers `{"input": ..., "output": ...}`; `input` may hold history
      `<_user>q1<_bot>a1<_user>q2` (a leading `<_user>` is optional, as in MF; a history
      answer may end with `<_end>`);
  (b) the seed README's single key `{"input": "<_user>q1<_bot>a1<_end><_user>q2<_bot>a2<_end>"}`,
      optionally `<_start>`-led and with `<_pad>`s before or after the turns (dropped: packing
      pads the rows itself); a `<_pad>` inside a turn is an error;
  (c) the official dialog format `{"system": ..., "dialog": [{"role", "content"}], ...}`
      (also `"conversation"` + optional `"tools"`), rendered with the 7B/35B chat template
      (`system` verbatim after `<_system>`, `<_end>\\n` between turns but no `\\n` after the
      last `<_end>`, tool calls in answers, tool results as prompt).
(a) and (b) become `[<_start>] + per turn [<_user>] + ids(q) + [<_bot>] + ids(a) + [<_end>]`.
Labels follow MindFormers: the answer ids and their `<_end>` are their own label, everything
else (pad, `<_start>`, `<_user>`, question, `<_bot>`, system prompt, tool results) is -100.

Markers: in (a) and (b) the markers ARE the structure (the text is cut at them). In (c) the
structure is the JSON, so message content is plain text: a user who writes `<_user>` or
`<_end>` gets the ids of those characters, never a control id (`Tokenizer.encode_text`).

One difference from MindFormers' `telechat_preprocess.py`, on purpose: given (a) with an
`<_end>` after a history answer (`<_user>q1<_bot>a1<_end><_user>q2` + output `a2`), MF writes
`a1<_end><_end>`, and its pairing of questions with answers (split at `<_end>`) then gives q2 the
empty answer and drops `a2`, the line's actual target. tc2 strips that `<_end>` and keeps `a2`
(the same ids as without the `<_end>`).

Packing is MindFormers' `telechat_preprocess.py`: shuffle with `random.Random(seed)` (the same
permutation as its `random.seed(seed); shuffle(lines)`), then fill rows greedily in that order
while `used + n < max_length + 1`, left-pad each row with `<_pad>` to `max_length + 1`. Like MF,
a conversation that does not fit closes the row, and one longer than `max_length` tokens is
dropped (so every row starts with at least one pad). Two deliberate differences: each
conversation keeps its own `<_start>` (MF moves them all to the row's front), and the last
partial row is written (MF loses it). Segment ids and positions are kept per token so training
can mask attention across packed conversations (document masking; MF has none, default off).
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tc2.config import IGNORE_INDEX
from tc2.data.chat import answer_runs, template_pieces, template_system_text

__all__ = ["IGNORE_INDEX", "ChatTokens", "DataError", "Example", "PackConfig", "PackReport",
           "PackedRows", "example_from_json", "read_examples", "pack_examples",
           "segments_from_rows", "preprocess"]



class DataError(ValueError):
    """A problem in the user's data; `read_examples` prefixes it with "file:line: "."""


@dataclass(frozen=True)
class ChatTokens:
    """MindFormers' token flags: the marker strings in the data (their ids come from the model).
    An empty `start` means no `<_start>` before each conversation."""
    start: str = "<_start>"
    user: str = "<_user>"
    bot: str = "<_bot>"
    end: str = "<_end>"
    pad: str = "<_pad>"

    def ids(self, tokenizer) -> Dict[str, Optional[int]]:
        out = {}
        for name in ("start", "user", "bot", "end", "pad"):
            s = getattr(self, name)
            out[name] = tokenizer.token_id(s) if s else None
        if out["user"] is None or out["bot"] is None or out["end"] is None or out["pad"] is None:
            raise ValueError("user, bot, end and pad tokens must be non-empty")
        return out


@dataclass(frozen=True)
class Example:
    """One conversation: ids and aligned labels (label[i] is ids[i] or -100), and its origin.
    too_long: read with a `max_tokens` it cannot fit in, so never tokenized (ids left empty)."""
    input_ids: Tuple[int, ...]
    labels: Tuple[int, ...]
    source: str = ""
    too_long: bool = False


# --- line formats -> turns / ids ------------------------------------------------------------------
def _markers(tokens: ChatTokens) -> List[str]:
    return [s for s in (tokens.start, tokens.user, tokens.bot, tokens.end) if s]


def _check_turns(turns: List[Tuple[str, str]], tokens: ChatTokens) -> List[Tuple[str, str]]:
    for k, (q, a) in enumerate(turns):
        for text, what in ((q, "question"), (a, "answer")):
            bad = [m for m in _markers(tokens) if m in text]
            if bad:
                raise DataError(f"turn count mismatch: the {what} of turn {k + 1} contains {bad[0]}")
            if tokens.pad in text:
                raise DataError(f"the {what} of turn {k + 1} contains {tokens.pad}: pads may only lead or "
                                "trail a line (they are dropped; packing pads the rows)")
    return turns


def strip_pads(text: str, pad: str) -> str:
    """`text` without the runs of `pad` at its start and end (the seed README's example line
    ends in `<_pad>`s; MindFormers' preprocess ignores them too)."""
    if not pad:
        return text
    lo, hi = 0, len(text)
    while text.startswith(pad, lo, hi):
        lo += len(pad)
    while hi - len(pad) >= lo and text.endswith(pad, lo, hi):
        hi -= len(pad)
    return text[lo:hi]


def inline_turns(text: str, tokens: ChatTokens) -> List[Tuple[str, str]]:
    """Format (b): '<_user>q<_bot>a<_end>' repeated -> [(q, a), ...]; leading and trailing
    `<_pad>`s are dropped."""
    text = strip_pads(text, tokens.pad)
    if tokens.start and text.startswith(tokens.start):
        text = text[len(tokens.start):]
    n_u, n_b, n_e = (text.count(tokens.user), text.count(tokens.bot), text.count(tokens.end))
    if not n_u == n_b == n_e or n_u == 0:
        raise DataError(f"turn count mismatch: {n_u} {tokens.user}, {n_b} {tokens.bot}, "
                        f"{n_e} {tokens.end} in 'input' (and no 'output' key)")
    if not text.startswith(tokens.user):
        raise DataError(f"'input' must start with {tokens.user}")
    turns = []
    for k, chunk in enumerate(text.split(tokens.user)[1:]):
        body = chunk[:-len(tokens.end)] if chunk.endswith(tokens.end) else None
        if body is None or body.count(tokens.bot) != 1:
            raise DataError(f"turn {k + 1} is not {tokens.user}question{tokens.bot}answer{tokens.end}")
        q, a = body.split(tokens.bot)
        turns.append((q, a))
    return _check_turns(turns, tokens)


def mf_turns(inp: str, out: str, tokens: ChatTokens) -> List[Tuple[str, str]]:
    """Format (a): history in `input` ('<_user>q1<_bot>a1<_user>q2'), last answer in `output`."""
    if tokens.user != "<_user>":  # MF rewrites the default markers to the configured ones
        inp = inp.replace("<_user>", tokens.user)
    if tokens.bot != "<_bot>":
        inp = inp.replace("<_bot>", tokens.bot)
    if not inp.startswith(tokens.user):
        inp = tokens.user + inp
    chunks = inp.split(tokens.user)[1:]
    turns = []
    for k, chunk in enumerate(chunks):
        last = k == len(chunks) - 1
        if tokens.bot in chunk:
            if last:
                raise DataError(f"turn count mismatch: the last turn of 'input' already has a "
                                f"{tokens.bot} answer, and 'output' gives another")
            if chunk.endswith(tokens.end):
                chunk = chunk[:-len(tokens.end)]
            if chunk.count(tokens.bot) != 1:
                raise DataError(f"turn count mismatch: history turn {k + 1} has "
                                f"{chunk.count(tokens.bot)} {tokens.bot}")
            q, a = chunk.split(tokens.bot)
        elif not last:
            raise DataError(f"turn count mismatch: history turn {k + 1} has no {tokens.bot} answer")
        else:
            q, a = chunk, out
        turns.append((q, a))
    return _check_turns(turns, tokens)


def _cannot_fit(n_chars: int, n_markers: int, tokenizer, max_tokens: Optional[int]) -> bool:
    """Whether text of n_chars characters plus n_markers control ids is surely more than
    max_tokens ids (`Tokenizer.min_tokens`: no id covers more than the longest piece)."""
    return max_tokens is not None and tokenizer.min_tokens(n_chars) + n_markers > max_tokens


def _turns_example(turns, tokenizer, ids, max_tokens=None) -> Optional[Tuple[List[int], List[int]]]:
    """ids and labels of (a)/(b) turns; None when they surely exceed max_tokens (not tokenized)."""
    n_chars = sum(len(q) + len(a) for q, a in turns)
    if _cannot_fit(n_chars, 3 * len(turns) + (ids["start"] is not None), tokenizer, max_tokens):
        return None
    x: List[int] = [] if ids["start"] is None else [ids["start"]]
    y: List[int] = [IGNORE_INDEX] * len(x)
    for q, a in turns:
        qi, ai = tokenizer.encode(q), tokenizer.encode(a)
        x += [ids["user"]] + qi + [ids["bot"]] + ai + [ids["end"]]
        y += [IGNORE_INDEX] * (len(qi) + 2) + ai + [ids["end"]]
    return x, y


def _dialog_example(obj: Mapping[str, Any], tokenizer, ids, max_tokens=None) -> Optional[Tuple[List[int], List[int]]]:
    key = "dialog" if "dialog" in obj else "conversation"
    dialog = obj[key]
    if not isinstance(dialog, list) or not dialog:
        raise DataError(f"'{key}' must be a non-empty list of {{'role', 'content'}}")
    tools = obj.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"'tools' is not valid JSON: {e}") from None
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError("'system' must be a string")
    roles = [m.get("role") if isinstance(m, Mapping) else None for m in dialog]
    if roles[-1] not in ("bot", "assistant"):
        raise DataError(f"turn count mismatch: '{key}' ends with a {roles[-1]!r} message, "
                        "not a bot answer")
    for i, r in enumerate(roles):
        if r in ("bot", "assistant") and (i == 0 or roles[i - 1] not in ("user", "tool")):
            raise DataError(f"turn count mismatch: bot message {i} does not follow a user/tool message")
    try:
        sys_text = system if system is not None else template_system_text(dialog, tools)
        pieces = template_pieces(sys_text, dialog, add_generation_prompt=False, final_newline=False)
    except ValueError as e:
        raise DataError(str(e)) from None
    if _cannot_fit(sum(len(t) for t, _, _ in pieces), ids["start"] is not None, tokenizer, max_tokens):
        return None
    x: List[int] = [] if ids["start"] is None else [ids["start"]]
    y: List[int] = [IGNORE_INDEX] * len(x)
    for run, is_answer in answer_runs(pieces):      # content is plain text (module docstring)
        t = tokenizer.encode_pieces(run)
        x += t
        y += t if is_answer else [IGNORE_INDEX] * len(t)
    return x, y


def example_from_json(obj: Any, tokenizer, tokens: ChatTokens = ChatTokens(),
                      source: str = "", max_tokens: Optional[int] = None) -> Example:
    """One parsed jsonl line -> Example; DataError (without the location) on bad content.

    max_tokens: a conversation whose text is surely longer (more characters than max_tokens
    times the longest piece) comes back `too_long`, without being tokenized: a 50 MB line
    costs its JSON parse, not gigabytes of SentencePiece lattice."""
    ids = tokens.ids(tokenizer)
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    if "dialog" in obj or "conversation" in obj:
        xy = _dialog_example(obj, tokenizer, ids, max_tokens)
    elif "input" in obj:
        inp, out = obj["input"], obj.get("output")
        if not isinstance(inp, str):
            raise DataError(f"'input' must be a string, got {type(inp).__name__}")
        if out is None:
            turns = inline_turns(inp, tokens)
        elif isinstance(out, str):
            turns = mf_turns(inp, out, tokens)
        else:
            raise DataError(f"'output' must be a string, got {type(out).__name__}")
        xy = _turns_example(turns, tokenizer, ids, max_tokens)
    else:
        raise DataError(f"missing key: expected 'input' (+ 'output') or 'dialog', got {sorted(obj)}")
    if xy is None:
        return Example((), (), source, too_long=True)
    return Example(tuple(xy[0]), tuple(xy[1]), source)


def read_examples(path: str, tokenizer, tokens: ChatTokens = ChatTokens(), *,
                  on_error: str = "raise", max_tokens: Optional[int] = None,
                  progress: Optional[Callable[[int, int], None]] = None
                  ) -> Tuple[List[Example], List[str]]:
    """Read a jsonl file -> (examples, skipped). Blank lines are ignored.

    max_tokens: conversations that surely exceed it are returned `too_long`, untokenized
    (`example_from_json`); packing drops them like any conversation longer than a row.

    on_error="raise": the first bad line raises DataError("file:line: reason").
    on_error="skip": bad lines are left out and listed in `skipped` as "file:line: reason".
    `progress(bytes_done, bytes_total)` is called as the file is read.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a file")
    total = os.path.getsize(path)
    examples: List[Example] = []
    skipped: List[str] = []
    done = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            done += len(raw)
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"malformed JSON: {e.msg} (column {e.colno})") from None
                examples.append(example_from_json(obj, tokenizer, tokens, source=where, max_tokens=max_tokens))
            except (DataError, UnicodeDecodeError) as e:
                msg = f"{where}: {e}" if isinstance(e, DataError) else f"{where}: not UTF-8 ({e.reason})"
                if on_error == "raise":
                    raise DataError(msg) from None
                skipped.append(msg)
            if progress is not None:
                progress(done, total)
    if not examples:
        why = f" ({len(skipped)} bad lines skipped)" if skipped else ""
        raise DataError(f"{path}: no examples in file{why}")
    return examples, skipped


# --- packing ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackConfig:
    max_length: int = 8192   # rows hold max_length + 1 tokens (training shifts by one)
    seed: int = 2024
    shuffle: bool = True

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")


@dataclass(frozen=True)
class PackReport:
    examples: int
    rows: int
    row_length: int
    tokens: int               # non-pad tokens written
    loss_tokens: int          # tokens whose label is not -100
    dropped: Tuple[str, ...] = ()   # sources of conversations longer than max_length
    skipped: Tuple[str, ...] = ()   # "file:line: reason" of bad lines (on_error="skip")

    def summary(self) -> str:
        slots = max(self.rows * self.row_length, 1)
        loss = self.loss_tokens / max(self.tokens, 1)
        return (f"examples read {self.examples} | packed rows {self.rows} x {self.row_length} | "
                f"dropped {len(self.dropped)} too long (> {self.row_length - 1} tokens) | "
                f"skipped {len(self.skipped)} bad lines | tokens {self.tokens} "
                f"({self.tokens / slots:.1%} of slots) | with loss {self.loss_tokens} ({loss:.1%})")


@dataclass(frozen=True, eq=False)
class PackedRows:
    input_ids: np.ndarray     # [N, L] int32, left-padded with <_pad>
    labels: np.ndarray        # [N, L] int32, -100 where no loss
    segment_ids: np.ndarray   # [N, L] int32, 0 on pad, k = k-th conversation of the row
    positions: np.ndarray     # [N, L] int32, position inside its conversation, 0 on pad
    report: PackReport = field(default=None)

    def columns(self, segments: bool = False) -> Dict[str, np.ndarray]:
        cols = {"input_ids": self.input_ids, "labels": self.labels}
        if segments:
            cols.update(segment_ids=self.segment_ids, positions=self.positions)
        return cols


def pack_examples(examples: Sequence[Example], cfg: PackConfig, pad_id: int,
                  skipped: Sequence[str] = ()) -> PackedRows:
    """Greedy MindFormers packing (see the module docstring) -> PackedRows."""
    order = list(range(len(examples)))
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(order)
    cap, width = cfg.max_length, cfg.max_length + 1
    rows: List[List[Example]] = []
    cur: List[Example] = []
    used = 0
    dropped: List[str] = []
    for k in order:
        ex = examples[k]
        n = cap + 1 if ex.too_long else len(ex.input_ids)
        if used + n <= cap:
            cur.append(ex)
            used += n
            continue
        if cur:
            rows.append(cur)
        cur, used = ([ex], n) if n <= cap else ([], 0)
        if n > cap:
            dropped.append(ex.source)
    if cur:
        rows.append(cur)
    ids = np.full((len(rows), width), pad_id, np.int32)
    labels = np.full((len(rows), width), IGNORE_INDEX, np.int32)
    seg = np.zeros((len(rows), width), np.int32)
    pos = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
        at = width - sum(len(ex.input_ids) for ex in row)
        for s, ex in enumerate(row, 1):
            n = len(ex.input_ids)
            ids[r, at:at + n] = ex.input_ids
            labels[r, at:at + n] = ex.labels
            seg[r, at:at + n] = s
            pos[r, at:at + n] = np.arange(n)
            at += n
    report = PackReport(examples=len(examples), rows=len(rows), row_length=width,
                        tokens=int((seg > 0).sum()), loss_tokens=int((labels != IGNORE_INDEX).sum()),
                        dropped=tuple(dropped), skipped=tuple(skipped))
    return PackedRows(ids, labels, seg, pos, report)


def segments_from_rows(input_ids: np.ndarray, start_id: int, pad_id: int
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Recover (segment_ids, positions) [N, L] from packed rows that lack those columns.

    The leading pads are segment 0; a new conversation starts at the first non-pad token and
    at every `<_start>`. Exact for rows written here; rows written by MindFormers carry all
    their `<_start>` at the front, so there the whole row comes out as one conversation.
    """
    input_ids = np.asarray(input_ids)
    n, width = input_ids.shape
    lead_pad = np.logical_and.accumulate(input_ids == pad_id, axis=1)            # [N, L]
    first = ~lead_pad & np.concatenate([np.ones((n, 1), bool), lead_pad[:, :-1]], axis=1)
    boundary = first | ((input_ids == start_id) & ~lead_pad)                       # [N, L]
    seg = np.where(lead_pad, 0, np.cumsum(boundary, axis=1)).astype(np.int32)
    idx = np.broadcast_to(np.arange(width), (n, width))
    seg_start = np.maximum.accumulate(np.where(boundary, idx, 0), axis=1)
    pos = np.where(lead_pad, 0, idx - seg_start).astype(np.int32)
    return seg, pos


def _check_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
        raise OSError(f"output_path: cannot write in {directory} ({e.strerror or e})") from None


def preprocess(input_path: str, tokenizer, output_path: str, *,
               tokens: ChatTokens = ChatTokens(), pack: PackConfig = PackConfig(),
               on_error: str = "raise", write_segments: bool = False,
               progress: Optional[Callable[[int, int], None]] = None) -> PackReport:
    """jsonl -> packed MindRecord (what recipes/preprocess.py runs). Returns the report.

    `output_path` ending in `.mindrecord` is the file; otherwise a directory that receives
    `dataset.mindrecord` (as MindFormers). `write_segments` adds `segment_ids` and
    `positions` columns for document masking (MindFormers ignores extra columns).
    """
    from tc2.data.records import mindrecord_path, write_mindrecord  # mindspore import only when writing
    pad_id = tokens.ids(tokenizer)["pad"]
    _check_writable(os.path.dirname(os.path.abspath(mindrecord_path(output_path))))   # before the long read
    examples, skipped = read_examples(input_path, tokenizer, tokens, on_error=on_error,
                                      max_tokens=pack.max_length, progress=progress)
    packed = pack_examples(examples, pack, pad_id, skipped)
    if packed.report.rows == 0:
        raise DataError(f"{input_path}: nothing to write: all {len(examples)} conversations are "
                        f"longer than max_length={pack.max_length} tokens")
    write_mindrecord(mindrecord_path(output_path), packed.columns(segments=write_segments))
    return packed.report
