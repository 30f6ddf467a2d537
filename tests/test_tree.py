"""Pytree helpers, on the host and inside ms.jit (where they must give the same answers)."""
import mindspore as ms
import numpy as np

from tc2.tree import (tree_flatten_with_names, global_norm, tree_leaves, tree_map, tree_unflatten,
                      tree_unflatten_from_names)

TREE = {"b": ms.Tensor(np.array([3.0], np.float32)),
        "a": ({"x": ms.Tensor(np.array([[1.0, 2.0]], np.float32))}, ms.Tensor(np.array([4.0], np.float32)))}


@ms.jit
def _norm_in_graph(tree):
    return global_norm(tree)


@ms.jit
def _leaves_in_graph(tree):
    return tree_leaves(tree)


@ms.jit
def _double_in_graph(tree):
    return tree_map(lambda x: x * 2, tree)


def test_global_norm_host_and_graph():
    want = np.sqrt(9 + 1 + 4 + 16)
    assert float(global_norm(TREE).asnumpy()) == np.float32(want)
    assert float(_norm_in_graph(ms.mutable(TREE)).asnumpy()) == np.float32(want)


def test_leaves_same_order_in_graph_and_unflatten_round_trip():
    host = tree_leaves(TREE)
    graph = _leaves_in_graph(ms.mutable(TREE))
    assert len(host) == len(graph) == 3
    for h, g in zip(host, graph):
        np.testing.assert_array_equal(h.asnumpy(), g.asnumpy())
    back = tree_unflatten(TREE, host)
    assert back.keys() == TREE.keys() and back["a"][0]["x"] is TREE["a"][0]["x"]


def test_map_in_graph_keeps_structure():
    out = _double_in_graph(ms.mutable(TREE))
    np.testing.assert_array_equal(out["a"][0]["x"].asnumpy(), [[2.0, 4.0]])
    np.testing.assert_array_equal(out["a"][1].asnumpy(), [8.0])


def test_names_round_trip():
    flat = tree_flatten_with_names(TREE)
    assert sorted(flat) == ["a.0.x", "a.1", "b"]
    back = tree_unflatten_from_names(TREE, flat)
    assert back["b"] is TREE["b"]
