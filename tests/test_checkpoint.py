"""HF TeleChat2 directories: round trips, sharding, bf16/fp16 on disk, and every error case."""
import json
import os

import mindspore as ms
import numpy as np
import pytest

import tc2
from tc2.checkpoint.hf import INDEX, SINGLE, hf_shapes, load_hf, save_hf
from tc2.checkpoint.names import hf_name
from tc2.checkpoint.safetensors import bf16_bits_from_f32, f32_from_bf16_bits, write_safetensors
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
    from tc2.checkpoint.safetensors import read_header
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
    from tc2.checkpoint.safetensors import SafetensorsFile
    with SafetensorsFile(str(tmp_path / "x.safetensors")) as f:
        assert f.header["x"]["dtype"] == "BF16"
        np.testing.assert_allclose(f.get("x"), a, rtol=2 ** -8)


# ---- errors ----------------------------------------------------------------------------------

def _saved(params, tmp_path, **kw):
    path = tmp_path / "m"
    save_hf(params, CFG, path, **kw)
    return path


def _rewrite(path, drop=None, add=None, reshape=None):
    from tc2.checkpoint.safetensors import SafetensorsFile
    with SafetensorsFile(str(path / SINGLE)) as f:
        arrays = {n: f.get(n) for n in f.header}
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

    from tc2.checkpoint import hf as ck

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


# ---- peak memory: save_hf / load_hf of a ~330 MB checkpoint in a fresh process ----------------------
BIG = tc2.ModelConfig(vocab_size=32000, hidden_size=1024, n_layer=2, n_head=16, num_key_value_heads=4,
                      ffn_hidden_size=2048)
RSS_SCRIPT = """
import json, sys
from tc2.checkpoint.hf import hf_arrays, load_hf, save_hf
from tc2.checkpoint.safetensors import encode_tensor

def high_water():                 # this process's own peak RSS (bytes); ru_maxrss inherits the parent's
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024

def reset_high_water():           # Linux: VmHWM := current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

src, dest = sys.argv[1], sys.argv[2]
reset_high_water()
base = high_water()
params, cfg = load_hf(src)
out = {"load": high_water() - base}
for dtype in ("float32", "bfloat16"):
    reset_high_water()
    base = high_water()
    save_hf(params, cfg, dest + "-" + dtype, dtype=dtype)
    out["save " + dtype] = high_water() - base
reset_high_water()
base = high_water()
held = [encode_tensor(a, "float32") for _, a in hf_arrays(params, cfg)]    # what a non-streaming save holds
out["control"] = high_water() - base
print(json.dumps(out))
"""


