"""MindFormers .ckpt I/O and per-rank merging, checked against MindSpore's own reader/writer.

Oracles are independent of the code under test: MF names and shapes are spelled out from
spec §4, per-rank files are cut by hand with numpy (the MindFormers shard strategies: wq /
wk_v / w1 / w3 rows, wo / w2 columns, vocab rows or replicated) and written with
`ms.save_checkpoint`, and dtype rounding is compared with MindSpore's cast.
"""
import os

import mindspore as ms
import numpy as np
import pytest

import mindspore.train.serialization as ms_serialization
from tc2.checkpoint.hf import hf_shapes
from tc2.config import tiny
from tc2.checkpoint.mindformers import load_mindformers, rank_ckpt_files, save_mindformers
from tc2.checkpoint.names import hf_from_mf, mf_name
from tc2.model import jit_forward, param_specs
from tc2.checkpoint.ms_ckpt import CkptFile, write_ckpt
from tc2.tree import tree_flatten_with_names, tree_unflatten_from_names

CFG = tiny()                       # 2 layers, hidden 64, 4 heads, 2 KV heads (GQA), ffn 176, vocab 512
MF_OF_TC2 = {"input_layernorm": "attention_norm.weight", "query": "attention.wq.weight",
             "key_value": "attention.wk_v.weight", "dense": "attention.wo.weight",
             "dense_bias": "attention.wo.bias", "post_attention_layernorm": "ffn_norm.weight",
             "gate_proj": "feed_forward.w1.weight", "up_proj": "feed_forward.w3.weight",
             "down_proj": "feed_forward.w2.weight", "down_proj_bias": "feed_forward.w2.bias"}


def spec_mf_names(cfg):
    """{MF name: (shape, tc2 name)} as spec §4 spells them."""
    H, V, F, D = cfg.hidden_size, cfg.vocab_size, cfg.ffn_hidden_size, cfg.head_dim
    shapes = {"attention_norm.weight": (H,), "attention.wq.weight": (H, H),
              "attention.wk_v.weight": (2 * cfg.num_key_value_heads * D, H), "attention.wo.weight": (H, H),
              "attention.wo.bias": (H,), "ffn_norm.weight": (H,), "feed_forward.w1.weight": (F, H),
              "feed_forward.w3.weight": (F, H), "feed_forward.w2.weight": (H, F), "feed_forward.w2.bias": (H,)}
    out = {"model.tok_embeddings.embedding_weight": ((V, H), "word_embeddings"),
           "model.norm_out.weight": ((H,), "ln_f"), "lm_head.weight": ((V, H), "lm_head")}
    for i in range(cfg.n_layer):
        for key, mf in MF_OF_TC2.items():
            out[f"model.layers.{i}.{mf}"] = (shapes[mf], f"layers.{i}.{key}")
    return out


@pytest.fixture(scope="module")
def params():
    """Every leaf random (norms and biases too, so a swapped tensor cannot go unnoticed)."""
    rng = np.random.default_rng(7)
    flat = {n: rng.standard_normal(s.shape).astype(np.float32)
            for n, s in tree_flatten_with_names(param_specs(CFG)).items()}
    return flat


def as_tree(flat):
    return tree_unflatten_from_names(param_specs(CFG), {n: ms.Tensor(a) for n, a in flat.items()})


def assert_same_params(tree, flat):
    got = {n: t.asnumpy() for n, t in tree_flatten_with_names(tree).items()}
    assert set(got) == set(flat)
    for n in flat:
        assert got[n].dtype == np.float32 and np.array_equal(got[n], flat[n]), n


def test_names_round_trip_for_every_tensor():
    for hf in hf_shapes(CFG.replace(n_layer=12)):
        assert hf_from_mf(mf_name(hf)) == hf
    assert hf_from_mf("adam_m.model.layers.0.attention.wq.weight") is None
    assert hf_from_mf("global_step") is None
    with pytest.raises(KeyError, match="not a TeleChat2 HF tensor name"):
        mf_name("transformer.h.0.self_attention.rotary.inv_freq")


