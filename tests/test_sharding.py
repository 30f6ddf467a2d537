"""Mesh, rules table, collision/divisibility checks, per-rank slices, names for split/merge."""
import numpy as np
import pytest

from tc2.checkpoint.names import leaf_key
from tc2.config import telechat2_7b, telechat2_35b, telechat2_115b, tiny
from tc2.model import init_params, param_specs
from tc2.parallel.sharding import (DEFAULT_RULES, Mesh, ShardingError, check_mesh, local_param_specs, mesh_axes,
                                   param_mesh_axes, param_slices, shard_params, split_dim, unshard_params)
from tc2.tree import tree_flatten_with_names

CFG = tiny(n_head=4, num_key_value_heads=2)
CFG_MHA4 = tiny(n_head=4, num_key_value_heads=4, n_layer=4)


# ---------------------------------------------------------------------------------------------
# Mesh
def test_mesh_rank_coords_roundtrip_and_order():
    m = Mesh(dp=2, cp=3, tp=2, pp=2)
    assert m.size == 24
    seen = set()
    for r in range(m.size):
        c = m.coords(r)
        assert m.rank(**c) == r
        seen.add(tuple(c.values()))
    assert len(seen) == 24
    # tp is the fastest axis (consecutive ranks), pp the slowest
    assert m.coords(1) == {"dp": 0, "cp": 0, "tp": 1, "pp": 0}
    assert m.coords(2) == {"dp": 0, "cp": 1, "tp": 0, "pp": 0}
    assert m.coords(6) == {"dp": 1, "cp": 0, "tp": 0, "pp": 0}
    assert m.coords(12)["pp"] == 1


@pytest.mark.parametrize("axes", ["dp", "cp", "tp", "pp", ("dp", "cp")])
def test_mesh_groups_partition_the_ranks(axes):
    m = Mesh(dp=2, cp=2, tp=2, pp=2)
    groups = m.groups(axes)
    flat = sorted(r for g in groups for r in g)
    assert flat == list(range(m.size))
    assert all(len(g) == m.axis_size(axes) for g in groups)
    for g in groups:
        for r in g:
            assert m.group(axes, r) == g
            assert m.group_name(axes, r) == m.group_name(axes, g[0])
    assert len({m.group_name(axes, g[0]) for g in groups}) == len(groups)
    assert m.group("tp", 5) == (4, 5)


def test_mesh_rejects_bad_sizes_and_ranks():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ShardingError, match="positive int"):
            Mesh(tp=bad)
    with pytest.raises(ShardingError, match="outside"):
        Mesh(dp=2).coords(2)
    with pytest.raises(ShardingError, match="unknown mesh axis"):
        Mesh().group("mp", 0)


# ---------------------------------------------------------------------------------------------
# rules and checks
def test_rules_map_logical_axes_megatron_style():
    axes = param_mesh_axes(CFG)
    assert axes["layers.0.query"] == ("tp", None)
    assert axes["layers.0.key_value"] == ("tp", None)
    assert axes["layers.0.dense"] == (None, "tp")
    assert axes["layers.0.down_proj"] == (None, "tp")
    assert axes["layers.0.gate_proj"] == axes["layers.0.up_proj"] == ("tp", None)
    assert axes["word_embeddings"] == axes["lm_head"] == ("tp", None)
    assert axes["ln_f"] == axes["layers.1.dense_bias"] == (None,)


def test_collision_and_unknown_axis_are_errors():
    with pytest.raises(ShardingError, match="'tp' would shard more than one dim"):
        mesh_axes(("q_heads", "mlp"), where="w")
    rules = dict(DEFAULT_RULES, embed="tp")
    with pytest.raises(ShardingError, match=r"word_embeddings: mesh axis 'tp' would shard more than one dim of axes \('vocab', 'embed'\)"):
        param_mesh_axes(CFG, rules)
    with pytest.raises(ShardingError, match="logical axis 'heads' has no sharding rule"):
        mesh_axes(("heads",), where="w")
    with pytest.raises(ShardingError, match="not a mesh axis"):
        mesh_axes(("mlp",), dict(DEFAULT_RULES, mlp="mp"), where="w")


