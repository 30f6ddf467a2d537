"""Tensor names: the one table of TeleChat2's parameters in tc2, HF and MindFormers spelling.

Every parameter has a tc2 leaf key ("query", "ln_f", ...) and three spellings (spec §4):

    tc2           layers.3.query                                word_embeddings
    HF            transformer.h.3.self_attention.query.weight   transformer.word_embeddings.weight
    MindFormers   model.layers.3.attention.wq.weight            model.tok_embeddings.embedding_weight

`_TOP` and `_LAYER` list, per leaf key, the HF and the MindFormers spelling (for per-layer keys,
the part after the layer prefix). Every name function of tc2 is derived from them: `hf_name`,
`tc2_from_hf`, `mf_name`, `hf_from_mf`, `hf_layer`, and `leaf_key`, which reads any of the three
spellings (`tc2.parallel.sharding.split_dim` uses it to split a tensor known by any name).
This module imports nothing from tc2, so the sharding layer may use it.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

# leaf key: (HF name, MindFormers name) of the top-level parameters
_TOP = {
    "word_embeddings": ("transformer.word_embeddings.weight", "model.tok_embeddings.embedding_weight"),
    "ln_f": ("transformer.ln_f.weight", "model.norm_out.weight"),
    "lm_head": ("lm_head.weight", "lm_head.weight"),
}
# leaf key: (HF, MindFormers) after the layer prefix of each spelling (_LAYER_PREFIX)
_LAYER = {
    "input_layernorm": ("input_layernorm.weight", "attention_norm.weight"),
    "query": ("self_attention.query.weight", "attention.wq.weight"),
    "key_value": ("self_attention.key_value.weight", "attention.wk_v.weight"),
    "dense": ("self_attention.dense.weight", "attention.wo.weight"),
    "dense_bias": ("self_attention.dense.bias", "attention.wo.bias"),
    "post_attention_layernorm": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "gate_proj": ("mlp.gate_proj.weight", "feed_forward.w1.weight"),
    "up_proj": ("mlp.up_proj.weight", "feed_forward.w3.weight"),
    "down_proj": ("mlp.down_proj.weight", "feed_forward.w2.weight"),
    "down_proj_bias": ("mlp.down_proj.bias", "feed_forward.w2.bias"),
}
TC2, HF, MF = 0, 1, 2                                   # the spellings, as indices below
_LAYER_PREFIX = ("layers", "transformer.h", "model.layers")

_TOP_ROWS = {k: (k,) + row for k, row in _TOP.items()}          # leaf key: (tc2, HF, MF)
_LAYER_ROWS = {k: (k,) + row for k, row in _LAYER.items()}
# per spelling: {name (top) or suffix (per layer): leaf key}, and the per-layer pattern
_TOP_KEY = [{row[s]: k for k, row in _TOP_ROWS.items()} for s in (TC2, HF, MF)]
_LAYER_KEY = [{row[s]: k for k, row in _LAYER_ROWS.items()} for s in (TC2, HF, MF)]
_LAYER_RE = [re.compile(re.escape(p) + r"\.(\d+)\.(.+)") for p in _LAYER_PREFIX]


def _leaf_spellings() -> Dict[str, str]:
    """{any spelling of a top-level name or per-layer suffix: leaf key}; no spelling is two keys'."""
    out: Dict[str, str] = {}
    for table in _TOP_KEY + _LAYER_KEY:
        for spelled, key in table.items():
            if out.setdefault(spelled, key) != key:
                raise AssertionError(f"tensor-name table: {spelled!r} spells both {out[spelled]} and {key}")
    return out


_KEY_OF = _leaf_spellings()


def _parse(name: str, spelling: int) -> Optional[Tuple[Optional[int], str]]:
    """(layer index, or None at the top level; leaf key) of `name` in `spelling`, else None."""
    if name in _TOP_KEY[spelling]:
        return None, _TOP_KEY[spelling][name]
    m = _LAYER_RE[spelling].fullmatch(name)
    if m and m.group(2) in _LAYER_KEY[spelling]:
        return int(m.group(1)), _LAYER_KEY[spelling][m.group(2)]
    return None


_WHAT = ("tc2 parameter", "HF tensor", "MindFormers tensor")


def _rename(name: str, src: int, dst: int, *, required: bool = True) -> Optional[str]:
    """`name` in spelling `src` respelled as `dst`; if it is not a parameter's name, a KeyError
    (or None when not `required`)."""
    parsed = _parse(name, src)
    if parsed is None:
        if required:
            raise KeyError(f"{name!r} is not a TeleChat2 {_WHAT[src]} name")
        return None
    layer, key = parsed
    if layer is None:
        return _TOP_ROWS[key][dst]
    return f"{_LAYER_PREFIX[dst]}.{layer}.{_LAYER_ROWS[key][dst]}"


def hf_name(tc2_name: str) -> str:
    """'layers.3.query' -> 'transformer.h.3.self_attention.query.weight'."""
    return _rename(tc2_name, TC2, HF)


def tc2_from_hf(hf: str) -> str:
    """'transformer.h.3.self_attention.query.weight' -> 'layers.3.query'."""
    return _rename(hf, HF, TC2)


def mf_name(hf: str) -> str:
    """'transformer.h.3.self_attention.key_value.weight' -> 'model.layers.3.attention.wk_v.weight'."""
    return _rename(hf, HF, MF)


def hf_from_mf(mf: str) -> Optional[str]:
    """The HF name of an MF weight; None for anything else (optimizer moments, step counters)."""
    return _rename(mf, MF, HF, required=False)


def hf_layer(hf: str) -> Optional[int]:
    """The layer index of an HF name 'transformer.h.{i}.…' (whatever follows); None otherwise."""
    m = _LAYER_RE[HF].fullmatch(hf)
    return int(m.group(1)) if m else None


def _find_key(name: str) -> Optional[str]:
    """The leaf key of the longest dot-suffix of `name` that spells one."""
    parts = name.split(".")
    for i in range(len(parts)):
        key = _KEY_OF.get(".".join(parts[i:]))
        if key is not None:
            return key
    return None


def leaf_key(name: str) -> str:
    """The tc2 leaf key ("query", "dense_bias", "lm_head", ...) of a tc2, HF or MF tensor name.

    The name may carry a prefix (an optimizer moment "adam_m.model.layers.0.attention.wq.weight"
    is "query"); what ends it must spell a TeleChat2 parameter.
    """
    key = _find_key(name)
    if key is not None:
        return key
    if name.endswith(".bias"):                      # a bias TeleChat2 does not have?
        base = name[:-len(".bias")]
        weight = _find_key(base + ".weight") or _find_key(base)
        if weight is not None and f"{weight}_bias" not in _LAYER:
            raise KeyError(f"{name!r}: TeleChat2 has no bias on {weight}")
    raise KeyError(f"{name!r} is not a TeleChat2 parameter name (tc2, HF or MindFormers spelling)")