def test_save_writes_spec_names_readable_by_mindspore(params, tmp_path):
    path = str(tmp_path / "tiny.ckpt")
    save_mindformers(as_tree(params), CFG, path)
    loaded = ms.load_checkpoint(path)                                  # MindSpore's own reader
    expected = spec_mf_names(CFG)
    assert set(loaded) == set(expected)
    assert loaded["model.layers.1.attention.wk_v.weight"].shape == (2 * 2 * 16, 64)   # GQA: 2 KV heads
    for name, (shape, tc2_name) in expected.items():
        got = loaded[name].asnumpy()
        assert got.shape == shape and got.dtype == np.float32, name
        assert np.array_equal(got, params[tc2_name]), name


def test_load_reads_mindspore_written_files_with_split_records_and_extras(params, tmp_path, monkeypatch):
    """ms.save_checkpoint cuts big tensors into several records (here: above 1 KB) and MF
    training checkpoints carry optimizer state and counters: all of it must be handled."""
    monkeypatch.setattr(ms_serialization, "SLICE_SIZE", 1)
    items = [{"name": mf, "data": ms.Tensor(params[tc2])} for mf, (_, tc2) in spec_mf_names(CFG).items()]
    items += [{"name": "adam_m." + it["name"], "data": ms.Tensor(np.zeros(it["data"].shape, np.float32))}
              for it in items[:3]]
    items += [{"name": "global_step", "data": ms.Tensor(np.array([42], np.int32))}]
    path = str(tmp_path / "ms_written.ckpt")
    ms.save_checkpoint(items, path)
    chunks = {t: len(e[2]) for t, e in CkptFile(path).entries.items()}
    assert chunks["model.tok_embeddings.embedding_weight"] > 1          # the split path is exercised
    tree, cfg = load_mindformers(path, n_head=4)
    assert_same_params(tree, params)
    assert (cfg.hidden_size, cfg.n_layer, cfg.n_head, cfg.num_key_value_heads, cfg.ffn_hidden_size,
            cfg.vocab_size) == (64, 2, 4, 2, 176, 512)


@pytest.mark.parametrize("dtype,ms_dtype", [("bfloat16", ms.bfloat16), ("float16", ms.float16)])
def test_half_precision_save_rounds_like_mindspore(params, tmp_path, dtype, ms_dtype):
    path = str(tmp_path / f"{dtype}.ckpt")
    save_mindformers(as_tree(params), CFG, path, dtype=dtype)
    loaded = ms.load_checkpoint(path)
    tree, _ = load_mindformers(path, n_head=4)
    got = {n: t.asnumpy() for n, t in tree_flatten_with_names(tree).items()}
    for name, (_, tc2_name) in spec_mf_names(CFG).items():
        assert loaded[name].dtype == ms_dtype, name
        want = ms.Tensor(params[tc2_name]).astype(ms_dtype).astype(ms.float32).asnumpy()
        assert np.array_equal(loaded[name].astype(ms.float32).asnumpy(), want), name
        assert np.array_equal(got[tc2_name], want), name


