"""What every checkpoint reader of tc2 shares: closing its files, and assembling rank slices.

A reader holds open files (one safetensors or `.ckpt` file, or a checkpoint made of several)
and gives tensors one at a time. `Reader` is the clean-up code they all need (`close`, use as a
context manager, close when a constructor fails half-way), written once. `read_blocks` builds
one full tensor from blocks held by several files (tensor-parallel ranks, optimizer-parallel
slices), reading each block straight into the output where it is contiguous there, so a merge
holds the full tensor plus at most one block; `read_slices` is its case of equal slices along
one dim.
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


def read_blocks(blocks: Sequence[Tuple[object, str, Tuple[slice, ...]]], shape: Tuple[int, ...],
                dtype: np.dtype) -> np.ndarray:
    """The tensor of `shape` assembled from `blocks`: [(file, name, index)], where `index` (a tuple
    of slices) is the region `file.read(name, out=None)` fills. The blocks must tile the tensor.
    A block C-contiguous in the output (a run of whole rows) is read into it in place; any
    other is read, then copied in, so a merge holds the full tensor plus at most one block.
    """
    out = np.empty(shape, dtype)
    for file, name, index in blocks:
        dest = out[index]
        if dest.flags.c_contiguous:
            file.read(name, out=dest)
        else:
            dest[...] = file.read(name)
    return out


def read_slices(parts: Sequence[Tuple[object, str]], shape: Tuple[int, ...], dtype: np.dtype,
                dim: int) -> np.ndarray:
    """The tensor of `shape` whose equal slices along `dim` are `parts` in order.

    parts: [(file, name)] where `file.read(name, out=None)` gives the raw slice (a
    `SafetensorsFile` or `CkptFile`); see `read_blocks`.
    """
    step = shape[dim] // len(parts)
    return read_blocks([(file, name, tuple(slice(i * step, (i + 1) * step) if d == dim else slice(None)
                                           for d in range(len(shape))))
                        for i, (file, name) in enumerate(parts)], shape, dtype)
