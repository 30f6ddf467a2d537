"""ModelConfig: presets, the official config.json in and out, and refusals."""
import json
import os
import re

import numpy as np
import pytest

import tc2
from tc2.config import ModelConfig


def test_presets_match_the_spec_table():
    c7, c35, c115 = tc2.telechat2_7b(), tc2.telechat2_35b(), tc2.telechat2_115b()
    assert (c7.n_layer, c7.hidden_size, c7.ffn_hidden_size, c7.n_head, c7.num_key_value_heads) == (30, 4096, 12288, 32, 32)
    assert (c35.n_layer, c35.hidden_size, c35.ffn_hidden_size, c35.n_head, c35.num_key_value_heads) == (64, 6144, 20480, 48, 48)
    assert (c115.n_layer, c115.hidden_size, c115.ffn_hidden_size, c115.n_head, c115.num_key_value_heads) == (96, 8192, 40960, 64, 8)
    assert {c.head_dim for c in (c7, c35, c115)} == {128}
    assert c115.kv_groups == 8
    assert (c7.layer_norm_epsilon, c115.layer_norm_epsilon) == (1e-5, 1e-8)
    for c in (c7, c35, c115):
        assert (c.vocab_size, c.training_seqlen, c.base_seqlen, c.rope_theta) == (131072, 8192, 8192, 10000.0)
        assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 3)


def test_official_115b_config_loads(shared_dir):
    cfg = ModelConfig.from_hf(os.path.join(shared_dir, "telechat2", "config-115b.json"))
    assert cfg == tc2.telechat2_115b()


def test_to_hf_from_hf_round_trip_and_file_and_dir(tmp_path):
    cfg = tc2.tiny(layer_norm_epsilon=1e-8, training_seqlen=32, base_seqlen=32, seq_length=32)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    assert ModelConfig.from_hf(tmp_path) == cfg
    assert ModelConfig.from_hf(tmp_path / "config.json") == cfg


def test_missing_kv_heads_means_mha_and_overrides_apply():
    hf = tc2.telechat2_7b().to_hf()
    del hf["num_key_value_heads"]
    assert ModelConfig.from_hf(hf).num_key_value_heads == 32
    assert ModelConfig.from_hf(hf, dtype="float16").dtype == "float16"


def test_config_is_frozen():
    with pytest.raises(Exception):
        tc2.tiny().hidden_size = 3


@pytest.mark.parametrize("bad,message", [
    (dict(n_head=5), "not divisible by n_head"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (dict(dtype="int8"), "dtype must be one of"),
])
def test_inconsistent_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        tc2.tiny(**bad)


def test_bad_config_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path / "config.json")):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "telechat", "hidden_size": 64}))
    with pytest.raises(KeyError, match="missing required key"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**tc2.tiny().to_hf(), "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size="64"), r"hidden_size must be a positive int, got '64' \(str\)"),
    (dict(hidden_size=64.0), r"hidden_size must be a positive int, got 64\.0 \(float\)"),
    (dict(n_layer=True), r"n_layer must be a positive int, got True \(bool\)"),
    (dict(n_head=0), r"n_head must be a positive int, got 0"),
    (dict(num_key_value_heads=-2), r"num_key_value_heads must be a positive int, got -2"),
    (dict(vocab_size=0), r"vocab_size must be a positive int, got 0"),
    (dict(ffn_hidden_size=[176]), r"ffn_hidden_size must be a positive int, got \[176\] \(list\)"),
    (dict(layer_norm_epsilon="1e-5"), r"layer_norm_epsilon must be a finite number > 0, got '1e-5'"),
    (dict(layer_norm_epsilon=0), r"layer_norm_epsilon must be a finite number > 0, got 0"),
    (dict(pad_token_id=512), r"pad_token_id must be an int in \[0, vocab_size=512\), got 512"),
    (dict(seq_length=-1), r"seq_length must be a positive int, got -1"),
    (dict(flash_attn="yes"), r"flash_attn must be true or false, got 'yes'"),
])
def test_config_json_fields_of_the_wrong_type_name_file_and_key(tmp_path, change, message):
    hf = {**tc2.tiny().to_hf(), **change}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json")) + ": " + message):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize("content,message", [
    (b"[1, 2, 3]", "a config must be a JSON object of keys, got list"),
    (b'"telechat"', "a config must be a JSON object of keys, got str"),
    (b"null", "a config must be a JSON object of keys, got NoneType"),
    (b'{"hidden_size": 64, "model_type": "tele\xffchat"}', "not UTF-8 text"),
])
def test_config_json_of_the_wrong_kind_names_the_file(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: {message}")):
        ModelConfig.from_hf(tmp_path)


def test_numpy_numbers_are_accepted_as_plain_python_numbers():
    cfg = tc2.tiny(hidden_size=np.int64(64), layer_norm_epsilon=np.float32(1e-5))
    assert type(cfg.hidden_size) is int and type(cfg.layer_norm_epsilon) is float
    assert json.dumps(cfg.to_hf())