def _mf_rank_files(root, params, *, tp, vocab_split, pp=1, dp=1, extra=True):
    """A MindFormers parallel run's rank_*/ files, cut by hand (ranks: tp fastest, then dp, pp)."""
    stage_of_layer = {i: i * pp // CFG.n_layer for i in range(CFG.n_layer)}
    for p in range(pp):
        for d in range(dp):
            for t in range(tp):
                rank = (p * dp + d) * tp + t
                items = []
                for mf, (_, tc2) in spec_mf_names(CFG).items():
                    a = params[tc2]
                    layer = int(mf.split(".")[2]) if mf.startswith("model.layers.") else None
                    stage = (stage_of_layer[layer] if layer is not None else
                             0 if "tok_embeddings" in mf else pp - 1)
                    if stage != p:
                        continue
                    rows = a.shape[0] // tp
                    if any(k in mf for k in ("wq.", "wk_v.", "w1.", "w3.")) or (
                            vocab_split and ("tok_embeddings" in mf or mf == "lm_head.weight")):
                        a = a[t * rows:(t + 1) * rows]
                    elif mf.endswith(("wo.weight", "w2.weight")):
                        cols = a.shape[1] // tp
                        a = a[:, t * cols:(t + 1) * cols]
                    items.append({"name": mf, "data": ms.Tensor(np.ascontiguousarray(a))})
                if extra:
                    items.append({"name": "adam_v." + items[0]["name"], "data": items[0]["data"]})
                    items.append({"name": "epoch_num", "data": ms.Tensor(np.array([1], np.int32))})
                os.makedirs(os.path.join(root, f"rank_{rank}"))
                ms.save_checkpoint(items, os.path.join(root, f"rank_{rank}", f"telechat_rank_{rank}-1_2.ckpt"))
    return root


@pytest.mark.parametrize("layout", [dict(tp=2, vocab_split=False), dict(tp=2, vocab_split=True),
                                    dict(tp=2, vocab_split=True, pp=2), dict(tp=2, vocab_split=False, dp=2),
                                    dict(tp=1, vocab_split=False, dp=2)])
def test_merged_rank_files_equal_the_unsplit_checkpoint(params, tmp_path, layout):
    root = _mf_rank_files(str(tmp_path / "run"), params, **layout)
    tree, cfg = load_mindformers(root, n_head=4)
    assert_same_params(tree, params)
    assert (cfg.n_head, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, 512)


def test_mf_yaml_gives_heads_and_run_settings(params, tmp_path):
    root = _mf_rank_files(str(tmp_path / "run"), params, tp=2, vocab_split=True)
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("parallel_config:\n  model_parallel: 2\n  vocab_emb_dp: False\n"
                         "model:\n  model_config:\n    type: TelechatConfig\n    hidden_size: 64\n"
                         "    num_layers: 2\n    num_heads: 4\n    n_kv_heads: 2\n    vocab_size: 512\n"
                         "    intermediate_size: 176\n    rms_norm_eps: 1.0e-6\n    seq_length: 64\n")
    tree, cfg = load_mindformers(root, mf_yaml=str(yaml_path))
    assert_same_params(tree, params)
    assert (cfg.layer_norm_epsilon, cfg.seq_length, cfg.training_seqlen) == (1e-6, 64, 64)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_path.read_text().replace("intermediate_size: 176", "intermediate_size: 352"))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape .*176.*ffn_hidden_size=352"):
        load_mindformers(root, mf_yaml=str(bad))


def test_merged_params_give_the_same_logits_in_graph_mode(params, tmp_path):
    root = _mf_rank_files(str(tmp_path / "run"), params, tp=2, vocab_split=True)
    tree, cfg = load_mindformers(root, config=CFG)
    assert cfg == CFG
    tokens = ms.Tensor(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 8)).astype(np.int32))
    want = jit_forward(as_tree(params), tokens, CFG).asnumpy()
    got = jit_forward(tree, tokens, CFG).asnumpy()
    assert np.array_equal(got, want)


def test_rank_dirs_sort_numerically(tmp_path):
    for r in range(12):
        os.makedirs(tmp_path / f"rank_{r}")
        (tmp_path / f"rank_{r}" / f"ckpt_{r}.ckpt").write_bytes(b"")
    found = rank_ckpt_files(str(tmp_path), "*.ckpt")
    assert [r for r, _ in found] == list(range(12))
    assert [os.path.basename(f) for _, f in found] == [f"ckpt_{r}.ckpt" for r in range(12)]
    os.rename(tmp_path / "rank_5", tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="missing rank_5"):
        rank_ckpt_files(str(tmp_path), "*.ckpt")


def test_several_ckpts_per_rank_need_a_pattern(params, tmp_path):
    root = _mf_rank_files(str(tmp_path / "run"), params, tp=2, vocab_split=False)
    for r in range(2):
        src = os.path.join(root, f"rank_{r}", f"telechat_rank_{r}-1_2.ckpt")
        os.link(src, os.path.join(root, f"rank_{r}", f"telechat_rank_{r}-1_4.ckpt"))
    with pytest.raises(FileNotFoundError, match="2 files .*pattern"):
        load_mindformers(root, n_head=4)
    tree, _ = load_mindformers(root, n_head=4, pattern="*-1_4.ckpt")
    assert_same_params(tree, params)


