"""From packed rows (tc2.data / MindRecord) to train-step batches.

Packed rows hold `max_length + 1` tokens; training shifts by one (spec §7):
    tokens = input_ids[:, :-1]    labels = labels[:, 1:]   (-100 also wherever the token is pad)
With document masking, `segment_ids` and `positions` (per conversation) travel with the
tokens, so attention stops at conversation borders and RoPE restarts per conversation;
without it (the MindFormers default) a row is one causal sequence.
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from tc2.config import IGNORE_INDEX

ROW_KEYS = ("input_ids", "labels", "segment_ids", "positions")


def load_rows(path: str, seq_length: int, *, tokenizer=None, document_masking: bool = False,
              pack_seed: int = 2024, on_error: str = "raise", log=print) -> Dict[str, np.ndarray]:
    """Packed rows [N, seq_length + 1] from a jsonl file (read + packed with tc2.data; needs the
    tokenizer) or a MindRecord file/directory written by `recipes/preprocess.py` or MindFormers.
    """
    from tc2.data.sft import PackConfig, pack_examples, read_examples, segments_from_rows
    from tc2.data.records import mindrecord_path, read_mindrecord

    if path.endswith(".jsonl") or path.endswith(".json"):
        if tokenizer is None:
            raise ValueError(f"{path}: jsonl data needs a tokenizer (data.tokenizer)")
        examples, skipped = read_examples(path, tokenizer, on_error=on_error)
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


def train_batch(rows: Mapping[str, np.ndarray], pad_id: int) -> Dict[str, np.ndarray]:
    """Packed rows [B, L+1] -> {"tokens", "labels"[, "segment_ids", "positions"]} [B, L]."""
    tokens = np.asarray(rows["input_ids"], np.int32)[:, :-1]
    labels = np.asarray(rows["labels"], np.int32)[:, 1:].copy()
    labels[tokens == pad_id] = IGNORE_INDEX
    batch = {"tokens": np.ascontiguousarray(tokens), "labels": labels}
    if "segment_ids" in rows and "positions" in rows:
        batch["segment_ids"] = np.ascontiguousarray(np.asarray(rows["segment_ids"], np.int32)[:, :-1])
        batch["positions"] = np.ascontiguousarray(np.asarray(rows["positions"], np.int32)[:, :-1])
    return batch


class TrainBatches:
    """Shifted train batches over a row iterator (e.g. tc2.data.records.BatchIterator), passing its
    `state_dict()` / `load_state_dict()` cursor through for exact resume."""

    def __init__(self, rows_iter, pad_id: int):
        self.rows_iter, self.pad_id = rows_iter, pad_id

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        return train_batch(next(self.rows_iter), self.pad_id)

    def __len__(self) -> int:
        return len(self.rows_iter)

    def state_dict(self) -> dict:
        return self.rows_iter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rows_iter.load_state_dict(state)


def eval_batches(rows: Mapping[str, np.ndarray], batch_size: int, pad_id: int) -> List[Dict[str, np.ndarray]]:
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
        out.append(train_batch(chunk, pad_id))
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
