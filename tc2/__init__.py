"""tc2: TeleChat2 as pure functions over MindSpore ops. The public API, re-exported."""
from .cache import init_cache
from .config import ModelConfig, telechat2_7b, telechat2_35b, telechat2_115b, tiny
from .model import (ParamSpec, count_params, cross_entropy_sum, forward, init_params, jit_forward,
                    loss_fn, param_specs)
from .checkpoint import load_hf, save_hf

__all__ = ["ModelConfig", "telechat2_7b", "telechat2_35b", "telechat2_115b", "tiny", "ParamSpec",
           "param_specs", "count_params", "init_params", "forward", "jit_forward", "loss_fn",
           "cross_entropy_sum", "init_cache", "load_hf", "save_hf"]
