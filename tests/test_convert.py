"""Streaming conversions between HF, MindFormers and tc2 tensor-parallel checkpoints; verify.

Reference values come from elsewhere than the code under test: safetensors' and MindSpore's
own readers, MindSpore's casts for dtype rounding, numpy slicing for the Megatron split.
"""
import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import tc2
import tc2.checkpoint.convert as convert_mod
from tc2.checkpoint.hf import INDEX, hf_shapes, load_hf, save_hf
from tc2.config import ModelConfig, tiny
from tc2.checkpoint.convert import convert_checkpoint, open_checkpoint, verify_checkpoints
from tc2.model import param_specs
from tc2.tree import tree_flatten_with_names, tree_unflatten_from_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tiny()                               # GQA: 4 query heads, 2 KV heads, head_dim 16
HF_OF_TC2 = {"word_embeddings": "transformer.word_embeddings.weight", "ln_f": "transformer.ln_f.weight",
             "lm_head": "lm_head.weight"}
# tensor-parallel split dim, spelled out (Megatron: column-parallel rows, row-parallel columns)
TP_DIM = {"self_attention.query.weight": 0, "self_attention.key_value.weight": 0,
          "self_attention.dense.weight": 1, "mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0,
          "mlp.down_proj.weight": 1, "transformer.word_embeddings.weight": 0, "lm_head.weight": 0}


def expected_tp_dim(name):
    for suffix, d in TP_DIM.items():
        if name.endswith(suffix):
            return d
    return None


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(11)
    return {n: rng.standard_normal(s.shape).astype(np.float32)
            for n, s in tree_flatten_with_names(param_specs(CFG)).items()}


def as_tree(flat, cfg=CFG):
    return tree_unflatten_from_names(param_specs(cfg), {n: ms.Tensor(a) for n, a in flat.items()})


@pytest.fixture(scope="module")
def hf_dir(params, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "tiny")
    save_hf(as_tree(params), CFG, path)
    return path


@pytest.fixture(scope="module")
def hf_arrays(hf_dir):
    return load_file(os.path.join(hf_dir, "model.safetensors"))


def read_hf_dir(path):
    """{name: array} of an HF dir via the safetensors library, following the index if any."""
    if os.path.exists(os.path.join(path, INDEX)):
        files = sorted(set(json.load(open(os.path.join(path, INDEX)))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(path, f)))
    return out


