"""From packed rows (tc2.data / MindRecord) to train-step batches.

Packed rows hold `max_length + 1` tokens; training shifts by one (spec §7):
    tokens = input_ids[:, :-1]    labels = labels[:, 1:]   (-100 also wherever the token is pad)

Pad keys are masked (`mask_pad=True`, the default), as MindFormers' training forward does: its
mask is causal AND "the key's token is not pad_token_id", while RoPE positions stay 0..S-1
including the pads. Every packed row starts with `<_pad>`s (often hundreds), so without this
the real tokens would attend to them. tc2 expresses it with the attention's own mask
(`kv_pos <= q_pos` and same segment): the batch carries `positions` = arange and
`segment_ids` with every pad in segment PAD_SEGMENT (0) and every real token in segment >= 1.
A real query then sees exactly MindFormers' keys; a pad query sees only pads, which changes
nothing that carries loss (pads have no label and are never attended to).

With document masking (rows with per-conversation `segment_ids` / `positions`), attention also
stops at conversation borders and RoPE restarts per conversation; pads stay in PAD_SEGMENT.
With `mask_pad=False` and no document masking a row is one plain causal sequence (pads seen).
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from tc2.config import IGNORE_INDEX

ROW_KEYS = ("input_ids", "labels", "segment_ids", "positions")
PAD_SEGMENT = 0          # the segment of every pad token; conversations are segments >= 1


def load_rows(path: str, seq_length: int, *, tokenizer=None, document_masking: bool = False,
              pack_seed: int = 2024, on_error: str = "raise", vocab_size: Optional[int] = None,
              log=print) -> Dict[str, np.ndarray]:
    """Packed rows [N, seq_length + 1] from a jsonl file (read + packed with tc2.data; needs the
    tokenizer) or a MindRecord file/directory written by `recipes/preprocess.py` or MindFormers.
    vocab_size: refuse token ids / labels the model has no row for, naming the file and row.
    """
    rows = _load_rows(path, seq_length, tokenizer, document_masking, pack_seed, on_error, log)
    if vocab_size is not None:
        _check_ids(rows, vocab_size, path)
    return rows


def _check_ids(rows: Mapping[str, np.ndarray], vocab_size: int, where: str) -> None:
    from tc2.step import first_bad_id
    for key, allowed in (("input_ids", None), ("labels", IGNORE_INDEX)):
        bad = first_bad_id(rows[key], vocab_size, allowed)
        if bad is not None:
            (r, t), v = bad
            rule = "is neither -100 nor an id of" if allowed is not None else "is outside"
            raise ValueError(f"{where}: row {r}, position {t}: {key} value {v} {rule} the model's "
                             f"vocabulary [0, {vocab_size}) (a tokenizer or data file for another model?)")


def _load_rows(path, seq_length, tokenizer, document_masking, pack_seed, on_error, log):
    from tc2.data.sft import PackConfig, pack_examples, read_examples, segments_from_rows
    from tc2.data.records import mindrecord_path, read_mindrecord

    if path.endswith(".jsonl") or path.endswith(".json"):
        if tokenizer is None:
            raise ValueError(f"{path}: jsonl data needs a tokenizer (data.tokenizer)")
        examples, skipped = read_examples(path, tokenizer, on_error=on_error, max_tokens=seq_length)
        packed = pack_examples(examples, PackConfig(max_length=seq_length, seed=pack_seed),
                               tokenizer.token_id("<_pad>"), skipped)
        log(f"{path}: {packed.report.summary()}")
        if packed.report.rows == 0:
            raise ValueError(f"{path}: every conversation is longer than seq_length={seq_length}")
        return packed.columns(segments=document_masking)
    file = path if os.path.isfile(path) else mindrecord_path(path)
    rows = read_mindrecord(file)
    width = rows["input_ids"].shape[1]
    if width != seq_length + 1:
        raise ValueError(f"{file}: rows hold {width} tokens, but seq_length={seq_length} needs "
                         f"{seq_length + 1} (preprocess with --max_length {seq_length})")
    keep = {"input_ids": rows["input_ids"], "labels": rows["labels"]}
    if document_masking:
        if "segment_ids" in rows and "positions" in rows:
            keep.update(segment_ids=rows["segment_ids"], positions=rows["positions"])
        else:
            if tokenizer is None:
                raise ValueError(f"{file}: no segment_ids/positions columns; document masking "
                                 "needs them or a tokenizer to recover them from <_start>")
            seg, pos = segments_from_rows(rows["input_ids"], tokenizer.token_id("<_start>"),
                                          tokenizer.token_id("<_pad>"))
            keep.update(segment_ids=seg, positions=pos)
    return keep


def split_rows(rows: Mapping[str, np.ndarray], eval_fraction: float, seed: int = 0
               ) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, np.ndarray]]]:
    """Hold out a seeded fraction of rows for evaluation -> (train rows, eval rows or None)."""
    n = len(rows["input_ids"])
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = int(round(n * eval_fraction))
    if n_eval == 0:
        return dict(rows), None
    if n_eval >= n:
        raise ValueError(f"eval_fraction {eval_fraction} leaves no training rows out of {n}")
    order = np.random.default_rng(seed).permutation(n)
    ev, tr = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    return {k: v[tr] for k, v in rows.items()}, {k: v[ev] for k, v in rows.items()}


def train_batch(rows: Mapping[str, np.ndarray], pad_id: int, *, mask_pad: bool = True) -> Dict[str, np.ndarray]:
    """Packed rows [B, L+1] -> {"tokens", "labels"[, "segment_ids", "positions"]} [B, L].

    mask_pad: no query attends to a pad key (MindFormers' training mask; module docstring);
    the batch then always carries segment_ids and positions (one graph signature).
    """
    tokens = np.ascontiguousarray(np.asarray(rows["input_ids"], np.int32)[:, :-1])
    labels = np.asarray(rows["labels"], np.int32)[:, 1:].copy()
    is_pad = tokens == pad_id
    labels[is_pad] = IGNORE_INDEX
    batch = {"tokens": tokens, "labels": labels}
    if "segment_ids" in rows and "positions" in rows:
        segments = np.asarray(rows["segment_ids"], np.int32)[:, :-1]
        positions = np.asarray(rows["positions"], np.int32)[:, :-1]
    elif mask_pad:
        segments = np.ones_like(tokens)
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    else:
        return batch
    if mask_pad:
        segments = np.where(is_pad, PAD_SEGMENT, segments)
    batch["segment_ids"] = np.ascontiguousarray(segments, dtype=np.int32)
    batch["positions"] = np.ascontiguousarray(positions, dtype=np.int32)
    return batch


class TrainBatches:
    """Shifted train batches over a row iterator (e.g. tc2.data.records.BatchIterator), passing its
    `state_dict()` / `load_state_dict()` cursor through for exact resume."""

    def __init__(self, rows_iter, pad_id: int, *, mask_pad: bool = True):
        self.rows_iter, self.pad_id, self.mask_pad = rows_iter, pad_id, mask_pad

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        return train_batch(next(self.rows_iter), self.pad_id, mask_pad=self.mask_pad)

    def __len__(self) -> int:
        return len(self.rows_iter)

    def state_dict(self) -> dict:
        return self.rows_iter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rows_iter.load_state_dict(state)


def eval_batches(rows: Mapping[str, np.ndarray], batch_size: int, pad_id: int, *,
                 mask_pad: bool = True) -> List[Dict[str, np.ndarray]]:
    """Every row once, in order, in batches of `batch_size`; the last batch is filled with
    rows of pad tokens without labels, so all batches share one shape (one compile)."""
    n = len(rows["input_ids"])
    out = []
    for s in range(0, n, batch_size):
        chunk = {k: np.asarray(v[s:s + batch_size]) for k, v in rows.items() if k in ROW_KEYS}
        short = batch_size - len(chunk["input_ids"])
        if short:
            fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "segment_ids": 0, "positions": 0}
            chunk = {k: np.concatenate([v, np.full((short,) + v.shape[1:], fill[k], v.dtype)])
                     for k, v in chunk.items()}
        out.append(train_batch(chunk, pad_id, mask_pad=mask_pad))
    return out


def synthetic_batches(cfg, batch_size: int, seq_length: int, *, seed: int = 0,
                      ignore_prefix: int = 0) -> Iterator[Dict[str, np.ndarray]]:
    """An endless stream of random-token batches (for benchmarks and smoke tests)."""
    rng = np.random.default_rng(seed)
    while True:
        ids = rng.integers(0, cfg.vocab_size, (batch_size, seq_length + 1), dtype=np.int64)
        labels = ids.copy()
        labels[:, :ignore_prefix + 1] = IGNORE_INDEX
        yield {"tokens": ids[:, :-1].astype(np.int32), "labels": labels[:, 1:].astype(np.int32)}
