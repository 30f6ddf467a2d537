"""The few pytree helpers MindSpore lacks, for dict/tuple containers only.

Written with `isinstance` and one-`for` comprehensions so they also compile inside `ms.jit`
(graph mode parses the source: no iterators, no try, one `for` per comprehension). Lists are
deliberately not containers: list arguments recompile on every jit call.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops


def tree_map(fn, tree, *rest):
    """fn over the leaves of `tree` (and the matching leaves of `rest`), same structure out."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, tree[k], *[r[k] for r in rest]) for k in tree}
    if isinstance(tree, tuple):
        return tuple([tree_map(fn, tree[i], *[r[i] for r in rest]) for i in range(len(tree))])
    return fn(tree, *rest)


def tree_leaves(tree) -> tuple:
    """Leaves in the dicts' insertion order, as a flat tuple.

    Not sorted: inside ms.jit a loop over `sorted(dict)` silently runs zero times, so graph
    code must iterate the dict itself. `tree_unflatten` uses the same order.
    """
    if isinstance(tree, dict):
        out = ()
        for k in tree:
            out = out + tree_leaves(tree[k])
        return out
    if isinstance(tree, tuple):
        out = ()
        for t in tree:
            out = out + tree_leaves(t)
        return out
    return (tree,)


def leaves_like(tree, like) -> tuple:
    """The leaves of `tree` in the order of `like`'s structure (its dict keys, not `tree`'s).

    For a jitted function's output: MindSpore 2.10 builds a returned dict through a Python
    fallback (PyExecute) that cost 30-50 ms per call for one 8M-element tensor (measured; dict
    inputs cost nothing). Graphs return these flat tuples and the host rebuilds the tree with
    `tree_unflatten(like, leaves)`; taking the order from `like` (an input) keeps the two in
    step whatever order the function built its dicts in.
    """
    if isinstance(like, dict):
        out = ()
        for k in like:
            out = out + leaves_like(tree[k], like[k])
        return out
    if isinstance(like, tuple):
        out = ()
        for i in range(len(like)):
            out = out + leaves_like(tree[i], like[i])
        return out
    return (tree,)


def tree_unflatten(like, leaves):
    """Inverse of `tree_leaves`: put `leaves` (in that order) into the structure of `like`."""
    out, rest = _unflatten(like, tuple(leaves))
    if rest:
        raise ValueError(f"{len(rest)} leaves left over")
    return out


def _unflatten(like, leaves):
    if isinstance(like, dict):
        out = {}
        for k in like:
            out[k], leaves = _unflatten(like[k], leaves)
        return out, leaves
    if isinstance(like, tuple):
        items = []
        for t in like:
            item, leaves = _unflatten(t, leaves)
            items.append(item)
        return tuple(items), leaves
    return leaves[0], leaves[1:]


def tree_flatten_with_names(tree, prefix: str = "") -> dict:
    """{"layers.0.query": leaf, ...}: dotted names in `tree_leaves` order (host side only)."""
    if isinstance(tree, dict):
        out = {}
        for k in tree:
            out.update(tree_flatten_with_names(tree[k], f"{prefix}{k}."))
        return out
    if isinstance(tree, tuple):
        out = {}
        for i, t in enumerate(tree):
            out.update(tree_flatten_with_names(t, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def tree_names(tree):
    """The dotted name of every leaf ("layers.0.dense_bias"), as a pytree of str like `tree`.
    Unlike `tree_flatten_with_names` it compiles in graph mode (masks built inside ms.jit)."""
    return _names_below(tree, "")


def _names_below(tree, prefix):
    if isinstance(tree, dict):
        return {k: _names_below(tree[k], prefix + k + ".") for k in tree}
    if isinstance(tree, tuple):
        return tuple([_names_below(tree[i], prefix + str(i) + ".") for i in range(len(tree))])
    return prefix[:-1]


def tree_unflatten_from_names(like, flat: dict):
    """Inverse of `tree_flatten_with_names` into the structure of `like`; exact name match."""
    names = tree_flatten_with_names(like)
    missing = sorted(set(names) - set(flat))
    extra = sorted(set(flat) - set(names))
    if missing or extra:
        raise KeyError(f"tree names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    return tree_unflatten(like, [flat[n] for n in names])


def global_norm(tree, sharded=None, sum_shards=None):
    """sqrt(sum of squares of every leaf), accumulated in float32; compiles in graph mode.

    The one global norm of tc2 (clipping, the train step's metric). Under tensor parallelism
    `sharded` (a pytree of bool like `tree`) marks the leaves split over the tp group: their
    partial sums are added up by `sum_shards` (a sum over the group), while replicated leaves,
    identical on every rank, are counted once.
    """
    if sharded is None:
        return ops.sqrt(sum_squares(tree, None, True))
    split = sum_shards(sum_squares(tree, sharded, True).reshape(1))[0]
    return ops.sqrt(sum_squares(tree, sharded, False) + split)


def sum_squares(tree, mask, want: bool):
    """Sum of squares (float32) over the leaves whose mask is `want` (every leaf when mask is None)."""
    total = ms.Tensor(0.0, ms.float32)
    if isinstance(tree, dict):
        for k in tree:                       # insertion order; `sorted(tree)` is empty in graph
            total = total + sum_squares(tree[k], None if mask is None else mask[k], want)
        return total
    if isinstance(tree, tuple):
        for i in range(len(tree)):
            total = total + sum_squares(tree[i], None if mask is None else mask[i], want)
        return total
    if mask is not None and mask != want:
        return total
    x = tree.astype(ms.float32)
    return (x * x).sum()