def snapshot(path):
    """{relative path: bytes} of everything under `path` (None if it does not exist)."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return open(path, "rb").read()
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def test_hf_to_mf_to_hf_is_bit_exact_in_float32(hf_dir, hf_arrays, tmp_path):
    ckpt = str(tmp_path / "tiny.ckpt")
    convert_checkpoint(hf_dir, ckpt, to="mf", progress=False)
    back = str(tmp_path / "back")
    done = convert_checkpoint(ckpt, back, to="hf", config=hf_dir, progress=False)
    assert done.config == CFG and done.source_kind == "mindformers" and done.tensors == len(hf_arrays)
    got = read_hf_dir(back)
    assert set(got) == set(hf_arrays)
    for n, a in hf_arrays.items():
        assert got[n].dtype == np.float32 and got[n].tobytes() == a.tobytes(), n
    assert json.load(open(os.path.join(back, "config.json"))) == json.load(open(os.path.join(hf_dir, "config.json")))


@pytest.mark.parametrize("dtype,ms_dtype,code", [("bfloat16", ms.bfloat16, "BF16"), ("float16", ms.float16, "F16")])
def test_half_precision_round_trips_round_like_mindspore(hf_dir, hf_arrays, tmp_path, dtype, ms_dtype, code):
    ckpt = str(tmp_path / "half.ckpt")
    convert_checkpoint(hf_dir, ckpt, to="mf", dtype=dtype, progress=False)
    back = str(tmp_path / "back")
    convert_checkpoint(ckpt, back, to="hf", n_head=4, seq_length=64, progress=False)  # float32 again
    half = str(tmp_path / "half_hf")
    convert_checkpoint(hf_dir, half, to="hf", dtype=dtype, progress=False)
    with safe_open(os.path.join(half, "model.safetensors"), "numpy") as f:
        header_dtypes = {json.loads(open(os.path.join(half, "config.json")).read())["torch_dtype"]}
        assert header_dtypes == {dtype} and len(f.keys()) == len(hf_arrays)
    raw = open(os.path.join(half, "model.safetensors"), "rb").read()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {code}
    via_mf, via_hf = read_hf_dir(back), {n: t.asnumpy() for n, t in
                                         tree_flatten_with_names(load_hf(half)[0]).items()}
    tc2_of = {v: k for k, v in _hf_names().items()}
    for n, a in hf_arrays.items():
        want = ms.Tensor(a).astype(ms_dtype).astype(ms.float32).asnumpy()
        assert np.array_equal(via_mf[n], want), n
        assert np.array_equal(via_hf[tc2_of[n]], want), n


def _hf_names():
    from tc2.checkpoint.names import hf_name
    return {n: hf_name(n) for n in tree_flatten_with_names(param_specs(CFG))}


def test_sharded_output_loads_back_and_resharding_removes_stale_files(hf_dir, params, tmp_path):
    out = str(tmp_path / "sharded")
    convert_checkpoint(hf_dir, out, to="hf", max_shard_size="100KB", progress=False)
    index = json.load(open(os.path.join(out, INDEX)))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in params.values())
    for f in files:
        with safe_open(os.path.join(out, f), "numpy") as g:
            if len(list(g.keys())) > 1:                       # a lone big tensor may exceed the limit
                assert os.path.getsize(os.path.join(out, f)) <= 100_000 + 4096
    tree, cfg = load_hf(out)
    assert cfg == CFG
    for n, t in tree_flatten_with_names(tree).items():
        assert np.array_equal(t.asnumpy(), params[n]), n
    convert_checkpoint(hf_dir, out, to="hf", progress=False)                      # back to one file
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert load_hf(out)[1] == CFG


def test_streamed_safetensors_read_by_other_readers(hf_dir, hf_arrays, tmp_path):
    out = str(tmp_path / "copy")
    convert_checkpoint(hf_dir, out, to="hf", progress=False)
    ms_loaded = ms.load_checkpoint(os.path.join(out, "model.safetensors"), format="safetensors")
    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
        for n, a in hf_arrays.items():
            assert np.array_equal(f.get_tensor(n), a)
            assert np.array_equal(ms_loaded[n].asnumpy(), a)


def test_tp_split_holds_megatron_slices_and_merges_back(hf_dir, hf_arrays, tmp_path):
    tp_dir = str(tmp_path / "tp2")
    convert_checkpoint(hf_dir, tp_dir, to="tp", tp=2, progress=False)
    layout = json.load(open(os.path.join(tp_dir, "tp_layout.json")))
    assert layout["tp"] == 2 and layout["format"] == "tc2-tp"
    assert {n: t["split_dim"] for n, t in layout["tensors"].items()} == {n: expected_tp_dim(n) for n in hf_arrays}
    for r in range(2):
        shard = load_file(os.path.join(tp_dir, f"rank_{r}", "model.safetensors"))
        assert set(shard) == set(hf_arrays)
        for n, a in hf_arrays.items():
            d = expected_tp_dim(n)
            if d is None:
                want = a
            else:
                k = a.shape[d] // 2
                want = a[r * k:(r + 1) * k] if d == 0 else a[:, r * k:(r + 1) * k]
            assert np.array_equal(shard[n], want), (r, n)
    kv = load_file(os.path.join(tp_dir, "rank_1", "model.safetensors"))["transformer.h.0.self_attention.key_value.weight"]
    assert kv.shape == (2 * 16, 64)               # rank 1 holds KV head 1 whole: its k rows then its v rows
    merged = str(tmp_path / "merged")
    convert_checkpoint(tp_dir, merged, to="hf", progress=False)
    got = read_hf_dir(merged)
    assert all(got[n].tobytes() == a.tobytes() for n, a in hf_arrays.items())
    assert verify_checkpoints(tp_dir, hf_dir).ok


def test_tp_must_give_whole_heads(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="tp=4 does not divide num_key_value_heads=2"):
        convert_checkpoint(hf_dir, str(tmp_path / "tp4"), to="tp", tp=4, progress=False)
    with pytest.raises(ValueError, match="tp=3 does not divide n_head=4"):
        convert_checkpoint(hf_dir, str(tmp_path / "tp3"), to="tp", tp=3, progress=False)
    assert not os.listdir(tmp_path)


def test_tp_merge_detects_diverging_replicas(hf_dir, tmp_path):
    tp_dir = str(tmp_path / "tp2")
    convert_checkpoint(hf_dir, tp_dir, to="tp", tp=2, progress=False)
    path = os.path.join(tp_dir, "rank_1", "model.safetensors")
    shard = load_file(path)
    shard["transformer.ln_f.weight"] = shard["transformer.ln_f.weight"] + 1
    save_file(shard, path)
    with pytest.raises(ValueError, match="rank_1.*replicated tensor transformer.ln_f.weight differs"):
        convert_checkpoint(tp_dir, str(tmp_path / "merged"), to="hf", progress=False)


def test_training_checkpoint_export_takes_only_the_weights(hf_dir, hf_arrays, tmp_path):
    train = str(tmp_path / "step_000010")
    shutil.copytree(hf_dir, train)
    save_file({"adam_m.lm_head": np.zeros((4, 4), np.float32)}, os.path.join(train, "optimizer.safetensors"))
    json.dump({"step": 10}, open(os.path.join(train, "state.json"), "w"))
    out = str(tmp_path / "export")
    convert_checkpoint(train, out, to="hf", dtype="bfloat16", max_shard_size="200KB", expect=("hf",),
                       progress=False)
    assert not {"optimizer.safetensors", "state.json"} & set(os.listdir(out))
    got = {n: t.asnumpy() for n, t in tree_flatten_with_names(load_hf(out)[0]).items()}
    for tc2_name, hf in _hf_names().items():
        assert np.array_equal(got[tc2_name], ms.Tensor(hf_arrays[hf]).astype(ms.bfloat16).astype(ms.float32).asnumpy())


def test_verify_reports_exact_differences_and_missing_names(hf_dir, hf_arrays, tmp_path):
    ckpt = str(tmp_path / "same.ckpt")
    convert_checkpoint(hf_dir, ckpt, to="mf", progress=False)
    assert verify_checkpoints(hf_dir, ckpt, n_head=4).ok                            # HF vs MF: exact

    changed = dict(hf_arrays)
    name = "transformer.h.1.mlp.down_proj.weight"
    changed[name] = changed[name].copy()
    changed[name][3, 5] += np.float32(0.25)
    other = str(tmp_path / "changed")
    shutil.copytree(hf_dir, other)
    save_file(changed, os.path.join(other, "model.safetensors"))
    report = verify_checkpoints(hf_dir, other)
    delta = abs(float(changed[name][3, 5]) - float(hf_arrays[name][3, 5]))
    assert not report.ok and report.mismatched == [name] and report.diffs[name] == delta
    assert all(d == 0 for n, d in report.diffs.items() if n != name)
    assert verify_checkpoints(hf_dir, other, atol=0.25 + 1e-6).ok

    short = str(tmp_path / "one_layer")
    one = tiny(n_layer=1)
    save_hf(as_tree({n: a for n, a in _flat_from_hf(hf_arrays).items() if not n.startswith("layers.1.")}, one),
            one, short)
    report = verify_checkpoints(hf_dir, short)
    assert not report.ok and len(report.missing) == 10 and all(n.startswith("transformer.h.1.") for n in report.missing)
    assert report.extra == [] and "missing from" in "\n".join(report.lines())


def _flat_from_hf(hf_arrays):
    return {tc2: hf_arrays[hf] for tc2, hf in _hf_names().items()}


def test_nan_and_inf_compare_by_position():
    a = np.array([1.0, np.nan, np.inf, 2.0], np.float32)
    assert convert_mod.max_abs_diff(a, "float32", a.copy(), "float32") == 0.0
    b = a.copy()
    b[1] = 0.0
    assert convert_mod.max_abs_diff(a, "float32", b, "float32") == np.inf


def test_bad_source_leaves_destination_untouched(hf_dir, tmp_path):
    cut = str(tmp_path / "cut")
    shutil.copytree(hf_dir, cut)
    path = os.path.join(cut, "model.safetensors")
    open(path, "r+b").truncate(os.path.getsize(path) - 100)
    existing = str(tmp_path / "existing")
    convert_checkpoint(hf_dir, existing, to="hf", max_shard_size="100KB", progress=False)
    before = snapshot(existing)
    for to, dest in (("hf", existing), ("hf", str(tmp_path / "new")), ("tp", str(tmp_path / "new_tp")),
                     ("mf", str(tmp_path / "new.ckpt"))):
        with pytest.raises(ValueError, match=r"cut/model\.safetensors: truncated"):
            convert_checkpoint(cut, dest, to=to, tp=2, progress=False)
    assert snapshot(existing) == before
    assert sorted(os.listdir(tmp_path)) == ["cut", "existing"]


@pytest.mark.parametrize("to,dest", [("hf", "existing"), ("hf", "new"), ("tp", "existing"), ("tp", "new"),
                                     ("mf", "old.ckpt"), ("mf", "new.ckpt")])
def test_failure_mid_stream_leaves_destination_untouched(hf_dir, tmp_path, monkeypatch, to, dest):
    existing = str(tmp_path / "existing")
    convert_checkpoint(hf_dir, existing, to="hf", max_shard_size="100KB", progress=False)
    (tmp_path / "old.ckpt").write_bytes(b"an older conversion")
    before = {p: snapshot(str(tmp_path / p)) for p in os.listdir(tmp_path)}
    real_read, calls = convert_mod.HFCheckpoint.read, []

    def failing_read(self, name):
        calls.append(name)
        if len(calls) == 6:
            raise OSError("disk went away")
        return real_read(self, name)

    monkeypatch.setattr(convert_mod.HFCheckpoint, "read", failing_read)
    with pytest.raises(OSError, match="disk went away"):
        convert_checkpoint(hf_dir, str(tmp_path / dest), to=to, tp=2, max_shard_size="100KB", progress=False)
    assert {p: snapshot(str(tmp_path / p)) for p in os.listdir(tmp_path)} == before


def test_wrong_source_kind_and_in_place_are_refused(hf_dir, tmp_path):
    ckpt = str(tmp_path / "a.ckpt")
    convert_checkpoint(hf_dir, ckpt, to="mf", progress=False)
    with pytest.raises(ValueError, match="is a mindformers checkpoint; this conversion reads hf"):
        convert_checkpoint(ckpt, str(tmp_path / "b.ckpt"), to="mf", expect=("hf",), n_head=4, progress=False)
    with pytest.raises(ValueError, match="is the source"):
        convert_checkpoint(hf_dir, hf_dir, to="hf", progress=False)
    with pytest.raises(ValueError, match="should end with .ckpt"):
        convert_checkpoint(hf_dir, str(tmp_path / "x"), to="mf", progress=False)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        open_checkpoint(str(tmp_path / "empty"))


def _recipe():
    spec = importlib.util.spec_from_file_location("recipe_convert", os.path.join(ROOT, "recipes", "convert.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_subcommands(hf_dir, tmp_path, capsys):
    main = _recipe().main
    ckpt, back = str(tmp_path / "m.ckpt"), str(tmp_path / "back")
    assert main(["hf-to-mf", hf_dir, ckpt, "--dtype", "float32"]) == 0
    assert "MB/s" in capsys.readouterr().err
    assert main(["mf-to-hf", ckpt, back]) == 2
    assert "--n_head" in capsys.readouterr().err
    assert main(["mf-to-hf", ckpt, back, "--n_head", "4", "--seq_length", "64", "--max_shard_size", "150KB",
                 "--no_progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["split", back, str(tmp_path / "tp"), "--tp", "2", "--no_progress"]) == 0
    assert main(["merge", str(tmp_path / "tp"), str(tmp_path / "merged"), "--no_progress"]) == 0
    assert main(["merge", hf_dir, str(tmp_path / "nope"), "--no_progress"]) == 2
    capsys.readouterr()
    assert main(["verify", hf_dir, str(tmp_path / "merged")]) == 0
    assert main(["verify", hf_dir, ckpt, "--n_head", "4", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("OK: 23 tensors")
    assert main(["tc2-to-hf", hf_dir, str(tmp_path / "half")]) == 2          # no state.json: not a train ckpt
    assert "state.json" in capsys.readouterr().err
    assert main(["hf-to-mf", hf_dir, str(tmp_path / "h.ckpt"), "--dtype", "float16", "--no_progress"]) == 0
    assert main(["verify", hf_dir, str(tmp_path / "h.ckpt"), "--n_head", "4"]) == 1
    assert main(["verify", hf_dir, str(tmp_path / "h.ckpt"), "--n_head", "4", "--atol", "0.01"]) == 0


def test_recipe_exports_the_newest_complete_training_checkpoint(params, tmp_path, capsys):
    from tc2.optim import adamw
    from tc2.step import init_train_state
    from tc2.train.checkpoints import save_checkpoint
    run = str(tmp_path / "run")
    for step, scale in ((10, 1.0), (20, 2.0)):
        state = init_train_state(as_tree({n: a * scale for n, a in params.items()}), adamw(), step=step)
        save_checkpoint(run, state, CFG)
    newest = os.path.join(run, "step_00000020", "model.safetensors")
    open(newest, "r+b").truncate(os.path.getsize(newest) - 10)                # step 20 is damaged
    main = _recipe().main
    assert main(["tc2-to-hf", run, str(tmp_path / "export"), "--dtype", "bfloat16", "--no_progress"]) == 0
    assert "step_00000010" in capsys.readouterr().out
    got = {n: t.asnumpy() for n, t in tree_flatten_with_names(load_hf(str(tmp_path / "export"))[0]).items()}
    for n, a in params.items():
        assert np.array_equal(got[n], ms.Tensor(a).astype(ms.bfloat16).astype(ms.float32).asnumpy()), n
    assert main(["tc2-to-hf", os.path.join(run, "step_00000020"), str(tmp_path / "bad")]) == 2
    assert "truncated or modified" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad")


# ---- peak memory: a ~330 MB checkpoint converted in a fresh process -------------------------------------
BIG = ModelConfig(vocab_size=32000, hidden_size=1024, n_layer=2, n_head=16, num_key_value_heads=4,
                  ffn_hidden_size=2048)
RSS_SCRIPT = """
import json, resource, sys
from tc2.checkpoint.convert import convert_checkpoint

