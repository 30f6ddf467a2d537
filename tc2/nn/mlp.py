"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)) + b_down (TeleChat2's only MLP bias is on down)."""
from mindspore import ops

from tc2.nn.linear import linear


def gated(g, u):
    """silu(g) * u: the SwiGLU activation of the gate and up projections."""
    return ops.silu(g) * u


def swiglu(x, w_gate, w_up, w_down, b_down=None):
    return linear(gated(linear(x, w_gate), linear(x, w_up)), w_down, b_down)      # [..., H]
