"""Count MindSpore graph compilations, so tests can prove a jitted call reused its graph.

Every compiled jit phase is registered in `mindspore.graph.api.ms_compile_cache`; a call that
reuses a compiled graph adds nothing to it. Counting beats timing on a shared machine.
"""
from mindspore.graph import api as _api


def compiled_graphs() -> int:
    return len(_api.ms_compile_cache)