def test_divisibility_errors_name_tensor_and_sizes():
    with pytest.raises(ShardingError, match=r"key_value: num_key_value_heads=8 is not divisible by tp=16.*at most 8"):
        check_mesh(telechat2_115b(), Mesh(tp=16))
    with pytest.raises(ShardingError, match=r"n_head=4 is not divisible by tp=3"):
        check_mesh(CFG, Mesh(tp=3))
    with pytest.raises(ShardingError, match=r"word_embeddings: dim 0 \(vocab\) of size 510 is not divisible by tp=4"):
        check_mesh(CFG.replace(vocab_size=510, num_key_value_heads=4), Mesh(tp=4))
    with pytest.raises(ShardingError, match=r"layers.0.gate_proj: dim 0 \(mlp\) of size 170 is not divisible by tp=4"):
        check_mesh(CFG.replace(ffn_hidden_size=170, num_key_value_heads=4), Mesh(tp=4))
    with pytest.raises(ShardingError, match="n_layer=2 is not divisible by pp=3"):
        check_mesh(CFG, Mesh(pp=3))
    # the release layouts are valid
    check_mesh(telechat2_7b(), Mesh(dp=8))
    check_mesh(telechat2_35b(), Mesh(tp=4, pp=4))
    check_mesh(telechat2_115b(), Mesh(dp=8, tp=8, pp=8))


# ---------------------------------------------------------------------------------------------
# per-rank slices
@pytest.fixture(scope="module")
def params_np():
    return {n: x.asnumpy() for n, x in tree_flatten_with_names(init_params(CFG_MHA4, seed=3)).items()}


@pytest.fixture(scope="module")
def params_tree():
    return init_params(CFG_MHA4, seed=3)


@pytest.mark.parametrize("mesh", [Mesh(tp=2), Mesh(tp=4), Mesh(dp=2, tp=2, pp=2), Mesh(cp=2, pp=4),
                                  Mesh(dp=3)])
def test_shard_unshard_roundtrip(params_tree, params_np, mesh):
    shards = {r: shard_params(params_tree, CFG_MHA4, mesh, r, to_tensor=False) for r in range(mesh.size)}
    full = unshard_params(shards, CFG_MHA4, mesh, to_tensor=False)
    for n, a in tree_flatten_with_names(full).items():
        np.testing.assert_array_equal(a, params_np[n], err_msg=n)
    # local shapes agree with local_param_specs, and pipeline placement is first/last stage
    for r in range(mesh.size):
        local_specs = tree_flatten_with_names(local_param_specs(CFG_MHA4, mesh, r))
        got = {n: a.shape for n, a in tree_flatten_with_names(shards[r]).items()}
        assert got == {n: s.shape for n, s in local_specs.items()}
        stage = mesh.coords(r)["pp"]
        assert ("word_embeddings" in shards[r]) == (stage == 0)
        assert ("lm_head" in shards[r]) == (stage == mesh.pp - 1)
        assert len(shards[r]["layers"]) == CFG_MHA4.n_layer // mesh.pp


