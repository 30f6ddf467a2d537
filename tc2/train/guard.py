"""What guards a training run: one run per out_dir, and a clean stop on Ctrl-C or SIGTERM.

The lock: the main process of `fit` (rank 0 under msrun) holds `fcntl.flock` on
`out_dir/.lock` (which records its pid) for the whole run, so a second run on the same
out_dir fails at once instead of interleaving checkpoints and metrics. The kernel drops the
lock when the holder exits, however it exits: a stale file never blocks anyone.

The stop: MindSpore 2.10 answers SIGINT, once its runtime has run a graph, by sending its own
process SIGTERM (`DefaultIntHandler`, registered again before every graph run), whose default
action ends the process: no KeyboardInterrupt, no message, every step since the last save
lost. So while `fit` runs in one process, SIGINT and SIGTERM (a Ctrl-C arrives as either)
only record a stop request: the current step finishes, `fit` saves it and raises
`TrainingInterrupted`. A second signal stops at once (KeyboardInterrupt; the state is still
the last complete step, which is saved), except inside a train step that writes the weights
in place (`StopSignals.holding`): then it stops as soon as that step has ended. Under msrun, Ctrl-C reaches msrun, which SIGKILLs its
workers: only `save_every` protects such a run.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
from typing import Iterator, Optional

LOCK_FILE = ".lock"
_HELD = {}                                             # realpath of out_dir -> nesting depth in this process


class OutDirInUse(FileExistsError):
    """Another live run holds the out_dir."""


class TrainingInterrupted(KeyboardInterrupt):
    """`fit` stopped on a signal after saving its last complete step (message: how to resume)."""


@contextlib.contextmanager
def out_dir_lock(out_dir: str, enabled: bool = True) -> Iterator[Optional[str]]:
    """Hold `out_dir/.lock` for the block (creating out_dir); OutDirInUse naming the out_dir and
    the holder's pid if another process holds it. Re-entrant within a process (a recipe takes
    it before loading data, `fit` again). `enabled=False` (non-main ranks): no lock."""
    if not enabled:
        yield None
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_FILE)
    key = os.path.realpath(out_dir)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise OutDirInUse(f"{out_dir} is in use by another training run (pid {holder} holds {path}): "
                              "wait for it to finish or stop it, or choose another out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = 1
        try:
            yield path
        finally:
            del _HELD[key]
    finally:
        os.close(fd)                                   # releases the lock


class StopSignals:
    """While active (`with`): SIGINT and SIGTERM set `received` instead of ending the process;
    a second one raises KeyboardInterrupt. Inactive outside the main thread or when disabled."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: Optional[int] = None
        self._old = {}
        self._holding, self._second = False, False

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            self._old = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def _on_signal(self, signum, frame) -> None:
        if self.received is not None:
            if self._holding:
                self._second = True
                os.write(2, b"\nstopping after this step (it writes the weights in place)\n")
                return
            raise KeyboardInterrupt
        self.received = signum
        os.write(2, b"\nstop requested: finishing this step, then saving (press Ctrl-C again to stop now)\n")

    @contextlib.contextmanager
    def holding(self):
        """A block a second signal must not cut (a donated train step writing the weights in
        place, then the new state taken): the KeyboardInterrupt comes when the block ends."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            if self._second:
                raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._old = {}
