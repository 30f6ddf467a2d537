"""ModelConfig: one frozen dataclass, field names as in the official HF `config.json`.

Keeping the HF names means a config read from a release directory needs no renaming table,
and `to_hf()` writes a file the official `TelechatConfig` reads as is.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Mapping, Union

DTYPES = ("float32", "float16", "bfloat16")
IGNORE_INDEX = -100                   # the label of a position that carries no loss (HF / MindFormers)


_POSITIVE_INTS = ("vocab_size", "hidden_size", "n_layer", "n_head", "num_key_value_heads", "ffn_hidden_size",
                  "training_seqlen", "base_seqlen", "seq_length")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_POSITIVE_FLOATS = ("layer_norm_epsilon", "rope_theta", "initializer_range")
_BOOLS = ("tie_word_embeddings", "flash_attn")


def field_problem(name: str, value, vocab_size: int = 131072):
    """What is wrong with `value` for the ModelConfig field `name` ("must be a positive int,
    got '4096' (str)"), or None if it fits: ints are ints (not bools, floats or strings) and
    positive, token ids within the vocabulary, epsilons and bases finite and positive."""
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if name in _BOOLS:
        ok, want = isinstance(value, bool), "true or false"
    elif name in _POSITIVE_FLOATS:
        low = 0 if name == "initializer_range" else None
        ok = real and math.isfinite(value) and (value > 0 or value == low)
        want = "a finite number >= 0" if low == 0 else "a finite number > 0"
    elif name in _TOKEN_IDS:
        ok, want = integral and 0 <= value < vocab_size, f"an int in [0, vocab_size={vocab_size})"
    elif name in _POSITIVE_INTS:
        ok, want = integral and value > 0, "a positive int"
    else:
        return None
    return None if ok else f"must be {want}, got {value!r} ({type(value).__name__})"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 131072
    hidden_size: int = 4096
    n_layer: int = 30
    n_head: int = 32
    num_key_value_heads: int = 32
    ffn_hidden_size: int = 12288
    layer_norm_epsilon: float = 1e-5
    training_seqlen: int = 8192       # L above this turns on mscale (spec §3)
    base_seqlen: int = 8192           # L / base_seqlen picks the NTK alpha (spec §3)
    seq_length: int = 8192
    rope_theta: float = 10000.0       # not an HF key: the release hard-codes 10000
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3
    flash_attn: bool = True
    dtype: str = "float32"            # compute dtype; parameters stay float32 (master)

    def __post_init__(self):
        self._check_types()
        if self.hidden_size % self.n_head:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_head {self.n_head}")
        if self.n_head % self.num_key_value_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of num_key_value_heads "
                             f"{self.num_key_value_heads}")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True is not a TeleChat2 layout (the release unties them)")

    def _check_types(self) -> None:
        """Every field of the right type and range (a config.json may say "4096" or -1), each
        number normalized to a plain int / float; the error names the field."""
        for name in _POSITIVE_INTS + _TOKEN_IDS + _POSITIVE_FLOATS + _BOOLS:
            v = getattr(self, name)
            problem = field_problem(name, v, self.vocab_size)
            if problem:
                raise ValueError(f"{name} {problem}")
            if not isinstance(v, bool):
                object.__setattr__(self, name, float(v) if name in _POSITIVE_FLOATS else int(v))
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def compute_dtype(self):
        """The MindSpore dtype matmuls run in (`dtype` names it; parameters stay float32)."""
        import mindspore as ms
        return getattr(ms, self.dtype)

    @property
    def kv_groups(self) -> int:
        """Query heads served by one KV head."""
        return self.n_head // self.num_key_value_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- HF config.json --------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: Union[str, os.PathLike, Mapping[str, Any]], **overrides) -> "ModelConfig":
        """Read an official `config.json` (a dict, the file, or the directory holding it)."""
        where = "config dict"
        if not isinstance(source, Mapping):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no TeleChat2 config.json at {path}")
            where = path
            try:
                with open(path, encoding="utf-8") as f:
                    source = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e})") from None
        if not isinstance(source, Mapping):
            raise ValueError(f"{where}: a config must be a JSON object of keys, got {type(source).__name__}")
        hf = dict(source)
        if hf.get("model_type", "telechat") != "telechat":
            raise ValueError(f"{where}: model_type is {hf['model_type']!r}, expected 'telechat'")
        required = ("hidden_size", "n_layer", "n_head", "vocab_size", "ffn_hidden_size")
        missing = [k for k in required if hf.get(k) is None]
        if missing:
            raise KeyError(f"{where}: missing required key(s) {missing}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: hf[k] for k in names if k in hf and hf[k] is not None}
        kwargs.setdefault("num_key_value_heads", hf["n_head"])
        seq = hf.get("seq_length") or hf.get("training_seqlen") or cls.seq_length
        kwargs.setdefault("seq_length", seq)
        kwargs.setdefault("training_seqlen", seq)
        kwargs.setdefault("base_seqlen", kwargs["training_seqlen"])
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """The official config.json keys (what `TelechatConfig` / `TelechatForCausalLM` read)."""
        return {
            "architectures": ["TelechatForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_telechat.TelechatConfig",
                "AutoModelForCausalLM": "modeling_telechat.TelechatForCausalLM",
            },
            "model_type": "telechat",
            "apply_residual_connection_post_layernorm": False,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "attention_softmax_in_fp32": True,
            "hidden_size": self.hidden_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "num_key_value_heads": self.num_key_value_heads,
            "ffn_hidden_size": self.ffn_hidden_size,
            "n_inner": None,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "training_seqlen": self.training_seqlen,
            "base_seqlen": self.base_seqlen,
            "seq_length": self.seq_length,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "unk_token_id": 0,
            "initializer_range": self.initializer_range,
            "flash_attn": self.flash_attn,
            "use_cache": True,
        }


def telechat2_7b(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(hidden_size=4096, n_layer=30, n_head=32, num_key_value_heads=32,
                                 ffn_hidden_size=12288, layer_norm_epsilon=1e-5), **overrides})


def telechat2_35b(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(hidden_size=6144, n_layer=64, n_head=48, num_key_value_heads=48,
                                 ffn_hidden_size=20480, layer_norm_epsilon=1e-5), **overrides})


def telechat2_115b(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(hidden_size=8192, n_layer=96, n_head=64, num_key_value_heads=8,
                                 ffn_hidden_size=40960, layer_norm_epsilon=1e-8), **overrides})


def tiny(**overrides) -> ModelConfig:
    """A 2-layer GQA model of the same architecture: compiles in seconds, for tests and demos."""
    return ModelConfig(**{**dict(vocab_size=512, hidden_size=64, n_layer=2, n_head=4,
                                 num_key_value_heads=2, ffn_hidden_size=176, layer_norm_epsilon=1e-5,
                                 training_seqlen=64, base_seqlen=64, seq_length=64), **overrides})


PRESETS = {"telechat2_7b": telechat2_7b, "telechat2_35b": telechat2_35b,
           "telechat2_115b": telechat2_115b, "tiny": tiny}
