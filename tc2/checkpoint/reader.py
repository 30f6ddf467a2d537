"""What every checkpoint reader of tc2 shares: closing its files, and assembling rank slices.

A reader holds open files (one safetensors or `.ckpt` file, or a checkpoint made of several)
and gives tensors one at a time. `Reader` is the clean-up code they all need (`close`, use as a
context manager, close when a constructor fails half-way), written once. `read_slices` builds
one full tensor from equal slices held by several files (tensor-parallel ranks), reading each
slice straight into the output where the slice is contiguous there, so a merge holds the full
tensor plus at most one slice.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence, Tuple

import numpy as np


class Reader:
    """Base of the readers: `close()` releases their files; `with reader:` closes on leaving."""

    def close(self) -> None:
        raise NotImplementedError

    @contextmanager
    def closing_on_error(self):
        """Close this reader if the block raises: for a constructor that opens files, then checks."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_slices(parts: Sequence[Tuple[object, str]], shape: Tuple[int, ...], dtype: np.dtype,
                dim: int) -> np.ndarray:
    """The tensor of `shape` whose equal slices along `dim` are `parts` in order.

    parts: [(file, name)] where `file.read(name, out=None)` gives the raw slice (a
    `SafetensorsFile` or `CkptFile`). A slice that is C-contiguous in the output (every slice
    along dim 0) is read into it in place; any other is read, then copied in.
    """
    out = np.empty(shape, dtype)
    for (file, name), dest in zip(parts, np.split(out, len(parts), axis=dim)):
        if dest.flags.c_contiguous:
            file.read(name, out=dest)
        else:
            dest[...] = file.read(name)
    return out
