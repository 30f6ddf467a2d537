"""Ascend semi-auto parallel data (Layouts, strategies, stages) for the release meshes."""
import numpy as np
import pytest

from tc2.config import telechat2_7b, telechat2_35b, telechat2_115b
from tc2.parallel.layouts import op_strategies, param_layouts, param_strategies, pipeline_stages
from tc2.model import param_specs
from tc2.parallel.sharding import Mesh, local_param_specs, stage_layers
from tc2.tree import tree_flatten_with_names

RELEASE = [(telechat2_7b(), Mesh(dp=8)), (telechat2_35b(), Mesh(tp=4, pp=4)),
           (telechat2_115b(), Mesh(dp=8, tp=8, pp=8))]


@pytest.mark.parametrize("cfg,mesh", RELEASE, ids=["7b-dp8", "35b-tp4pp4", "115b-dp8tp8pp8"])
def test_release_layouts_and_strategies(cfg, mesh):
    layouts = param_layouts(cfg, mesh)
    strategies = param_strategies(cfg, mesh)
    specs = tree_flatten_with_names(param_specs(cfg))
    assert set(layouts) == set(strategies) == set(specs)
    tp = mesh.tp
    col = (0, -1) if tp > 1 else (-1, -1)           # tensor_map: 'tp' is the last device-matrix axis
    row = (-1, 0) if tp > 1 else (-1, -1)
    for n, spec in specs.items():
        d = layouts[n].to_dict()
        assert d["device_matrix"] == (mesh.dp, mesh.cp, mesh.tp)
        assert d["alias_name"] == ("dp", "cp", "tp")
        key = n.split(".")[-1]
        want = {"query": col, "key_value": col, "gate_proj": col, "up_proj": col, "word_embeddings": col,
                "lm_head": col, "dense": row, "down_proj": row}.get(key, (-1,))
        assert d["tensor_map"] == want, n
        st = strategies[n]
        assert len(st) == len(spec.shape)
        assert all(size % k == 0 for size, k in zip(spec.shape, st)), n
        assert st == tuple(tp if m == 0 else 1 for m in want), n
    stages = pipeline_stages(cfg, mesh)
    counts = [sum(1 for s in stages.values() if s == k) for k in range(mesh.pp)]
    assert counts == [cfg.n_layer // mesh.pp] * mesh.pp
    assert list(stages.values()) == sorted(stages.values())
    ops_st = op_strategies(cfg, mesh)
    stage_devices = mesh.dp * mesh.cp * mesh.tp
    for op, st in ops_st.items():
        for s in st:
            n = int(np.prod(s))
            assert stage_devices % n == 0, (op, st)
    assert ops_st["query"] == ((mesh.dp * mesh.cp, 1), (tp, 1))
    assert ops_st["dense"] == ((mesh.dp * mesh.cp, tp), (1, tp))
    assert ops_st["rms_norm"] == ((mesh.dp * mesh.cp * tp, 1), (1,))


def test_115b_per_rank_kv_is_one_head():
    cfg, mesh = telechat2_115b(), Mesh(dp=8, tp=8, pp=8)
    local = local_param_specs(cfg, mesh, mesh.rank(tp=5, pp=7))
    assert local["layers"][0]["key_value"].shape == (2 * 128, 8192)
    assert local["layers"][0]["query"].shape == (8 * 128, 8192)
    assert len(local["layers"]) == 12 and "lm_head" in local and "word_embeddings" not in local
    assert list(stage_layers(cfg, mesh, 7)) == list(range(84, 96))
