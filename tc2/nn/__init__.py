"""Layer kernels: pure functions over Tensors, each with a numpy float64 reference test."""
from tc2.nn.attention import attention, attention_with_lse, causal_mask, merge_partials
from tc2.nn.linear import linear
from tc2.nn.mlp import swiglu
from tc2.nn.norm import rms_norm
from tc2.nn.rope import apply_rope, ntk_scaling, rope, rope_cos_sin

__all__ = ["attention", "attention_with_lse", "causal_mask", "merge_partials", "linear", "swiglu",
           "rms_norm", "apply_rope", "ntk_scaling", "rope", "rope_cos_sin"]
