"""HF TeleChat2 directories: round trips, sharding, bf16/fp16 on disk, and every error case."""
import json
import os

import mindspore as ms
import numpy as np
import pytest

import tc2
from tc2.checkpoint import INDEX, SINGLE, hf_name, hf_shapes, load_hf, save_hf
from tc2.safetensors_io import bf16_bits_from_f32, f32_from_bf16_bits, write_safetensors
from tc2.tree import tree_flatten_with_names, tree_leaves

CFG = tc2.tiny(n_layer=2)


@pytest.fixture(scope="module")
def params():
    return tc2.init_params(CFG, seed=11)


def _flat_np(params):
    return {k: v.asnumpy() for k, v in tree_flatten_with_names(params).items()}


def _assert_same(a, b):
    fa, fb = _flat_np(a), _flat_np(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def test_float32_round_trip_is_bit_exact(params, tmp_path):
    save_hf(params, CFG, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", SINGLE]
    loaded, cfg = load_hf(str(tmp_path / "m"))
    assert cfg == CFG
    _assert_same(params, loaded)


def test_official_names_and_config_keys(params, tmp_path):
    save_hf(params, CFG, tmp_path / "m")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m" / SINGLE), framework="numpy") as f:
        names = set(f.keys())
        kv = f.get_tensor("transformer.h.1.self_attention.key_value.weight")
    assert names == set(hf_shapes(CFG))
    for n in ["transformer.word_embeddings.weight", "transformer.h.0.input_layernorm.weight",
              "transformer.h.0.self_attention.query.weight", "transformer.h.0.self_attention.dense.bias",
              "transformer.h.0.post_attention_layernorm.weight", "transformer.h.0.mlp.gate_proj.weight",
              "transformer.h.0.mlp.up_proj.weight", "transformer.h.0.mlp.down_proj.weight",
              "transformer.h.0.mlp.down_proj.bias", "transformer.ln_f.weight", "lm_head.weight"]:
        assert n in names
    assert kv.shape == (2 * CFG.num_key_value_heads * CFG.head_dim, CFG.hidden_size)
    # the stored key_value is the tensor itself: interleaving is the model's convention, no reorder
    assert np.array_equal(kv, params["layers"][1]["key_value"].asnumpy())
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in ["hidden_size", "n_layer", "n_head", "num_key_value_heads", "ffn_hidden_size", "vocab_size",
                "layer_norm_epsilon", "training_seqlen", "base_seqlen", "seq_length", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "flash_attn"]:
        assert key in hf, key
    assert hf["model_type"] == "telechat" and hf["architectures"] == ["TelechatForCausalLM"]


def test_sharded_save_writes_an_index_and_loads_back(params, tmp_path):
    save_hf(params, CFG, tmp_path / "m", max_shard_size="60KB")
    files = sorted(os.listdir(tmp_path / "m"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and INDEX in files and SINGLE not in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "m" / INDEX).read_text())
    assert set(index["weight_map"]) == set(hf_shapes(CFG))
    assert index["metadata"]["total_size"] == 4 * tc2.count_params(CFG)
    loaded, _ = load_hf(str(tmp_path / "m"))
    _assert_same(params, loaded)
    # re-saving unsharded into the same dir removes the stale shards and index
    save_hf(params, CFG, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", SINGLE]


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 2.0 ** -8), ("float16", 2.0 ** -11)])
def test_half_precision_on_disk_within_rounding(params, tmp_path, dtype, tol):
    save_hf(params, CFG, tmp_path / "m", dtype=dtype)
    from tc2.safetensors_io import read_header
    header = read_header(str(tmp_path / "m" / SINGLE))
    assert {v["dtype"] for v in header.values()} == {"BF16" if dtype == "bfloat16" else "F16"}
    loaded, _ = load_hf(str(tmp_path / "m"))
    for a, b in zip(tree_leaves(params), tree_leaves(loaded)):
        a, b = a.asnumpy(), b.asnumpy()
        assert b.dtype == np.float32
        np.testing.assert_allclose(b, a, rtol=tol, atol=1e-7)


def test_bf16_conversion_rounds_to_nearest_even():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, np.inf, 3.0e38, 1e-40], np.float32)
    bits = bf16_bits_from_f32(x)
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even mantissa wins (1.0); 1 + 3*2^-8 rounds up
    np.testing.assert_array_equal(f32_from_bf16_bits(bits)[:4], [1.0, 1.0, 1.0 + 2 ** -6, -2.5])
    assert np.isinf(f32_from_bf16_bits(bits)[4])
    assert np.isnan(f32_from_bf16_bits(bf16_bits_from_f32(np.array([np.nan], np.float32))))[0]