def test_inconsistent_ranks_are_named(params, tmp_path):
    root = _mf_rank_files(str(tmp_path / "a"), params, tp=2, vocab_split=False, extra=False)
    path = os.path.join(root, "rank_1", "telechat_rank_1-1_2.ckpt")
    kept = {k: v for k, v in ms.load_checkpoint(path).items() if k != "model.layers.1.feed_forward.w3.weight"}
    ms.save_checkpoint([{"name": k, "data": v} for k, v in kept.items()], path)
    with pytest.raises(KeyError, match="rank_1 lacks model.layers.1.feed_forward.w3.weight"):
        load_mindformers(root, n_head=4)

    root = _mf_rank_files(str(tmp_path / "b"), params, tp=2, vocab_split=False, extra=False)
    path = os.path.join(root, "rank_1", "telechat_rank_1-1_2.ckpt")
    items = ms.load_checkpoint(path)
    items["model.layers.0.feed_forward.w1.weight"] = ms.Parameter(ms.Tensor(np.zeros((80, 64), np.float32)),
                                                                 name="model.layers.0.feed_forward.w1.weight")
    ms.save_checkpoint([{"name": k, "data": v} for k, v in items.items()], path)
    with pytest.raises(ValueError, match=r"disagree on model.layers.0.feed_forward.w1.weight.*\(80, 64\)"):
        load_mindformers(root, n_head=4)


def test_one_rank_file_alone_is_refused(params, tmp_path):
    root = _mf_rank_files(str(tmp_path / "run"), params, tp=2, vocab_split=False)
    with pytest.raises(ValueError, match="1/2 of the attention.*rank_"):
        load_mindformers(os.path.join(root, "rank_0", "telechat_rank_0-1_2.ckpt"), n_head=4)


def test_mp_not_dividing_kv_heads_is_refused(tmp_path):
    """4 ranks over 2 KV heads would cut a (k, v) head pair apart: MindFormers never does that."""
    cfg = tiny(n_head=4, num_key_value_heads=2)
    rng = np.random.default_rng(0)
    flat = {n: rng.standard_normal(s.shape).astype(np.float32)
            for n, s in tree_flatten_with_names(param_specs(cfg)).items()}
    root = _mf_rank_files(str(tmp_path / "run"), flat, tp=4, vocab_split=False)
    with pytest.raises(ValueError, match="degree 4 does not divide num_key_value_heads=2"):
        load_mindformers(root, n_head=4)


def test_heads_are_required_for_non_release_sizes(params, tmp_path):
    path = str(tmp_path / "tiny.ckpt")
    save_mindformers(as_tree(params), CFG, path)
    with pytest.raises(ValueError, match="attention heads.*--n_head"):
        load_mindformers(path)
    with pytest.raises(ValueError, match="not divisible by n_head=5"):
        load_mindformers(path, n_head=5)


def test_truncated_and_corrupt_files_are_clear_errors(params, tmp_path):
    path = tmp_path / "tiny.ckpt"
    save_mindformers(as_tree(params), CFG, str(path))
    data = path.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[:len(data) - 1000])
    with pytest.raises(ValueError, match=r"cut\.ckpt: truncated"):
        load_mindformers(str(cut), n_head=4)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\xff" * 64 + data[64:])
    with pytest.raises(ValueError, match=r"bad\.ckpt: (not a MindSpore checkpoint|corrupt)"):
        load_mindformers(str(bad), n_head=4)
    with pytest.raises(FileNotFoundError, match="no MindFormers checkpoint"):
        load_mindformers(str(tmp_path / "nothing.ckpt"), n_head=4)


def test_crc_trailer_is_accepted_and_checked(params, tmp_path):
    path = str(tmp_path / "crc.ckpt")
    items = [{"name": mf, "data": ms.Tensor(params[tc2])} for mf, (_, tc2) in spec_mf_names(CFG).items()]
    ms.save_checkpoint(items, path, crc_check=True)
    assert open(path, "rb").read()[-17:-10] == b"crc_num"
    assert CkptFile(path, check_crc=True).entries
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01                                 # one flipped bit inside a tensor
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="CRC mismatch"):
        CkptFile(path, check_crc=True)


def test_save_is_atomic(params, tmp_path):
    path = tmp_path / "tiny.ckpt"
    path.write_bytes(b"previous")
    broken = dict(params)
    broken["layers.1.dense"] = np.zeros((3, 3), np.float32)            # a shape the config rejects
    with pytest.raises(ValueError, match="dense.weight has shape"):
        save_mindformers(as_tree(broken), CFG, str(path))
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["tiny.ckpt"]