def high_water_kb():
    # getrusage's ru_maxrss of a child starts at its parent's high-water mark (Linux keeps it
    # across fork/exec), which would hide anything below the pytest process's size; VmHWM is
    # this process image's own peak.
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])

base, base_rusage = high_water_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kw = json.loads(sys.argv[3])
if kw.pop("control", False):        # holds every tensor: what the limit must catch
    from tc2.checkpoint.convert import open_checkpoint
    with open_checkpoint(sys.argv[1]) as ck:
        held = [ck.read(n) for n in ck.tensors]
else:
    convert_checkpoint(sys.argv[1], sys.argv[2], progress=False, **kw)
print(json.dumps({"base_kb": base, "peak_kb": high_water_kb(), "base_rusage_kb": base_rusage,
                  "peak_rusage_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.fixture(scope="module")
def big_hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    from tc2.checkpoint.hf import hf_shapes
    tensors = {n: rng.random(shape, dtype=np.float32) for n, (shape, _) in hf_shapes(BIG).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    json.dump(BIG.to_hf(), open(path / "config.json", "w"))
    largest = max(a.nbytes for a in tensors.values())
    del tensors
    yield str(path), largest
    shutil.rmtree(path, ignore_errors=True)


def _peak_increase(src, dest, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT, "GLOG_v": "3"}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, src, dest, json.dumps(kw)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return (r["peak_kb"] - r["base_kb"]) * 1024


def test_peak_memory_of_streaming_conversions(big_hf_dir, tmp_path):
    src, largest = big_hf_dir
    size = os.path.getsize(os.path.join(src, "model.safetensors"))
    assert size > 300e6
    limit = 1.5 * largest + 100e6
    ckpt = str(tmp_path / "big.ckpt")
    measured = {
        "hf-to-mf float32": _peak_increase(src, ckpt, to="mf"),
        "mf-to-hf float32, one file": _peak_increase(ckpt, str(tmp_path / "hf"), to="hf", config=src),
        "hf-to-hf bfloat16, 100MB shards": _peak_increase(src, str(tmp_path / "bf16"), to="hf", dtype="bfloat16",
                                                          max_shard_size="100MB"),
        "split tp=2": _peak_increase(src, str(tmp_path / "tp"), to="tp", tp=2),
    }
    report = ", ".join(f"{k}: +{v / 1e6:.0f} MB" for k, v in measured.items())
    print(f"\ncheckpoint {size / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB, limit +{limit / 1e6:.0f} MB; "
          + report)
    assert all(v <= limit for v in measured.values()), report
    assert _peak_increase(src, "", control=True) > size        # the instrument sees a non-streaming reader
    assert verify_checkpoints(src, str(tmp_path / "hf")).ok


def test_parse_size_accepts_units_and_refuses_anything_else():
    from tc2.checkpoint.safetensors import parse_size
    assert [parse_size(v) for v in (None, 1000, "5GB", "500mb", " 2 GiB", "1.5KB", "7")] == \
        [None, 1000, 5 * 10**9, 500 * 10**6, 2 * 2**30, 1500, 7]
    for bad in ("five", "", "GB", "-5GB", "0", "nan", "infGB", "5 parsecs", True, 0, -3, 2.5, [5]):
        with pytest.raises(ValueError, match=r"max_shard_size: cannot read .* as a size \(a positive number"):
            parse_size(bad)


def test_recipe_refuses_a_bad_shard_size_before_writing(hf_dir, tmp_path, capsys):
    ckpt = str(tmp_path / "m.ckpt")
    convert_checkpoint(hf_dir, ckpt, to="mf", progress=False)
    assert _recipe().main(["mf-to-hf", ckpt, str(tmp_path / "out"), "--config", hf_dir,
                           "--max_shard_size", "five", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: max_shard_size: cannot read 'five' as a size (a positive number of bytes, or " \
                          "one with a unit: 5GB, 500MB, 2GiB)"
    assert sorted(os.listdir(tmp_path)) == ["m.ckpt"]


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(tp=0), r'"tp" must be a positive int, got 0'),
    (lambda d: d.update(tp="2"), r'"tp" must be a positive int, got \'2\''),
    (lambda d: d.update(tensors=[1]), r'no "tensors" object'),
    (lambda d: d["tensors"]["lm_head.weight"].update(split_dim=5), r"tensor lm_head\.weight: "),
    (lambda d: d["tensors"]["lm_head.weight"].update(shape="512x64"), r"tensor lm_head\.weight: "),
])
def test_malformed_tp_layout_names_the_file(hf_dir, tmp_path, change, message):
    tp_dir = str(tmp_path / "tp2")
    convert_checkpoint(hf_dir, tp_dir, to="tp", tp=2, progress=False)
    layout_path = os.path.join(tp_dir, "tp_layout.json")
    doc = json.load(open(layout_path))
    change(doc)
    json.dump(doc, open(layout_path, "w"))
    with pytest.raises(ValueError, match=r"tp_layout\.json: not a tc2 tensor-parallel layout \(" + message):
        convert_checkpoint(tp_dir, str(tmp_path / "merged"), to="hf", progress=False)
    assert not os.path.exists(tmp_path / "merged")


# ---- a full disk, a read-only directory, a killed writer ----------------------------------------------
class _FullDisk:
    """A file object whose writes fail once `room` bytes are written, as on a full disk: the
    OSError of write() names no file."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, data):
        self._room -= memoryview(data).nbytes
        if self._room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _failing_open(mode_of_failure, room=50_000):
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" not in mode:
            return real_open(path, mode, *args, **kwargs)
        if mode_of_failure == "read-only":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return _FullDisk(real_open(path, mode, *args, **kwargs), room)
    return fake_open


@pytest.mark.parametrize("failure", ["full disk", "read-only"])
@pytest.mark.parametrize("command,dest,written", [
    ("mf-to-hf", "existing", "model.safetensors"), ("mf-to-hf", "new/dir", "model.safetensors"),
    ("hf-to-mf", "new/dir/m.ckpt", "m.ckpt"), ("split", "existing", "rank_0/model.safetensors")])
def test_unwritable_destination_is_one_line_naming_the_file(hf_dir, tmp_path, monkeypatch, capsys, failure,
                                                           command, dest, written):
    """Tests run as root, where chmod does not stop writes: the writers' open() is made to fail as
    a full disk (ENOSPC from write(), no file name) or a read-only filesystem (EROFS) would."""
    from tc2 import files
    from tc2.checkpoint import ms_ckpt, safetensors
    src = str(tmp_path / "m.ckpt") if command == "mf-to-hf" else hf_dir
    convert_checkpoint(hf_dir, str(tmp_path / "m.ckpt"), to="mf", progress=False)
    convert_checkpoint(hf_dir, str(tmp_path / "existing"), to="hf", max_shard_size="100KB", progress=False)
    before = snapshot(str(tmp_path))
    for module in (safetensors, ms_ckpt, files):
        monkeypatch.setattr(module, "open", _failing_open(failure), raising=False)
    args = [command, src, str(tmp_path / dest), "--config", hf_dir, "--no_progress"]
    assert _recipe().main(args + (["--tp", "2"] if command == "split" else [])) == 2
    err = capsys.readouterr().err.strip()
    why = "No space left on device" if failure == "full disk" else "Read-only file system"
    target = str(tmp_path / dest) if dest.endswith(".ckpt") else os.path.join(str(tmp_path / dest), written)
    assert err == f"error: [Errno {errno.ENOSPC if failure == 'full disk' else errno.EROFS}] {why}: '{target}'"
    assert snapshot(str(tmp_path)) == before                        # nothing new, nothing half-written


def test_mf_to_hf_never_invents_sequence_lengths(hf_dir, tmp_path, capsys):
    """The weights do not tell seq_length / training_seqlen / base_seqlen (where dynamic NTK and
    mscale start): a non-release size takes them from the yaml, the config or --seq_length, or the
    conversion is refused; a release hidden size keeps its release's lengths."""
    main = _recipe().main
    ckpt = str(tmp_path / "m.ckpt")
    convert_checkpoint(hf_dir, ckpt, to="mf", progress=False)
    for args in (["mf-to-hf", ckpt, str(tmp_path / "a"), "--n_head", "4"],
                 ["split", ckpt, str(tmp_path / "b"), "--n_head", "4", "--tp", "2"]):
        assert main(args + ["--no_progress"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: {ckpt}: hidden size 64 is no TeleChat2 release, so the weights do not tell seq_length, "
            f"training_seqlen, base_seqlen (where dynamic NTK and mscale start) for the config.json this writes: "
            f"pass the run's MindFormers yaml (mf_yaml=, --mf_yaml), an HF config.json (config=, --config) or the "
            f"length (seq_length=, --seq_length N)")
    assert sorted(os.listdir(tmp_path)) == ["m.ckpt"]
    assert main(["mf-to-hf", ckpt, str(tmp_path / "c"), "--n_head", "4", "--seq_length", "640", "--no_progress"]) == 0
    written = json.load(open(tmp_path / "c" / "config.json"))
    assert (written["seq_length"], written["training_seqlen"], written["base_seqlen"]) == (640, 640, 640)
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("model:\n  model_config:\n    num_heads: 4\n    seq_length: 96\n")
    assert main(["mf-to-hf", ckpt, str(tmp_path / "d"), "--mf_yaml", str(yaml_path), "--no_progress"]) == 0
    assert json.load(open(tmp_path / "d" / "config.json"))["training_seqlen"] == 96
    assert main(["mf-to-hf", ckpt, str(tmp_path / "e"), "--config", hf_dir, "--no_progress"]) == 0
    assert json.load(open(tmp_path / "e" / "config.json"))["base_seqlen"] == CFG.base_seqlen == 64
    assert main(["mf-to-hf", ckpt, str(tmp_path / "f"), "--config", hf_dir, "--seq_length", "65", "--no_progress"]) == 2
    assert "seq_length=65 disagrees with the config's 64" in capsys.readouterr().err
    assert main(["verify", hf_dir, ckpt, "--n_head", "4", "--quiet"]) == 0       # writes no config: no lengths needed


def test_release_sizes_keep_their_lengths_without_a_config(tmp_path):
    """A hidden size of a release (here 4096, the 7B's) brings the release's lengths and epsilon."""
    from tc2.checkpoint.mindformers import resolve_config
    cfg = tc2.telechat2_7b(n_layer=1, vocab_size=256)
    shapes = {n: s for n, (s, _) in hf_shapes(cfg).items()}
    got, unknown = resolve_config(shapes, "x")
    assert unknown == () and (got.seq_length, got.training_seqlen, got.base_seqlen) == (8192, 8192, 8192)
    small = tiny()
    got, unknown = resolve_config({n: s for n, (s, _) in hf_shapes(small).items()}, "x", n_head=4)
    assert unknown == ("seq_length", "training_seqlen", "base_seqlen")
