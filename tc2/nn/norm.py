"""RMSNorm, computed in float32 whatever the compute dtype (spec §2)."""
import mindspore as ms
from mindspore import ops


def rms_norm(x, weight, eps: float):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype, times `weight`."""
    x32 = x.astype(ms.float32)                                        # [..., H]
    y = x32 * ops.rsqrt((x32 * x32).mean(axis=-1, keep_dims=True) + eps)
    return y.astype(x.dtype) * weight.astype(x.dtype)