def test_written_records_of_big_tensors_are_reassembled_by_mindspore(params, tmp_path):
    """Tensors above the record size are cut into same-name records, as MindSpore does at 512 MB."""
    path = str(tmp_path / "records.ckpt")
    arrays = {"model.tok_embeddings.embedding_weight": params["word_embeddings"], "model.norm_out.weight": params["ln_f"]}
    write_ckpt(path, ((n, a, "float32") for n, a in arrays.items()), dtype="bfloat16", record_bytes=1000)
    assert len(CkptFile(path).entries["model.tok_embeddings.embedding_weight"][2]) == 512 * 64 * 2 // 1000 + 1
    loaded = ms.load_checkpoint(path)
    for n, a in arrays.items():
        assert loaded[n].dtype == ms.bfloat16
        assert np.array_equal(loaded[n].astype(ms.float32).asnumpy(),
                              ms.Tensor(a).astype(ms.bfloat16).astype(ms.float32).asnumpy()), n


def test_qkv_concat_layout_is_refused_clearly(params, tmp_path):
    items = [{"name": mf, "data": ms.Tensor(params[tc2])} for mf, (_, tc2) in spec_mf_names(CFG).items()
             if ".wq." not in mf and ".wk_v." not in mf]
    items += [{"name": f"model.layers.{i}.attention.w_qkv.weight", "data": ms.Tensor(np.zeros((128, 64), np.float32))}
              for i in range(CFG.n_layer)]
    path = str(tmp_path / "qkv.ckpt")
    ms.save_checkpoint(items, path)
    with pytest.raises(ValueError, match="w_qkv.weight is MindFormers' qkv_concat layout"):
        load_mindformers(path, n_head=4)


