"""Packed rows on disk (MindRecord) and a seeded, resumable batch iterator over them.

The file layout is MindFormers' `telechat_preprocess.py`: one shard, schema "lm-schema",
int32 columns `input_ids` and `labels` of shape [-1], one packed row per record; so MF reads
what we write and we read what MF writes. Optional extra int32 columns (`segment_ids`,
`positions`) are ignored by MF's loader.

MindRecord refuses renamed files (its index `.db` records the data file's name), so an atomic
write goes to a fresh temp directory next to the target under the final basename, then both
files are renamed into place, the index first: the data file only appears once complete.
MindSpore's writer crashes the process (SIGSEGV) when the disk fills, so the free space is
checked first, and the temp directory carries the writer's pid: a write removes the temp
directories of writers that are no longer alive.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

__all__ = ["mindrecord_path", "write_mindrecord", "read_mindrecord", "BatchIterator", "check_free_space",
           "remove_stale_temp_dirs"]


def mindrecord_path(output_path: str) -> str:
    """MF rule: a path ending in .mindrecord is the file, anything else a directory for
    `dataset.mindrecord`."""
    if not output_path:
        raise ValueError("output_path is empty")
    if output_path.endswith(".mindrecord"):
        return output_path
    return os.path.join(output_path, "dataset.mindrecord")


_TMP_PREFIX = ".tmp_mindrecord_"
_SPACE_MARGIN = 64 << 20        # MindRecord's header and page padding (a 1-row file is ~48 MiB, sparse)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's live process
        return True
    return True


def remove_stale_temp_dirs(directory: str) -> None:
    """Remove `.tmp_mindrecord_<pid>_*` directories whose writer process is gone (killed or
    crashed mid-write: its `finally` never ran)."""
    for name in os.listdir(directory):
        m = re.match(re.escape(_TMP_PREFIX) + r"(\d+)_", name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def check_free_space(directory: str, arrays: Mapping[str, np.ndarray]) -> None:
    """OSError naming the directory and both sizes when the rows cannot fit on its filesystem."""
    need = int(sum(a.nbytes for a in arrays.values()) * 1.1) + _SPACE_MARGIN
    free = shutil.disk_usage(directory).free
    if free < need:
        raise OSError(f"{directory}: {free / 2**20:,.0f} MiB free, but the MindRecord needs about "
                      f"{need / 2**20:,.0f} MiB: free some space or write elsewhere (nothing was written)")


def write_mindrecord(path: str, columns: Mapping[str, np.ndarray], *, chunk_rows: int = 64) -> str:
    """Write [N, L] int columns as an MF-compatible MindRecord file, atomically. Returns path."""
    from mindspore.mindrecord import FileWriter

    if not columns or "input_ids" not in columns:
        raise ValueError("columns must include 'input_ids'")
    arrays = {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in columns.items()}
    n = len(arrays["input_ids"])
    for k, v in arrays.items():
        if v.ndim != 2 or len(v) != n:
            raise ValueError(f"column {k!r} has shape {v.shape}; expected [{n}, L]")
    if n == 0:
        raise ValueError("no rows to write")
    final = os.path.abspath(path)
    directory = os.path.dirname(final)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temp_dirs(directory)
    check_free_space(directory, arrays)
    tmpdir = tempfile.mkdtemp(dir=directory, prefix=f"{_TMP_PREFIX}{os.getpid()}_")
    try:
        tmp = os.path.join(tmpdir, os.path.basename(final))
        writer = FileWriter(tmp, shard_num=1, overwrite=True)
        writer.add_schema({k: {"type": "int32", "shape": [-1]} for k in arrays}, "lm-schema")
        for s in range(0, n, chunk_rows):
            writer.write_raw_data([{k: v[i] for k, v in arrays.items()}
                                   for i in range(s, min(s + chunk_rows, n))])
        writer.commit()
        os.replace(tmp + ".db", final + ".db")
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def read_mindrecord(path: str, columns: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """Load every row of a MindRecord file -> {column: [N, L] int32}, in file order.

    All rows are held in memory (N * L * 4 bytes per column). Rows of one column must share a
    length (packed data); a clear ValueError names the file and row otherwise.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MindRecord file not found: {path!r}")
    if not os.path.isfile(path + ".db"):
        raise FileNotFoundError(f"MindRecord index not found: {path + '.db'!r} (it must sit next "
                                "to the data file under the same name)")
    from mindspore.mindrecord import FileReader

    try:
        reader = FileReader(path, num_consumer=1, columns=list(columns) if columns else None)
    except Exception as e:  # MindSpore raises RuntimeError with a long C++ trace
        lines = [ln for ln in str(e).splitlines() if ln.strip().startswith("[ERROR]")]
        raise ValueError(f"{path}: not a readable MindRecord file: "
                         f"{lines[0].strip() if lines else str(e).splitlines()[0]}") from None
    rows: Dict[str, list] = {}
    try:
        for rec in reader.get_next():
            for k, v in rec.items():
                rows.setdefault(k, []).append(np.asarray(v))
    finally:
        reader.close()
    if not rows:
        raise ValueError(f"{path}: the file holds no rows")
    out = {}
    for k, vs in rows.items():
        width = len(vs[0])
        for i, v in enumerate(vs):
            if v.ndim != 1 or len(v) != width:
                raise ValueError(f"{path}: row {i} of column {k!r} has shape {v.shape}, "
                                 f"row 0 has ({width},); packed rows must share one length")
        out[k] = np.stack(vs).astype(np.int32, copy=False)
    return out