def test_reads_bf16_written_by_mindspore(tmp_path):
    """A bf16 safetensors file written by MindSpore itself loads through our reader."""
    a = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    ms.save_checkpoint([{"name": "x", "data": ms.Tensor(a).astype(ms.bfloat16)}], str(tmp_path / "x.safetensors"),
                       format="safetensors")
    from tc2.safetensors_io import open_safetensors
    with open_safetensors(str(tmp_path / "x.safetensors")) as (header, get):
        assert header["x"]["dtype"] == "BF16"
        np.testing.assert_allclose(get("x"), a, rtol=2 ** -8)


# ---- errors ----------------------------------------------------------------------------------

def _saved(params, tmp_path, **kw):
    path = tmp_path / "m"
    save_hf(params, CFG, path, **kw)
    return path


def _rewrite(path, drop=None, add=None, reshape=None):
    from tc2.safetensors_io import open_safetensors
    with open_safetensors(str(path / SINGLE)) as (header, get):
        arrays = {n: get(n) for n in header}
    if drop:
        del arrays[drop]
    if add:
        arrays[add] = np.zeros(3, np.float32)
    if reshape:
        arrays[reshape] = arrays[reshape][:-1]
    write_safetensors(str(path / SINGLE), arrays)


@pytest.mark.parametrize("change,message", [
    (dict(drop="transformer.h.1.mlp.up_proj.weight"), "missing tensor transformer.h.1.mlp.up_proj.weight"),
    (dict(add="transformer.h.2.mlp.up_proj.weight"), "unexpected tensor transformer.h.2.mlp.up_proj.weight"),
    (dict(reshape="transformer.h.0.self_attention.key_value.weight"),
     "transformer.h.0.self_attention.key_value.weight has shape"),
])
def test_tensor_mismatches_name_the_tensor(params, tmp_path, change, message):
    path = _saved(params, tmp_path)
    _rewrite(path, **change)
    with pytest.raises((KeyError, ValueError), match=message.replace(".", r"\.")):
        load_hf(str(path))


def test_config_disagreeing_with_shapes_is_an_error(params, tmp_path):
    path = _saved(params, tmp_path)
    hf = json.loads((path / "config.json").read_text())
    hf["num_key_value_heads"] = CFG.n_head          # claims MHA, the file holds GQA key_value
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="key_value.weight has shape .* num_key_value_heads=4"):
        load_hf(str(path))


def test_missing_dir_missing_files_and_corrupt_files(params, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_hf(str(tmp_path / "nope"))
    path = _saved(params, tmp_path)
    os.remove(path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(str(path))
    path = _saved(params, tmp_path)
    data = (path / SINGLE).read_bytes()
    (path / SINGLE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_hf(str(path))
    (path / SINGLE).write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="corrupt"):
        load_hf(str(path))


def test_index_naming_a_missing_shard(params, tmp_path):
    path = _saved(params, tmp_path, max_shard_size="60KB")
    os.remove(path / "model-00002-of-{:05d}.safetensors".format(
        len([f for f in os.listdir(path) if f.startswith("model-")])))
    with pytest.raises(FileNotFoundError, match="model-00002-of"):
        load_hf(str(path))


def test_failed_save_leaves_existing_checkpoint_untouched(params, tmp_path):
    path = _saved(params, tmp_path)
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    bad = dict(params)
    bad["ln_f"] = ms.Tensor(np.ones(CFG.hidden_size + 1, np.float32))   # wrong shape: refused up front
    with pytest.raises(ValueError, match="transformer.ln_f.weight"):
        save_hf(bad, CFG, path)
    other = tc2.init_params(CFG, seed=99)

    class Boom(Exception):
        pass

    from tc2 import checkpoint as ck

    def exploding(params, cfg):                   # fails midway through writing the tensors
        for i, item in enumerate(ck.hf_arrays(params, cfg)):
            if i == 5:
                raise Boom()
            yield item
    with pytest.raises(Boom):
        ck.write_hf_dir(exploding(other, CFG), CFG, str(path))
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before


def test_names_helper():
    assert hf_name("layers.3.query") == "transformer.h.3.self_attention.query.weight"
    assert hf_name("word_embeddings") == "transformer.word_embeddings.weight"
    assert hf_name("lm_head") == "lm_head.weight"