@pytest.mark.parametrize("text,message", [
    ("- a\n- b\n", r"no model\.model_config section"),
    ("model:\n  model_config: [1, 2]\n", r"model\.model_config must be a mapping, got list"),
    ("model:\n  model_config:\n    num_heads: '4'\n", r"model\.model_config\.num_heads must be a positive int, "
                                                      r"got '4' \(str\)"),
    ("model:\n  model_config:\n    rms_norm_eps: 1e-5\n", r"model\.model_config\.rms_norm_eps must be a finite "
                                                          r"number > 0, got '1e-5' \(str\)"),
    ("parallel_config: 8\nmodel:\n  model_config:\n    num_heads: 4\n", r"parallel_config must be a mapping"),
    ("model:\n  model_config:\n    num_heads: 4\nparallel:\n  enable_parallel_optimizer: 'yes'\n",
     r"parallel\.enable_parallel_optimizer must be true or false, got 'yes'"),
    ("model:\n  model_config:\n    num_heads: 4\nparallel_config:\n  model_parallel: 0\n",
     r"parallel_config\.model_parallel must be a positive int, got 0"),
    ("model:\n  model_config:\n    num_heads: 4\nparallel:\n  parallel_optimizer_config:\n"
     "    optimizer_weight_shard_size: -2\n",
     r"parallel\.parallel_optimizer_config\.optimizer_weight_shard_size must be a positive int or -1, got -2"),
    (b"model:\n  model_config:\n    num_heads: \xff\n", r"not UTF-8 text"),
])
def test_malformed_mf_yaml_names_file_and_key(params, tmp_path, text, message):
    path = str(tmp_path / "tiny.ckpt")
    save_mindformers(as_tree(params), CFG, path)
    (tmp_path / "run.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises((KeyError, ValueError), match=r"run\.yaml: " + message):
        load_mindformers(path, mf_yaml=str(tmp_path / "run.yaml"))


def test_ckpt_records_that_disagree_or_overflow_are_refused(tmp_path):
    """Hand-written records: a same-name record of another shape glued on (MindSpore's continuation
    records repeat the tensor's dims and type), and dims whose product overflows int64."""
    from tc2.checkpoint import ms_ckpt
    one = str(tmp_path / "one.ckpt")
    write_ckpt(one, [("w", np.zeros((4, 2), np.float32), "float32")])
    other = str(tmp_path / "other.ckpt")
    write_ckpt(other, [("w", np.zeros((2, 2), np.float32), "float32")])
    glued = tmp_path / "glued.ckpt"
    glued.write_bytes(open(one, "rb").read() + open(other, "rb").read())
    with pytest.raises(ValueError, match=r"glued\.ckpt: tensor 'w' is split into records that disagree on its "
                                         r"shape or type \(\[4, 2\] Float32, then \[2, 2\] Float32\)"):
        CkptFile(str(glued))
    tag, type_name = b"w", b"Float32"
    dims = b"".join(b"\x08" + ms_ckpt._varint(d) for d in (2 ** 32, 2 ** 32, 4))
    tensor = dims + ms_ckpt._ld(2, len(type_name)) + type_name + ms_ckpt._ld(3, 0)
    value = ms_ckpt._ld(1, len(tag)) + tag + ms_ckpt._ld(2, len(tensor)) + tensor
    (tmp_path / "huge.ckpt").write_bytes(ms_ckpt._ld(1, len(value)) + value)
    with pytest.raises(ValueError, match=r"huge\.ckpt: tensor 'w' holds 0 bytes, but its shape \(4294967296, "
                                         r"4294967296, 4\) of Float32 needs 295147905179352825856"):
        CkptFile(str(tmp_path / "huge.ckpt"))


# ---- MindSpore's optimizer parallelism (enable_parallel_optimizer in every release finetune yaml) -------
NORMS_AND_BIASES = ("attention_norm", "ffn_norm", "norm_out", ".bias")


def _opt_rank_files(root, params, *, tp, dp, pp=1, vocab_split=False, threshold_kb=64, shard_size=-1,
                    embedding=True):
    """A MindFormers run's rank_*/ files with optimizer parallelism, cut by hand as MindSpore does:
    each tensor's model-parallel slice (tp fastest, then dp, then pp) is cut again on dim 0 into
    k pieces, k = its copies per stage (dp, or dp*tp when tp does not split it) or shard_size,
    rank i of a stage holding piece (i // step) % k (step = tp if tp splits the tensor, else 1),
    if its full size is >= threshold_kb KB and its dim 0 divides. MindFormers' TeleChat2 never cuts
    norms and biases, nor the embedding unless model_config.parallel_optimizer (`embedding`)."""
    stage_of_layer = {i: i * pp // CFG.n_layer for i in range(CFG.n_layer)}
    names = spec_mf_names(CFG)
    for p in range(pp):
        for i in range(dp * tp):
            t = i % tp
            items = []
            for mf, (_, tc2) in names.items():
                a = params[tc2]
                layer = int(mf.split(".")[2]) if mf.startswith("model.layers.") else None
                if (stage_of_layer[layer] if layer is not None else 0 if "tok_embeddings" in mf else pp - 1) != p:
                    continue
                split = None
                if any(k in mf for k in ("wq.", "wk_v.", "w1.", "w3.")) or (
                        vocab_split and ("tok_embeddings" in mf or mf == "lm_head.weight")):
                    split = 0
                elif mf.endswith(("wo.weight", "w2.weight")):
                    split = 1
                if split is not None:
                    n = a.shape[split] // tp
                    a = a[t * n:(t + 1) * n] if split == 0 else a[:, t * n:(t + 1) * n]
                step = tp if split is not None else 1
                copies = dp * tp // step
                k = copies if shard_size == -1 else shard_size
                eligible = not any(s in mf for s in NORMS_AND_BIASES) and (embedding or "tok_embeddings" not in mf)
                if eligible and params[tc2].nbytes >= threshold_kb * 1024 and a.shape[0] % k == 0:
                    piece, rows = (i // step) % k, a.shape[0] // k
                    a = a[piece * rows:(piece + 1) * rows]
                items.append((mf, np.ascontiguousarray(a), "float32"))
            items.append(("adam_m.model.norm_out.weight", np.zeros(3, np.float32), "float32"))
            rank = p * dp * tp + i
            os.makedirs(os.path.join(root, f"rank_{rank}"))
            write_ckpt(os.path.join(root, f"rank_{rank}", f"telechat_rank_{rank}-1_2.ckpt"), items)
    return root


def _run_yaml(path, *, tp, dp, pp=1, opt=True, vocab_emb_dp=None, shard_size=None, model_config=None):
    mc = model_config if model_config is not None else {
        "hidden_size": 64, "num_layers": 2, "num_heads": 4, "n_kv_heads": 2, "vocab_size": 512,
        "intermediate_size": 176, "seq_length": 64, "parallel_optimizer": True}
    lines = ["parallel:", f"  enable_parallel_optimizer: {opt}", "  parallel_optimizer_config:",
             "    parallel_optimizer_threshold: 64"]
    if shard_size is not None:
        lines.append(f"    optimizer_weight_shard_size: {shard_size}")
    lines += ["parallel_config:", f"  data_parallel: {dp}", f"  model_parallel: {tp}", f"  pipeline_stage: {pp}"]
    if vocab_emb_dp is not None:
        lines.append(f"  vocab_emb_dp: {vocab_emb_dp}")
    lines += ["model:", "  model_config:"] + [f"    {k}: {v}" for k, v in mc.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


EMBEDDING = "model.tok_embeddings.embedding_weight"


def test_optimizer_parallel_embedding_without_the_yaml_is_refused_not_halved(params, tmp_path):
    """dp=2, tp=1, the release threshold (64 KB): only the (512, 64) embedding and lm_head are cut,
    each rank holding 256 rows. Read as plain copies this was a vocab-256 model."""
    root = _opt_rank_files(str(tmp_path / "run"), params, tp=1, dp=2)
    assert CkptFile(os.path.join(root, "rank_1", "telechat_rank_1-1_2.ckpt")).entries[EMBEDDING][0] == (256, 64)
    with pytest.raises(ValueError, match=r"run: rank_1 holds a different lm_head\.weight \(256, 64\) from rank_0, although "
                                         r"with model_parallel 1 both would hold the same block: the tensor is cut "
                                         r"across data-parallel ranks \(MindSpore's optimizer parallel.*pass the run's "
                                         r"MindFormers yaml \(mf_yaml=, --mf_yaml\)"):
        load_mindformers(root, n_head=4)
    with pytest.raises(ValueError, match=r"rank_0 holds lm_head\.weight as \(256, 64\): 1/2 of the rows of the \(512, 64\) "
                                         r"each of its 2 data-parallel copies would hold .*optimizer parallel; pass "
                                         r"the run's MindFormers yaml"):
        load_mindformers(root, config=CFG)
    off = _run_yaml(tmp_path / "off.yaml", tp=1, dp=2, opt=False)
    with pytest.raises(ValueError, match=r"optimizer parallel; but .*off\.yaml does not set "
                                         r"parallel\.enable_parallel_optimizer: True"):
        load_mindformers(root, mf_yaml=off)
    tree, cfg = load_mindformers(root, mf_yaml=_run_yaml(tmp_path / "run.yaml", tp=1, dp=2))
    assert_same_params(tree, params)
    assert cfg.vocab_size == 512 and cfg.seq_length == 64


@pytest.mark.parametrize("layout", [dict(tp=1, dp=2, threshold_kb=0), dict(tp=2, dp=2, threshold_kb=0),
                                    dict(tp=2, dp=2, threshold_kb=0, vocab_split=True),
                                    dict(tp=2, dp=2, threshold_kb=0, embedding=False),
                                    dict(tp=2, dp=2, pp=2, threshold_kb=0, vocab_split=True),
                                    dict(tp=1, dp=4, threshold_kb=0, shard_size=2),
                                    dict(tp=2, dp=4, threshold_kb=32, shard_size=2, vocab_split=True),
                                    dict(tp=1, dp=8)])
def test_optimizer_parallel_layouts_merge_exactly_with_the_yaml(params, tmp_path, layout):
    root = _opt_rank_files(str(tmp_path / "run"), params, **layout)
    tp, dp, pp = layout["tp"], layout["dp"], layout.get("pp", 1)
    first = CkptFile(os.path.join(root, "rank_0", "telechat_rank_0-1_2.ckpt")).entries
    wo = first.get("model.layers.0.attention.wo.weight")
    if layout.get("threshold_kb") == 0 and wo is not None:                     # the fixture does cut
        assert wo[0][0] < CFG.hidden_size
    yaml_path = _run_yaml(tmp_path / "run.yaml", tp=tp, dp=dp, pp=pp, shard_size=layout.get("shard_size"),
                          vocab_emb_dp=not layout.get("vocab_split", False))
    tree, cfg = load_mindformers(root, mf_yaml=yaml_path)
    assert_same_params(tree, params)
    assert cfg == CFG.replace(layer_norm_epsilon=cfg.layer_norm_epsilon)


def test_optimizer_parallel_layout_mismatches_are_named(params, tmp_path):
    root = _opt_rank_files(str(tmp_path / "run"), params, tp=1, dp=4, threshold_kb=0, shard_size=2)
    with pytest.raises(ValueError, match=r"cut on dim 0 by MindSpore's optimizer parallel into 2 pieces, but "
                                         r".*run\.yaml gives optimizer groups of 4 \(4 copies, "
                                         r"optimizer_weight_shard_size -1\)"):
        load_mindformers(root, mf_yaml=_run_yaml(tmp_path / "run.yaml", tp=1, dp=4))
    with pytest.raises(ValueError, match=r"4 ranks \(0\.\.3\) hold one pipeline stage, but .*dp2\.yaml says "
                                         r"data_parallel 2 x model_parallel 1"):
        load_mindformers(root, mf_yaml=_run_yaml(tmp_path / "dp2.yaml", tp=1, dp=2, shard_size=2))
    partial = _run_yaml(tmp_path / "partial.yaml", tp=1, dp=4, shard_size=2, model_config={"num_heads": 4})
    with pytest.raises(ValueError, match=r"partial\.yaml lacks model\.model_config\.hidden_size/vocab_size/"
                                         r"intermediate_size, needed for the full shapes"):
        load_mindformers(root, mf_yaml=partial)


def test_recipe_converts_an_optimizer_parallel_run(params, tmp_path, capsys):
    import importlib.util
    root = _opt_rank_files(str(tmp_path / "run"), params, tp=2, dp=2, threshold_kb=0)
    spec = importlib.util.spec_from_file_location("recipe_convert", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "convert.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = str(tmp_path / "hf")
    assert recipe.main(["mf-to-hf", root, out, "--n_head", "4", "--seq_length", "64", "--no_progress"]) == 2
    assert "optimizer parallel" in capsys.readouterr().err
    assert not os.path.exists(out)
    yaml_path = _run_yaml(tmp_path / "run.yaml", tp=2, dp=2, vocab_emb_dp=True)
    assert recipe.main(["mf-to-hf", root, out, "--mf_yaml", yaml_path, "--no_progress"]) == 0
    from tc2.checkpoint.hf import load_hf
    tree, cfg = load_hf(out)
    assert_same_params(tree, params)
    assert cfg.seq_length == 64


def test_embedding_lm_head_and_config_must_agree(params, tmp_path):
    """A lm_head of another vocabulary than the embedding is named, whatever gives the config."""
    items = [(mf, params[tc2][:500] if mf == "lm_head.weight" else params[tc2], "float32")
             for mf, (_, tc2) in spec_mf_names(CFG).items()]
    path = str(tmp_path / "odd.ckpt")
    write_ckpt(path, items)
    with pytest.raises(ValueError, match=r"odd\.ckpt: tensor lm_head\.weight has shape \(500, 64\), but the config "
                                         r"\(.*vocab_size=512\) implies \(512, 64\)"):
        load_mindformers(path, n_head=4)
    yaml_path = _run_yaml(tmp_path / "v.yaml", tp=1, dp=1, opt=False, model_config={
        "hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 500, "intermediate_size": 176})
    with pytest.raises(ValueError, match=r"tensor transformer\.word_embeddings\.weight has shape \(512, 64\), but the "
                                         r"config \(.*vocab_size=500\) implies \(500, 64\)"):
        load_mindformers(path, mf_yaml=yaml_path)


def test_one_optimizer_parallel_rank_file_alone_is_refused(params, tmp_path):
    root = _opt_rank_files(str(tmp_path / "run"), params, tp=1, dp=2, threshold_kb=0)
    with pytest.raises(ValueError, match=r"rank_0 holds model\.layers\.0\.attention\.wo\.weight with 32 rows, not "
                                         r"hidden_size 64: its rows are cut across data-parallel ranks"):
        load_mindformers(os.path.join(root, "rank_0", "telechat_rank_0-1_2.ckpt"), n_head=4)
    with pytest.raises(ValueError, match=r"rank_0 holds model\.layers\.0\.attention\.wo\.weight with 32 rows"):
        load_mindformers(root, n_head=4)
