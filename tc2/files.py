"""Writes that are complete or absent: the one atomic-write helper of tc2.

Every file tc2 writes (checkpoints, metrics, tokenizers, predictions, data) goes to a temporary
name next to its destination and is renamed into place only once complete, so a crash, a full
disk or Ctrl-C never leaves a half-written file where a complete one was expected, and never
destroys the previous version. `StagedDir` does the same for a set of files that must appear
together (a sharded checkpoint directory).

The temporary name is `<file>.partial-<host>-<pid>`. A writer killed outright (SIGKILL, power
loss) cannot remove its temporaries, so the next write into that directory does
(`remove_stale_partials`): those of this host whose process is gone. An OSError while writing
(a full disk, a read-only directory) is re-raised naming the destination file, not the
temporary (`naming_write_errors`); the directories a failed write created are removed again.
"""
from __future__ import annotations

import json
import os
import re
import socket
from contextlib import contextmanager
from typing import Iterable, List, Optional, Tuple, Union

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_PARTIAL = re.compile(r"(?P<final>.+)\.partial-(?:(?P<host>.+)-)?(?P<pid>\d+)")


def writer_tag() -> str:
    """"<host>-<pid>": what temporary names carry, so a later writer can tell a dead one's."""
    return f"{_HOST}-{os.getpid()}"


def left_by_dead_writer(host: Optional[str], pid: int) -> bool:
    """Whether a temporary tagged (host, pid) belongs to a process of this host that is gone
    (not this process, not a live one, not another host's on a shared filesystem)."""
    return host in (None, _HOST) and pid != os.getpid() and not pid_alive(pid)


def partial_name(path: str) -> str:
    """The temporary name a file is written under before it is renamed to `path`."""
    return f"{path}.partial-{writer_tag()}"


def destination_of(path: str) -> str:
    """The file a temporary name (`partial_name`) stands for; other paths unchanged."""
    m = _PARTIAL.fullmatch(path)
    return m.group("final") if m else path


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_stale_partials(directory: str) -> List[str]:
    """Remove the temporaries (`partial_name`) in `directory` left by writers of this host whose
    process is gone; returns their names. Those of live processes (a concurrent writer) and of
    other hosts (a shared filesystem) are left alone."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _PARTIAL.fullmatch(name)
        if not m or not left_by_dead_writer(m.group("host"), int(m.group("pid"))):
            continue
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        try:
            os.remove(path)
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


@contextmanager
def naming_write_errors(dest: str):
    """Re-raise an OSError of the block as one naming `dest` (or the destination of the
    temporary it names): `write()` on a full disk raises "[Errno 28] No space left on device"
    with no file name at all."""
    try:
        yield
    except OSError as e:
        where = destination_of(e.filename if isinstance(e.filename, str) else dest)
        if e.errno is None or where == e.filename:
            raise
        raise OSError(e.errno, e.strerror, where) from e


def make_dirs(path: str) -> List[str]:
    """os.makedirs(path, exist_ok=True) that returns the directories it created, parents first."""
    missing = []
    d = path
    while d and not os.path.isdir(d):
        missing.append(d)
        d = os.path.dirname(d)
    created = []
    with naming_write_errors(path):
        for d in reversed(missing):
            os.mkdir(d)
            created.append(d)
    return created


def remove_empty_dirs(dirs: Iterable[str]) -> None:
    """Remove `dirs` (as `make_dirs` returned them) that are empty, deepest first."""
    for d in reversed(list(dirs)):
        if os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)


@contextmanager
def atomic_file(path: str):
    """Yield a temporary name next to `path`; renamed to `path` only if the block succeeds.
    Temporaries of dead writers in that directory are removed first."""
    remove_stale_partials(os.path.dirname(os.path.abspath(path)))
    tmp = partial_name(path)
    try:
        yield tmp
        with naming_write_errors(path):
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str, data: Union[str, bytes]) -> None:
    """Write `data` (text as UTF-8) to `path` atomically, creating its directory if needed."""
    created = make_dirs(os.path.dirname(os.path.abspath(path)))
    try:
        with atomic_file(path) as tmp, naming_write_errors(path):
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
    except BaseException:
        remove_empty_dirs(created)
        raise


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

    Every file goes under `<file>.partial-<host>-<pid>` (`file(rel)` gives that name) and is
    renamed in at `commit`, after which `stale` files (e.g. left by an older, differently
    sharded save) are removed. `abort` removes the temporaries and the directories this
    created, so a failed write leaves `dest` as it was (or absent). As a context manager,
    leaving without `commit` (an exception) aborts. Temporaries of dead writers in the
    directories written to are removed first.
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
        self._dirs += make_dirs(d)
        remove_stale_partials(d)

    def json(self, rel: str, obj) -> None:
        path = self.file(rel)
        with naming_write_errors(path), open(path, "w", encoding="utf-8") as f:
            f.write(json_text(obj))

    def commit(self, stale: Iterable[str] = ()) -> None:
        """Rename every file in; then remove `stale` (paths relative to dest) not just written."""
        for tmp, final in self._files:
            with naming_write_errors(final):
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
        remove_empty_dirs(self._dirs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()                                  # a no-op after commit
