"""y = x @ w.T + b with weights kept [out, in] (the checkpoint orientation), and its backward.

Flattening to 2D and using MatMul(transpose_b=True) is 3-5x faster on CPU than a 3D
`x @ w.T` (MINDSPORE_NOTES §10), and needs no transposed copy of the weight.
"""
import mindspore as ms
from mindspore import ops

_matmul_nt = ops.MatMul(transpose_b=True)
_matmul_tn = ops.MatMul(transpose_a=True)
_matmul = ops.MatMul()


def linear(x, w, b=None):
    lead = x.shape[:-1]
    y = _matmul_nt(x.reshape(-1, x.shape[-1]), w.astype(x.dtype))    # [N, out]
    if b is not None:
        y = y + b.astype(x.dtype)
    return y.reshape(lead + (w.shape[0],))


def linear_backward(x, w, dy):
    """(dx in x's dtype, dw float32) of y = linear(x, w) given dy: dx = dy @ w, dw = dy^T @ x,
    the products autodiff takes (w float32, computed in x's dtype)."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])              # [N, in], [N, out]
    dx = _matmul(dy2, w.astype(dy.dtype)).reshape(x.shape)
    return dx, _matmul_tn(dy2, x2).astype(ms.float32)                               # [out, in]
