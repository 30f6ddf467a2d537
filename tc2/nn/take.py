"""Slicing one axis without MindSpore 2.10 CPU's slow path.

On this CPU a basic slice that spans a whole axis (`x[:, :, :n]` with n the axis length, or
`x[:, -1:]` of a length-1 axis) costs ~3 ms even for a [4, 2, 512, 64] tensor, against ~0.1 ms
through `ops.narrow`: in the batch-8 decode step such slices cost 3x its matmuls (measured).
"""
from __future__ import annotations

from mindspore import ops


def take(x, axis: int, start: int, end: int):
    """x[..., start:end, ...] along `axis` (static ints, 0 <= start < end <= length); x itself
    when that is the whole axis."""
    if start == 0 and end == x.shape[axis]:
        return x
    return ops.narrow(x, axis, start, end - start)
