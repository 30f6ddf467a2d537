"""MindFormers TeleChat2 checkpoints: names, configs, and merging per-rank `.ckpt` files.

The `.ckpt` file format itself (indexing, streaming reads and writes) is
`tc2.checkpoint.ms_ckpt`; this module is what MindFormers puts in those files. MF names are a
rename of the HF names (spec §4), both spelled in the one table of `tc2.checkpoint.names`
(`mf_name`, `hf_from_mf`; tests check the round trip). The config comes from a config.json, a
MindFormers yaml, or the tensor shapes. A directory of `rank_*/` files from a MindFormers run is
merged as `tc2.checkpoint.mf_layout` plans it (pipeline stages, the tensor-parallel rule shared
with `tc2.parallel.sharding.split_dim`, MindSpore's optimizer-parallel pieces); see
`MindFormersCheckpoint`.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Optional, Tuple

import mindspore as ms
import numpy as np

from tc2.checkpoint.hf import check_hf_layout, hf_arrays, hf_shapes
from tc2.checkpoint.mf_layout import MFRun, plan_rank_merge
from tc2.checkpoint.ms_ckpt import CkptFile, write_ckpt
from tc2.checkpoint.names import hf_from_mf, hf_layer, hf_name, mf_name, tc2_from_hf
from tc2.checkpoint.reader import Reader, read_blocks
from tc2.checkpoint.safetensors import np_dtype, to_float32
from tc2.config import ModelConfig, field_problem, telechat2_7b, telechat2_35b, telechat2_115b
from tc2.model import param_specs
from tc2.tree import tree_unflatten_from_names

# ---- configs ----------------------------------------------------------------------------------
_RELEASES = {c.hidden_size: c for c in (telechat2_7b(), telechat2_35b(), telechat2_115b())}
_MF_KEYS = {"hidden_size": "hidden_size", "num_layers": "n_layer", "num_heads": "n_head",
            "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size",
            "intermediate_size": "ffn_hidden_size", "rms_norm_eps": "layer_norm_epsilon",
            "seq_length": "seq_length", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
            "pad_token_id": "pad_token_id"}


def read_mf_yaml(path: str) -> Tuple[dict, MFRun]:
    """A MindFormers yaml -> (ModelConfig fields from model.model_config, its parallel settings)."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"MindFormers yaml not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    mc = model.get("model_config") if isinstance(model, dict) else None
    if not mc:
        raise KeyError(f"{path}: no model.model_config section (is this a MindFormers yaml?)")
    for section, value in (("model.model_config", mc), ("parallel_config", doc.get("parallel_config")),
                           ("parallel", doc.get("parallel"))):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{path}: {section} must be a mapping, got {type(value).__name__}")
    fields = {ours: mc[theirs] for theirs, ours in _MF_KEYS.items() if mc.get(theirs) is not None}
    for theirs, ours in _MF_KEYS.items():
        problem = field_problem(ours, fields[ours], fields.get("vocab_size", 131072)) if ours in fields else None
        if problem:
            raise ValueError(f"{path}: model.model_config.{theirs} {problem}")
    if "seq_length" in fields:
        fields.update(training_seqlen=fields["seq_length"], base_seqlen=fields["seq_length"])
    return fields, MFRun.from_yaml(doc, path)