class BatchIterator:
    """Batches of rows in a seeded order per epoch, with a cursor to stop and resume exactly.

    Epoch e visits the rows in `np.random.default_rng([seed, e]).permutation(N)` (or in file
    order when `shuffle=False`), so the order depends only on (seed, epoch), never on how
    many times the job restarted. Each step takes `batch_size * num_shards` rows and yields
    shard `shard_index`'s `batch_size` of them (data parallel ranks). `num_epochs=None`
    loops forever. `state_dict()` after a batch + `load_state_dict()` on a fresh iterator
    continues with the next batch.
    """

    def __init__(self, data: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, num_epochs: Optional[int] = 1,
                 num_shards: int = 1, shard_index: int = 0):
        if not data:
            raise ValueError("no columns to iterate over")
        self._data = {k: np.asarray(v) for k, v in data.items()}
        sizes = {len(v) for v in self._data.values()}
        if len(sizes) != 1:
            raise ValueError(f"columns have different row counts: "
                             f"{ {k: len(v) for k, v in self._data.items()} }")
        if batch_size < 1 or num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError("need batch_size >= 1 and 0 <= shard_index < num_shards")
        self.num_rows = sizes.pop()
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.drop_last, self.num_epochs = drop_last, num_epochs
        self.num_shards, self.shard_index = num_shards, shard_index
        self._step_rows = batch_size * num_shards
        if self.num_rows < self._step_rows and drop_last:
            raise ValueError(f"{self.num_rows} rows cannot fill one batch of {batch_size} x "
                             f"{num_shards} shards with drop_last=True")
        self.epoch, self.batch = 0, 0  # the cursor: next batch to yield
        self._order_epoch, self._order = -1, None

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.num_rows, self._step_rows)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def __iter__(self) -> "BatchIterator":
        return self

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
                           if self.shuffle else np.arange(self.num_rows))
            self._order_epoch = epoch
        return self._order

    def __next__(self) -> Dict[str, np.ndarray]:
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        order = self._epoch_order(self.epoch)
        step = order[self.batch * self._step_rows:(self.batch + 1) * self._step_rows]
        mine = np.array_split(step, self.num_shards)[self.shard_index] if len(step) < self._step_rows \
            else step[self.shard_index * self.batch_size:(self.shard_index + 1) * self.batch_size]
        self.batch += 1
        return {k: v[mine] for k, v in self._data.items()}  # each [B, L]

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                "num_rows": self.num_rows, "batch_size": self.batch_size,
                "num_shards": self.num_shards, "shuffle": int(self.shuffle)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume from `state_dict()`; refuses a cursor taken over different data or settings."""
        for key in ("seed", "num_rows", "batch_size", "num_shards", "shuffle"):
            mine = int(getattr(self, key))
            if key in state and int(state[key]) != mine:
                raise ValueError(f"cannot resume: state has {key}={state[key]}, iterator has {mine}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
