"""y = x @ w.T + b with weights kept [out, in] (the checkpoint orientation).

Flattening to 2D and using MatMul(transpose_b=True) is 3-5x faster on CPU than a 3D
`x @ w.T` (MINDSPORE_NOTES §10), and needs no transposed copy of the weight.
"""
from mindspore import ops

_matmul_nt = ops.MatMul(transpose_b=True)


def linear(x, w, b=None):
    lead = x.shape[:-1]
    y = _matmul_nt(x.reshape(-1, x.shape[-1]), w.astype(x.dtype))    # [N, out]
    if b is not None:
        y = y + b.astype(x.dtype)
    return y.reshape(lead + (w.shape[0],))