def infer_config(shapes: Dict[str, Tuple[int, ...]], where: str, *, n_head: Optional[int] = None,
                 **fields) -> ModelConfig:
    """A ModelConfig from full HF-named tensor shapes; `fields` (e.g. from a yaml) take precedence.

    Shapes give every size but the head count: that comes from `n_head`, the yaml, or the
    release whose hidden size matches (whose epsilon and sequence lengths are then used too).
    """
    def shape(name):
        if name not in shapes:
            raise KeyError(f"{where}: missing tensor {name}")
        return shapes[name]

    layers = {hf_layer(n) for n in shapes} - {None}
    V, H = shape(hf_name("word_embeddings"))
    release = _RELEASES.get(H)
    n_head = n_head or (release.n_head if release else None)
    if n_head is None:
        raise ValueError(f"{where}: the weights do not say how many attention heads there are (hidden "
                         f"size {H} is no TeleChat2 release): pass n_head (--n_head), a MindFormers yaml "
                         f"(--mf_yaml) or an HF config.json (--config)")
    if H % n_head:
        raise ValueError(f"{where}: hidden size {H} is not divisible by n_head={n_head}")
    kv_rows = shape(hf_name("layers.0.key_value"))[0]
    if kv_rows % (2 * (H // n_head)):
        raise ValueError(f"{where}: key_value has {kv_rows} rows, not a multiple of 2*head_dim="
                         f"{2 * (H // n_head)} (n_head={n_head} wrong?)")
    base = {} if release is None else {k: getattr(release, k) for k in
                                       ("layer_norm_epsilon", "training_seqlen", "base_seqlen", "seq_length")}
    kwargs = {**base, "vocab_size": V, "hidden_size": H, "n_layer": max(layers, default=-1) + 1,
              "n_head": n_head, "num_key_value_heads": kv_rows // (2 * (H // n_head)),
              "ffn_hidden_size": shape(hf_name("layers.0.gate_proj"))[0], **fields}
    try:
        cfg = ModelConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    check_hf_layout(cfg, shapes, where)
    return cfg


LENGTH_FIELDS = ("seq_length", "training_seqlen", "base_seqlen")


def resolve_config(shapes, where: str, *, config=None, n_head=None, yaml_fields=None,
                   seq_length: Optional[int] = None) -> Tuple[ModelConfig, Tuple[str, ...]]:
    """(config, the fields no source gave) from an explicit ModelConfig / config.json, else yaml
    fields + `seq_length` + the shapes.

    The weights tell every size but the heads, and nothing of the sequence lengths (where dynamic
    NTK and mscale start): a released hidden size brings its release's lengths; otherwise they
    come from the yaml or `seq_length` (all three), or are the ModelConfig defaults and are listed
    as unknown (a conversion writing a config.json refuses them: `refuse_unknown`).
    """
    if config is not None:
        cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config)
        if seq_length is not None and seq_length != cfg.seq_length:
            raise ValueError(f"{where}: seq_length={seq_length} disagrees with the config's {cfg.seq_length}")
        check_hf_layout(cfg, shapes, where)
        return cfg, ()
    fields = dict(yaml_fields or {})
    if seq_length is not None:
        problem = field_problem("seq_length", seq_length)
        if problem:
            raise ValueError(f"seq_length {problem}")
        fields.update({f: seq_length for f in LENGTH_FIELDS})
    yaml_heads = fields.pop("n_head", None)
    cfg = infer_config(shapes, where, n_head=n_head or yaml_heads, **fields)
    known = cfg.hidden_size in _RELEASES or any(f in fields for f in LENGTH_FIELDS)
    return cfg, () if known else LENGTH_FIELDS


def refuse_unknown(unknown: Tuple[str, ...], cfg: ModelConfig, where: str) -> None:
    """Raise if a config about to be written has fields no source gave (see `resolve_config`)."""
    if unknown:
        raise ValueError(f"{where}: hidden size {cfg.hidden_size} is no TeleChat2 release, so the weights do not "
                         f"tell {', '.join(unknown)} (where dynamic NTK and mscale start) for the config.json "
                         f"this writes: pass the run's MindFormers yaml (mf_yaml=, --mf_yaml), an HF "
                         f"config.json (config=, --config) or the length (seq_length=, --seq_length N)")


def expected_shapes(config: Optional[ModelConfig], fields: dict, n_head: Optional[int],
                    n_layer: int) -> Tuple[Optional[Dict[str, Tuple[int, ...]]], List[str]]:
    """({HF name: full shape}, []) from the config, else from a yaml's model_config (n_kv_heads
    defaulting to num_heads, as MindFormers does); (None, the yaml keys missing) if neither."""
    if config is not None:
        return {n: tuple(s) for n, (s, _) in hf_shapes(config).items()}, []
    heads = fields.get("n_head") or n_head
    need = {"hidden_size": "hidden_size", "vocab_size": "vocab_size", "ffn_hidden_size": "intermediate_size"}
    missing = [mf for ours, mf in need.items() if ours not in fields] + ([] if heads else ["num_heads"])
    if missing:
        return None, missing
    try:
        cfg = ModelConfig(**{k: fields[k] for k in need}, n_head=heads, n_layer=fields.get("n_layer", n_layer),
                          num_key_value_heads=fields.get("num_key_value_heads", heads))
    except ValueError:
        return None, ["(a consistent model_config)"]
    return {n: tuple(s) for n, (s, _) in hf_shapes(cfg).items()}, []


# ---- MindFormers checkpoints as full HF-named tensors -------------------------------------------
def rank_ckpt_files(path: str, pattern: str) -> List[Tuple[int, str]]:
    """[(rank, .ckpt file)]: a file, a directory of rank_0..rank_{N-1}, or a dir with one .ckpt."""
    if os.path.isfile(path):
        return [(0, path)]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no MindFormers checkpoint at {path}")
    ranks = sorted((int(m.group(1)), d) for d in os.listdir(path)
                   for m in [re.fullmatch(r"rank_(\d+)", d)] if m and os.path.isdir(os.path.join(path, d)))
    if not ranks:
        ranks = [(0, "")]
    elif [r for r, _ in ranks] != list(range(len(ranks))):
        missing = sorted(set(range(ranks[-1][0] + 1)) - {r for r, _ in ranks})
        raise FileNotFoundError(f"{path}: rank directories are not rank_0..rank_{ranks[-1][0]}: "
                                f"missing rank_{missing[0]}")
    out = []
    for r, d in ranks:
        found = sorted(glob.glob(os.path.join(path, d, pattern)))
        if len(found) != 1:
            what = "no file" if not found else f"{len(found)} files ({', '.join(map(os.path.basename, found[:4]))})"
            raise FileNotFoundError(f"{os.path.join(path, d)}: {what} match {pattern!r}; pass "
                                    f"pattern= (--pattern) naming exactly one checkpoint per rank")
        out.append((r, found[0]))
    return out


class MindFormersCheckpoint(Reader):
    """A MindFormers checkpoint opened for reading as full tensors under HF names.

    `path`: a `.ckpt`, or a directory of `rank_*/` sub-directories (one `.ckpt` each, chosen by
    `pattern`) written by a MindFormers parallel run, merged as `tc2.checkpoint.mf_layout` says:
    pipeline stages, the model-parallel split (degree from the yaml or hidden_size / columns of a
    wo slice) and MindSpore's optimizer-parallel dim-0 pieces, which need the run's yaml
    (`mf_yaml`): without it, ranks that differ where they should be copies are refused.
    Non-weights (optimizer moments, counters) are listed in `ignored`; `unknown` lists the
    config fields no source gave (see `resolve_config`).
    """

    kind = "mindformers"

    def __init__(self, path: str, *, n_head: Optional[int] = None, mf_yaml: Optional[str] = None,
                 config=None, pattern: str = "*.ckpt", check_crc: bool = False,
                 seq_length: Optional[int] = None):
        self.path = path
        self._files: Dict[int, CkptFile] = {}
        with self.closing_on_error():
            for rank, file in rank_ckpt_files(path, pattern):
                self._files[rank] = CkptFile(file, check_crc=check_crc)
            fields, run = read_mf_yaml(mf_yaml) if mf_yaml else ({}, None)
            if config is not None and not isinstance(config, ModelConfig):
                config = ModelConfig.from_hf(config)
            weights = self._weights()
            layers = {hf_layer(h) for w in weights.values() for h in w} - {None}
            expected, missing = expected_shapes(config, fields, n_head, max(layers, default=-1) + 1)
            vocab = config.vocab_size if config is not None else fields.get("vocab_size")
            self._plan, self.mp = plan_rank_merge(self._files, weights, path, run=run, expected=expected,
                                                  vocab=vocab, missing=missing)
            shapes = {n: p.shape for n, p in self._plan.items()}
            self.config, self.unknown = resolve_config(shapes, path, config=config, n_head=n_head,
                                                       yaml_fields=fields, seq_length=seq_length)
            for what, n in (("n_head", self.config.n_head), ("num_key_value_heads",
                                                             self.config.num_key_value_heads)):
                if n % self.mp:
                    raise ValueError(f"{path}: model-parallel degree {self.mp} does not divide {what}={n}; "
                                     f"MindFormers gives every rank whole heads, so these are not its shards")
            self.tensors = {n: (shapes[n], self._plan[n].dtype) for n in hf_shapes(self.config)}

    def _weights(self) -> Dict[int, Dict[str, str]]:
        """{rank: {HF name: MF tag}} of the TeleChat2 weights; refuses fused and foreign files."""
        weights = {r: {h: t for t in cf.entries for h in [hf_from_mf(t)] if h} for r, cf in self._files.items()}
        first = self._files[0]
        self.ignored = sorted(t for t in first.entries if hf_from_mf(t) is None)
        fused = [t for t in self.ignored if re.fullmatch(r"model\.layers\.\d+\.(attention\.w_qkv|feed_forward\."
                                                         r"w_gate_hidden)\.weight", t)]
        if fused:
            raise ValueError(f"{first.path}: {fused[0]} is MindFormers' qkv_concat layout (per-rank fused "
                             f"q/k/v and gate/up), which is not supported: convert the checkpoint saved "
                             f"before convert_weight.py --qkv_concat (or a training checkpoint) instead")
        if not weights[0]:
            raise KeyError(f"{first.path}: no TeleChat2 MindFormers weights (names like "
                           f"model.layers.0.attention.wq.weight); found {sorted(first.entries)[:5]}")
        return weights

    def read(self, name: str) -> np.ndarray:
        """The full tensor `name` (HF name), raw: bfloat16 as uint16 bits (see `tensors`)."""
        plan = self._plan[name]
        if len(plan.blocks) == 1:
            rank, tag, _ = plan.blocks[0]
            return self._files[rank].read(tag)
        return read_blocks([(self._files[r], tag, index) for r, tag, index in plan.blocks], plan.shape,
                           np_dtype(plan.dtype))

    def close(self):
        for f in self._files.values():
            f.close()


# ---- the public pair ----------------------------------------------------------------------------
def load_mindformers(path_or_dir: str, *, n_head: Optional[int] = None, mf_yaml: Optional[str] = None,
                     config=None, pattern: str = "*.ckpt", dtype=ms.float32, seq_length: Optional[int] = None):
    """A MindFormers TeleChat2 `.ckpt` (or a directory of per-rank ones) -> (params, ModelConfig).

    The config comes from `config` (a ModelConfig or an HF config.json), else `mf_yaml` (a
    MindFormers yaml), else the tensor shapes plus `n_head` (optional for the released sizes) and
    `seq_length` (the weights do not tell it: for a non-release size without a yaml or config it
    is otherwise ModelConfig's default, 8192; converting to HF refuses that guess).
    """
    with MindFormersCheckpoint(path_or_dir, n_head=n_head, mf_yaml=mf_yaml, config=config,
                               pattern=pattern, seq_length=seq_length) as ck:
        cfg = ck.config
        flat = {tc2_from_hf(h): ms.Tensor(to_float32(ck.read(h), d)).astype(dtype)
                for h, (_, d) in ck.tensors.items()}
    return tree_unflatten_from_names(param_specs(cfg), flat), cfg


def save_mindformers(params, cfg: ModelConfig, path: str, *, dtype: str = "float32") -> None:
    """Write params as a MindFormers TeleChat2 `.ckpt` (MF names, [out, in] weights, no transposes)."""
    write_ckpt(path, ((mf_name(h), a, "float32") for h, a in hf_arrays(params, cfg)), dtype=dtype)
