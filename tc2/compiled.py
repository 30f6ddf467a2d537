"""Cached compiled functions that are forgotten after a failure.

Measured on MindSpore 2.10 CPU: once a kernel raises inside an `ms.jit` call (e.g. Gather with
an index outside the table), every later call of that same compiled function fails, even on
good inputs, with "Invalid output number for flatten stub output nodes, expect: 1, but got: 2"
(3, 4, ... on each retry): the graph's output actor keeps the failed call's outputs. Other
graphs and eager ops are unaffected, and a freshly jitted function works. So every factory
that caches compiled functions (the train step, eval, the decode step, `jit_forward`) is
wrapped here: a call that raises clears the factory's cache, and the next call compiles anew.
Inputs that would fail are refused on the host first (`tc2.step.check_token_ids`); this is
the net under that.
"""
from __future__ import annotations

import functools

__all__ = ["forget_after_failure"]


def _forgetting(fn, cache_clear):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:
            cache_clear()
            raise
    return call


def forget_after_failure(factory=None, *, maxsize: int = 16):
    """`functools.lru_cache` for a factory of jitted functions (one, or a tuple of them); each
    function it hands out clears the cache when it raises. Use as `@forget_after_failure`."""
    if factory is None:
        return functools.partial(forget_after_failure, maxsize=maxsize)
    cached = functools.lru_cache(maxsize=maxsize)(factory)

    def wrap(out):
        if isinstance(out, dict):
            return {k: wrap(v) for k, v in out.items()}
        if isinstance(out, tuple):                      # a tuple (or NamedTuple) of them, nested
            items = [wrap(f) for f in out]
            return type(out)(*items) if hasattr(out, "_fields") else tuple(items)
        return _forgetting(out, cached.cache_clear)

    @functools.wraps(factory)
    def get(*args, **kwargs):
        return wrap(cached(*args, **kwargs))

    get.cache_clear, get.cache_info = cached.cache_clear, cached.cache_info
    return get