def test_tp_slices_hold_whole_heads(params_np):
    cfg, mesh = CFG_MHA4.replace(num_key_value_heads=2), Mesh(tp=2)
    p = init_params(cfg, seed=1)
    full = {n: x.asnumpy() for n, x in tree_flatten_with_names(p).items()}
    D, F = cfg.head_dim, cfg.ffn_hidden_size
    for r in range(2):
        loc = tree_flatten_with_names(shard_params(p, cfg, mesh, r, to_tensor=False))
        # query: heads 2r, 2r+1; key_value: KV head r with its interleaved k and v rows
        np.testing.assert_array_equal(loc["layers.0.query"].reshape(2, D, -1),
                                      full["layers.0.query"].reshape(4, D, -1)[2 * r: 2 * r + 2])
        np.testing.assert_array_equal(loc["layers.0.key_value"].reshape(1, 2, D, -1),
                                      full["layers.0.key_value"].reshape(2, 2, D, -1)[r: r + 1])
        np.testing.assert_array_equal(loc["layers.0.dense"], full["layers.0.dense"][:, r * 2 * D:(r + 1) * 2 * D])
        np.testing.assert_array_equal(loc["layers.0.down_proj"], full["layers.0.down_proj"][:, r * F // 2:(r + 1) * F // 2])
        np.testing.assert_array_equal(loc["lm_head"], full["lm_head"][r * 256:(r + 1) * 256])
        np.testing.assert_array_equal(loc["layers.0.dense_bias"], full["layers.0.dense_bias"])


def test_unshard_detects_diverged_replicas_and_missing_ranks(params_tree):
    mesh = Mesh(dp=2, tp=2)
    shards = {r: shard_params(params_tree, CFG_MHA4, mesh, r, to_tensor=False) for r in range(4)}
    with pytest.raises(ShardingError, match=r"ranks \[3\] are missing"):
        unshard_params({r: shards[r] for r in range(3)}, CFG_MHA4, mesh)
    shards[3]["ln_f"] = shards[3]["ln_f"] + 1e-3
    with pytest.raises(ShardingError, match="ln_f: the replicas on ranks 0 and 3 differ"):
        unshard_params(shards, CFG_MHA4, mesh)
    shards[3]["ln_f"] = shards[3]["ln_f"][:-1]
    with pytest.raises(ShardingError, match="rank 3: ln_f has shape"):
        unshard_params(shards, CFG_MHA4, mesh, check_replicas=False)


# ---------------------------------------------------------------------------------------------
# names shared with checkpoint split/merge
NAMES = {  # tc2, HF, MindFormers -> (leaf key, tp split dim)
    ("word_embeddings", "transformer.word_embeddings.weight", "model.tok_embeddings.embedding_weight"): ("word_embeddings", 0),
    ("layers.2.input_layernorm", "transformer.h.2.input_layernorm.weight", "model.layers.2.attention_norm.weight"): ("input_layernorm", None),
    ("layers.2.query", "transformer.h.2.self_attention.query.weight", "model.layers.2.attention.wq.weight"): ("query", 0),
    ("layers.2.key_value", "transformer.h.2.self_attention.key_value.weight", "model.layers.2.attention.wk_v.weight"): ("key_value", 0),
    ("layers.2.dense", "transformer.h.2.self_attention.dense.weight", "model.layers.2.attention.wo.weight"): ("dense", 1),
    ("layers.2.dense_bias", "transformer.h.2.self_attention.dense.bias", "model.layers.2.attention.wo.bias"): ("dense_bias", None),
    ("layers.2.post_attention_layernorm", "transformer.h.2.post_attention_layernorm.weight", "model.layers.2.ffn_norm.weight"): ("post_attention_layernorm", None),
    ("layers.2.gate_proj", "transformer.h.2.mlp.gate_proj.weight", "model.layers.2.feed_forward.w1.weight"): ("gate_proj", 0),
    ("layers.2.up_proj", "transformer.h.2.mlp.up_proj.weight", "model.layers.2.feed_forward.w3.weight"): ("up_proj", 0),
    ("layers.2.down_proj", "transformer.h.2.mlp.down_proj.weight", "model.layers.2.feed_forward.w2.weight"): ("down_proj", 1),
    ("layers.2.down_proj_bias", "transformer.h.2.mlp.down_proj.bias", "model.layers.2.feed_forward.w2.bias"): ("down_proj_bias", None),
    ("ln_f", "transformer.ln_f.weight", "model.norm_out.weight"): ("ln_f", None),
    ("lm_head", "lm_head.weight", "lm_head.weight"): ("lm_head", 0),
}


def test_split_dim_for_tc2_hf_and_mindformers_names():
    for names, (key, dim) in NAMES.items():
        for n in names:
            assert leaf_key(n) == key, n
            assert split_dim(n) == dim, n
            assert split_dim(n, "pp") is None
    specs = param_specs(CFG)
    assert {k for k, _ in NAMES.values()} == (set(specs) - {"layers"}) | set(specs["layers"][0])
    with pytest.raises(KeyError, match="not a TeleChat2 parameter"):
        leaf_key("transformer.h.0.self_attention.rotary.inv_freq")
    with pytest.raises(KeyError, match="no bias on query"):
        leaf_key("transformer.h.0.self_attention.query.bias")


def test_split_dim_agrees_with_the_slices():
    mesh = Mesh(tp=2)
    specs = tree_flatten_with_names(param_specs(CFG))
    sl = tree_flatten_with_names(param_slices(CFG, mesh, 1))
    for n, shard in sl.items():
        changed = [d for d, (a, b) in enumerate(zip(shard.shape, specs[n].shape)) if a != b]
        assert changed == ([] if split_dim(n) is None else [split_dim(n)]), n