def test_save_and_load_hold_one_tensor_at_a_time(tmp_path):
    """load_hf holds the params plus about one tensor (no memory map whose pages stay resident),
    save_hf about one tensor (header first, then tensor by tensor), whatever the dtype."""
    import subprocess
    import sys
    from safetensors.numpy import save_file
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError as e:
        pytest.skip(f"cannot reset the peak-RSS counter here ({e})")
    rng = np.random.default_rng(0)
    tensors = {n: rng.random(shape, dtype=np.float32) for n, (shape, _) in hf_shapes(BIG).items()}
    src = tmp_path / "big"
    src.mkdir()
    save_file(tensors, str(src / SINGLE), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(BIG.to_hf()))
    model, largest = sum(a.nbytes for a in tensors.values()), max(a.nbytes for a in tensors.values())
    del tensors
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(src), str(tmp_path / "out")],
                         env={**os.environ, "PYTHONPATH": root, "GLOG_v": "3"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    report = ", ".join(f"{k}: +{v / 1e6:.0f} MB" for k, v in peak.items())
    print(f"\nmodel {model / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB; {report}")
    assert peak["load"] <= model + largest + 100e6, report
    assert peak["save float32"] <= largest + 50e6 and peak["save bfloat16"] <= largest + 50e6, report
    assert peak["control"] > largest + 50e6, report          # the instrument sees a whole-model save
    assert load_hf(str(tmp_path / "out-float32"))[1] == BIG


# ---- the one safetensors reader / writer -------------------------------------------------------------

def test_written_files_match_the_safetensors_library_for_every_dtype(tmp_path):
    """write_safetensors (header first, tensor by tensor) read back by the reference library,
    and files the library writes read back by ours: values, dtypes, shapes and metadata."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    from tc2.checkpoint.safetensors import SafetensorsFile, encode_tensor
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    arrays = {"f32": x, "f16": x.astype(np.float16), "f64": x.astype(np.float64), "bf16": encode_tensor(x, "bfloat16"),
              "i32": rng.integers(-9, 9, (3, 4)).astype(np.int32), "i64": np.arange(6, dtype=np.int64),
              "u8": np.arange(4, dtype=np.uint8), "flag": np.array([True, False]),
              "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32)}
    ours = str(tmp_path / "ours.safetensors")
    write_safetensors(ours, arrays, metadata={"format": "tc2-test", "step": "7"})
    assert os.listdir(tmp_path) == ["ours.safetensors"]
    with safe_open(ours, framework="numpy") as f:
        assert f.metadata() == {"format": "tc2-test", "step": "7"}
        for n, a in arrays.items():
            got = f.get_tensor(n)
            if n == "bf16":           # the library gives no numpy bfloat16: compare the bits
                assert got.shape == a.shape
                continue
            assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a), n
    theirs = str(tmp_path / "theirs.safetensors")
    save_file({n: a for n, a in arrays.items() if n != "bf16"}, theirs, metadata={"k": "v"})
    for path in (ours, theirs):
        with SafetensorsFile(path) as f:
            for n in f.header:
                got, want = f.read(n), arrays[n]
                assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), n
            assert f.shape_dtype("i32") == ((3, 4), "int32")
    with SafetensorsFile(ours) as f:
        assert f.metadata["step"] == "7" and f.header["bf16"]["dtype"] == "BF16"
        np.testing.assert_array_equal(f.get("bf16"), f32_from_bf16_bits(arrays["bf16"]))


def test_writer_refuses_out_of_order_misshaped_and_missing_tensors(tmp_path):
    from tc2.checkpoint.safetensors import SafetensorsWriter
    path = str(tmp_path / "w.safetensors")
    entries = [("a", (2, 3), "float32"), ("b", (4,), "bfloat16")]
    with pytest.raises(ValueError, match="expected a, got b"):
        with SafetensorsWriter(path, entries) as w:
            w.write("b", np.zeros(4, np.float32), "float32")
    with pytest.raises(ValueError, match=r"tensor a has shape \(3, 2\), header says \(2, 3\)"):
        with SafetensorsWriter(path, entries) as w:
            w.write("a", np.zeros((3, 2), np.float32))
    with pytest.raises(RuntimeError, match="only 1/2 tensors written"):
        with SafetensorsWriter(path, entries) as w:
            w.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="dtype must be one of"):
        SafetensorsWriter(path, [("a", (2,), "float8")])


def test_header_entry_disagreeing_with_its_shape_is_corrupt(params, tmp_path):
    path = _saved(params, tmp_path)
    data = (path / SINGLE).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["transformer.ln_f.weight"]["shape"] = [CFG.hidden_size * 2]       # bytes for half of it
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (path / SINGLE).write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt .*transformer\.ln_f\.weight"):
        load_hf(str(path))


def test_failed_save_into_a_new_path_leaves_nothing(params, tmp_path):
    bad = dict(params)
    bad["ln_f"] = ms.Tensor(np.ones(CFG.hidden_size + 1, np.float32))
    with pytest.raises(ValueError, match="transformer.ln_f.weight"):
        save_hf(bad, CFG, tmp_path / "new", max_shard_size="60KB")
    assert os.listdir(tmp_path) == []


def test_write_hf_dir_follows_sizes_order_and_rejects_a_wrong_stream(params, tmp_path):
    from tc2.checkpoint import hf as ck
    pairs = list(ck.hf_arrays(params, CFG))[::-1]                        # any order, announced by sizes
    ck.write_hf_dir(iter(pairs), CFG, str(tmp_path / "rev"), sizes=[(n, a.nbytes) for n, a in pairs],
                    max_shard_size="60KB")
    _assert_same(params, load_hf(str(tmp_path / "rev"))[0])
    first, last = list(hf_shapes(CFG))[0], list(hf_shapes(CFG))[-1]
    with pytest.raises(ValueError, match=f"expected tensor {first} next, got {last}".replace(".", r"\.")):
        ck.write_hf_dir(iter(pairs), CFG, str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="expected tensor .* next, got the end of the tensors"):
        ck.write_hf_dir(iter(list(ck.hf_arrays(params, CFG))[:-1]), CFG, str(tmp_path / "bad"))
    assert sorted(os.listdir(tmp_path)) == ["rev"]


def test_a_shard_limit_above_the_model_size_writes_one_plain_file(params, tmp_path):
    """As HF's save_pretrained: one shard is model.safetensors, without an index."""
    save_hf(params, CFG, tmp_path / "m", max_shard_size="60KB")
    save_hf(params, CFG, tmp_path / "m", max_shard_size="10GB")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", SINGLE]
    _assert_same(params, load_hf(str(tmp_path / "m"))[0])


# ---- hostile or damaged files: each refused with the file and the tensor named -------------------------

def _raw_safetensors(path, entries, data, *, declared=None):
    """A safetensors file written byte by byte: entries {name: (dtype code, shape, [start, stop])}."""
    header = {n: {"dtype": d, "shape": list(s), "data_offsets": list(o)} for n, (d, s, o) in entries.items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    n = len(raw) if declared is None else declared
    path.write_bytes(n.to_bytes(8, "little") + raw + data)
    return str(path)


@pytest.mark.parametrize("entries,size,message", [
    ({"a": ("F32", (2,), (0, 8)), "b": ("F32", (2,), (0, 8))}, 8, r"tensor b overlaps the tensor before it"),
    ({"a": ("F32", (2,), (0, 8)), "b": ("F32", (2,), (4, 12))}, 12, r"tensor b overlaps"),
    ({"a": ("F32", (2,), (0, 8)), "b": ("F32", (1,), (12, 16))}, 16, r"tensor b starts at byte 12, leaving "
                                                                     r"bytes 8\.\.12 unused"),
    ({"a": ("F32", (2,), (0, 8))}, 12, r"4 bytes after the last tensor"),
    ({"a": ("F32", (2 ** 32, 2 ** 32, 4), (0, 0))}, 0, r"tensor a has 0 bytes for shape"),    # int64 overflow
    ({"a": ("F32", (2,), (0, 8)), "b": ("F32", (True,), (8, 12))}, 12, r"entry 'b'"),
])
def test_safetensors_byte_ranges_must_tile_the_data_block(tmp_path, entries, size, message):
    """What `safetensors.safe_open` refuses, ours refuses too, naming the file and the tensor."""
    from safetensors import safe_open
    from tc2.checkpoint.safetensors import SafetensorsFile
    path = _raw_safetensors(tmp_path / "x.safetensors", entries, bytes(range(size)))
    with pytest.raises(Exception):
        safe_open(path, framework="numpy")
    with pytest.raises(ValueError, match=r"x\.safetensors: corrupt safetensors (header|file) .*" + message):
        SafetensorsFile(path)


def test_safetensors_entries_in_any_order_and_duplicates(tmp_path):
    from tc2.checkpoint.safetensors import SafetensorsFile
    data = np.arange(4, dtype=np.float32).tobytes()
    path = _raw_safetensors(tmp_path / "x.safetensors", {"b": ("F32", (2,), (8, 16)), "a": ("F32", (2,), (0, 8))},
                            data)
    with SafetensorsFile(path) as f:                       # header order is free, the ranges tile
        assert f.read("a").tolist() == [0, 1] and f.read("b").tolist() == [2, 3]
    raw = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
    raw += b" " * (-len(raw) % 8)
    (tmp_path / "dup.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    with pytest.raises(ValueError, match=r"dup\.safetensors: corrupt safetensors header \(tensor 'a' is listed twice"):
        SafetensorsFile(str(tmp_path / "dup.safetensors"))


def test_enormous_declared_header_is_refused_before_reading(tmp_path, monkeypatch):
    from tc2.checkpoint import safetensors as st
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:                             # sparse: 150 MB on paper, nothing on disk
        f.write((120_000_000).to_bytes(8, "little"))
        f.truncate(150_000_000)
    reads = []
    real_loads = st.json.loads
    monkeypatch.setattr(st.json, "loads", lambda b, **kw: reads.append(len(b)) or real_loads(b, **kw))
    with pytest.raises(ValueError, match=r"big\.safetensors: corrupt safetensors header \(declared length "
                                         r"120000000 bytes is above the format's 100 MB limit"):
        st.SafetensorsFile(str(path))
    assert reads == []


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_, np.float64])
def test_load_hf_refuses_a_non_float_weight(params, tmp_path, dtype):
    from safetensors.numpy import save_file
    from tc2.checkpoint.safetensors import SafetensorsFile
    path = _saved(params, tmp_path)
    with SafetensorsFile(str(path / SINGLE)) as f:
        arrays = {n: f.get(n) for n in f.header}
    arrays["lm_head.weight"] = np.ones(arrays["lm_head.weight"].shape, dtype)
    save_file(arrays, str(path / SINGLE))
    code = {np.int64: "I64", np.int32: "I32", np.uint8: "U8", np.bool_: "BOOL", np.float64: "F64"}[dtype]
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor lm_head\.weight is stored as {code} "
                                         r"\(\w+\), not as a float weight"):
        load_hf(str(path))


def _index_pointing_at(path, target):
    index = json.loads((path / INDEX).read_text())
    name = "transformer.ln_f.weight"
    index["weight_map"][name] = target
    (path / INDEX).write_text(json.dumps(index))


def test_index_entries_must_stay_inside_the_checkpoint(params, tmp_path):
    path = _saved(params, tmp_path, max_shard_size="60KB")
    shard = json.loads((path / INDEX).read_text())["weight_map"]["transformer.ln_f.weight"]
    other = tmp_path / "other"
    other.mkdir()
    os.link(path / shard, other / "model.safetensors")          # a loadable file outside the directory
    os.symlink(other / "model.safetensors", path / "model-link.safetensors")
    for target in ("../other/model.safetensors", str(other / "model.safetensors"), "/etc/passwd",
                   "model-link.safetensors"):
        _index_pointing_at(path, target)
        with pytest.raises(ValueError, match=rf"{INDEX} lists shard '{target}', which is outside .*m: shards "
                                             r"must be files inside the checkpoint directory"):
            load_hf(str(path))
    os.symlink(path / shard, path / "model-inside.safetensors")   # a link within the directory is fine
    _index_pointing_at(path, "model-inside.safetensors")
    _assert_same(params, load_hf(str(path))[0])


@pytest.mark.parametrize("index,message", [
    ("[1, 2]", r"not a safetensors index \(no \"weight_map\" object\)"),
    ('{"weight_map": ["a"]}', r"not a safetensors index \(no \"weight_map\" object"),
    ('{"weight_map": {"lm_head.weight": 3}}', r"weight_map\['lm_head.weight'\] is 3, not a file name"),
    (b'{"weight_map": {"\xff": "a"}}', r"not a safetensors index \('utf-8' codec"),
])
def test_malformed_index_names_the_file(params, tmp_path, index, message):
    path = _saved(params, tmp_path, max_shard_size="60KB")
    (path / INDEX).write_bytes(index if isinstance(index, bytes) else index.encode())
    with pytest.raises(ValueError, match=rf"{INDEX}: {message}"):
        load_hf(str(path))
