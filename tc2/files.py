"""Writes that are complete or absent: the one atomic-write helper of tc2.

Every file tc2 writes (checkpoints, metrics, tokenizers, predictions, data) goes to a temporary
name next to its destination and is renamed into place only once complete, so a crash, a full
disk or Ctrl-C never leaves a half-written file where a complete one was expected, and never
destroys the previous version. `StagedDir` does the same for a set of files that must appear
together (a sharded checkpoint directory).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Iterable, List, Tuple, Union


def partial_name(path: str) -> str:
    """The temporary name a file is written under before it is renamed to `path`."""
    return f"{path}.partial-{os.getpid()}"


@contextmanager
def atomic_file(path: str):
    """Yield a temporary name next to `path`; renamed to `path` only if the block succeeds."""
    tmp = partial_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str, data: Union[str, bytes]) -> None:
    """Write `data` (text as UTF-8) to `path` atomically, creating its directory if needed."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)


def json_text(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_json_atomic(path: str, obj) -> None:
    write_atomic(path, json_text(obj))


def write_jsonl_atomic(path: str, rows: Iterable[dict]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped), written atomically."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def fsync_path(path: str) -> None:
    """Flush a file or directory to disk (best effort: some filesystems refuse directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StagedDir:
    """Output files of one directory that appear together or not at all.

    Every file goes under `<file>.partial-<pid>` (`file(rel)` gives that name) and is renamed in
    at `commit`, after which `stale` files (e.g. left by an older, differently sharded save)
    are removed. `abort` removes the temporaries and the directories this created, so a failed
    write leaves `dest` as it was (or absent). As a context manager, leaving without `commit`
    (an exception) aborts.
    """

    def __init__(self, dest: str):
        if os.path.exists(dest) and not os.path.isdir(dest):
            raise NotADirectoryError(f"{dest} exists and is not a directory")
        self.dest = str(dest)
        self._files: List[Tuple[str, str]] = []
        self._dirs: List[str] = []                   # created here, parents first
        self._makedirs(self.dest)

    def existing(self) -> List[str]:
        """The names in `dest` other than this stage's temporaries."""
        return sorted(set(os.listdir(self.dest)) - {os.path.basename(t) for t, _ in self._files})

    def file(self, rel: str) -> str:
        """The temporary path to write `dest/rel` under."""
        final = os.path.join(self.dest, rel)
        self._makedirs(os.path.dirname(final))
        tmp = partial_name(final)
        self._files.append((tmp, final))
        return tmp

    def _makedirs(self, d: str) -> None:
        missing = []
        while d and not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            os.mkdir(d)
            self._dirs.append(d)

    def json(self, rel: str, obj) -> None:
        with open(self.file(rel), "w", encoding="utf-8") as f:
            f.write(json_text(obj))

    def commit(self, stale: Iterable[str] = ()) -> None:
        """Rename every file in; then remove `stale` (paths relative to dest) not just written."""
        for tmp, final in self._files:
            os.replace(tmp, final)
        written = {os.path.normpath(final) for _, final in self._files}
        for rel in stale:
            p = os.path.normpath(os.path.join(self.dest, rel))
            if p not in written and os.path.exists(p):
                os.remove(p)
        self._files, self._dirs = [], []

    def abort(self) -> None:
        for tmp, _ in self._files:
            if os.path.exists(tmp):
                os.remove(tmp)
        for d in reversed(self._dirs):
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()                                  # a no-op after commit
