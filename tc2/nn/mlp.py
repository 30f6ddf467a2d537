"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)) + b_down (TeleChat2's only MLP bias is on down)."""
from mindspore import ops

from tc2.nn.linear import linear


def swiglu(x, w_gate, w_up, w_down, b_down=None):
    h = ops.silu(linear(x, w_gate)) * linear(x, w_up)                # [..., F]
    return linear(h, w_down, b_down)                                  # [..., H]
