"""Layer kernels: pure functions over Tensors, each with a numpy float64 reference test."""
from .attention import attention, attention_with_lse, causal_mask, merge_partials
from .linear import linear
from .mlp import swiglu
from .norm import rms_norm
from .rope import apply_rope, ntk_scaling, rope, rope_cos_sin

__all__ = ["attention", "attention_with_lse", "causal_mask", "merge_partials", "linear", "swiglu",
           "rms_norm", "apply_rope", "ntk_scaling", "rope", "rope_cos_sin"]
