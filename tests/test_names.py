"""The one tensor-name table: tc2, HF and MindFormers spellings of every parameter."""
import pytest

from tc2.checkpoint.hf import hf_shapes
from tc2.checkpoint.names import hf_from_mf, hf_layer, hf_name, leaf_key, mf_name, tc2_from_hf
from tc2.config import tiny

CFG = tiny(n_layer=12)


def test_every_spelling_round_trips_and_names_its_leaf():
    for hf, (_, tc2) in hf_shapes(CFG).items():
        assert tc2_from_hf(hf) == tc2 and hf_name(tc2) == hf
        assert hf_from_mf(mf_name(hf)) == hf
        key = tc2.split(".")[-1]
        assert leaf_key(tc2) == leaf_key(hf) == leaf_key(mf_name(hf)) == key
        assert hf_layer(hf) == (int(tc2.split(".")[1]) if tc2.startswith("layers.") else None)


def test_spelled_out_examples():
    assert tc2_from_hf("transformer.h.11.mlp.down_proj.bias") == "layers.11.down_proj_bias"
    assert mf_name("transformer.word_embeddings.weight") == "model.tok_embeddings.embedding_weight"
    assert hf_from_mf("model.layers.3.feed_forward.w3.weight") == "transformer.h.3.mlp.up_proj.weight"
    assert hf_layer("transformer.h.7.anything") == 7 and hf_layer("lm_head.weight") is None


def test_leaf_key_reads_through_a_prefix_but_not_a_wrong_suffix():
    assert leaf_key("adam_m.model.layers.0.attention.wq.weight") == "query"          # MF optimizer moment
    assert leaf_key("mu.layers.0.down_proj_bias") == "down_proj_bias"                 # tc2 optimizer moment
    with pytest.raises(KeyError, match="not a TeleChat2 parameter"):
        leaf_key("transformer.h.0.self_attention.dense.scale")
    with pytest.raises(KeyError, match="no bias on gate_proj"):
        leaf_key("model.layers.0.feed_forward.w1.bias")


def test_unknown_names_raise_or_give_none():
    for bad in ("layers.0.rotary", "layers.x.query", "foo"):
        with pytest.raises(KeyError, match="not a TeleChat2 tc2 parameter name"):
            hf_name(bad)
    with pytest.raises(KeyError, match="not a TeleChat2 HF tensor name"):
        tc2_from_hf("model.layers.0.attention.wq.weight")
    assert hf_from_mf("transformer.h.0.self_attention.query.weight") is None
