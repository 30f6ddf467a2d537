"""MindFormers TeleChat2 checkpoints: names, configs, and merging per-rank `.ckpt` files.

The `.ckpt` file format itself (indexing, streaming reads and writes) is
`tc2.checkpoint.ms_ckpt`; this module is what MindFormers puts in those files. MF names are a
rename of the HF names (spec §4), both spelled in the one table of `tc2.checkpoint.names`
(`mf_name`, `hf_from_mf`; tests check the round trip). The config comes from a config.json, a
MindFormers yaml, or the tensor shapes. A directory of `rank_*/` files from a MindFormers run is
merged with the tensor-parallel rule shared with `tc2.parallel.sharding.split_dim`; see
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
from tc2.checkpoint.ms_ckpt import CkptFile, write_ckpt
from tc2.checkpoint.names import hf_from_mf, hf_layer, hf_name, leaf_key, mf_name, tc2_from_hf
from tc2.checkpoint.reader import Reader, read_slices
from tc2.checkpoint.safetensors import WEIGHT_DTYPES, np_dtype, to_float32
from tc2.config import ModelConfig, field_problem, telechat2_7b, telechat2_35b, telechat2_115b
from tc2.model import param_specs
from tc2.parallel.sharding import split_dim
from tc2.tree import tree_unflatten_from_names

# ---- configs ----------------------------------------------------------------------------------
_RELEASES = {c.hidden_size: c for c in (telechat2_7b(), telechat2_35b(), telechat2_115b())}
_MF_KEYS = {"hidden_size": "hidden_size", "num_layers": "n_layer", "num_heads": "n_head",
            "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size",
            "intermediate_size": "ffn_hidden_size", "rms_norm_eps": "layer_norm_epsilon",
            "seq_length": "seq_length", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
            "pad_token_id": "pad_token_id"}


def read_mf_yaml(path: str) -> Tuple[dict, dict]:
    """A MindFormers yaml -> (ModelConfig fields from model.model_config, parallel_config)."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"MindFormers yaml not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
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
    return fields, dict(doc.get("parallel_config") or {})


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


def resolve_config(shapes, where: str, *, config=None, n_head=None, yaml_fields=None) -> ModelConfig:
    """The config from an explicit ModelConfig / config.json, else yaml fields + the shapes."""
    if config is not None:
        cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config)
        check_hf_layout(cfg, shapes, where)
        return cfg
    fields = dict(yaml_fields or {})
    yaml_heads = fields.pop("n_head", None)
    return infer_config(shapes, where, n_head=n_head or yaml_heads, **fields)


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
    `pattern`) written by a MindFormers parallel run. Ranks holding the same tensor names form a
    pipeline stage; within a stage the model-parallel degree mp is the yaml's model_parallel or
    hidden_size / (rows of a wq slice); ranks run tp fastest (Megatron order, as
    `tc2.parallel.sharding`), so the stage's first mp ranks hold one full copy (the rest are
    data-parallel replicas). Each tensor is split as `tc2.parallel.sharding.split_dim` says,
    except the embedding and lm_head, which MindFormers keeps whole when vocab_emb_dp is set:
    that is read from the yaml, from the vocab size, or, failing both, from whether ranks 0 and 1
    hold identical copies.
    Non-weights (optimizer moments, counters) are listed in `ignored`.
    """

    kind = "mindformers"

    def __init__(self, path: str, *, n_head: Optional[int] = None, mf_yaml: Optional[str] = None,
                 config=None, pattern: str = "*.ckpt", check_crc: bool = False):
        self.path = path
        self._files: Dict[int, CkptFile] = {}
        with self.closing_on_error():
            for rank, file in rank_ckpt_files(path, pattern):
                self._files[rank] = CkptFile(file, check_crc=check_crc)
            fields, parallel = read_mf_yaml(mf_yaml) if mf_yaml else ({}, {})
            if config is not None and not isinstance(config, ModelConfig):
                config = ModelConfig.from_hf(config)
            vocab = config.vocab_size if config is not None else fields.get("vocab_size")
            shapes = self._plan_merge(parallel.get("model_parallel"), parallel.get("vocab_emb_dp"), vocab)
            self.config = resolve_config(shapes, path, config=config, n_head=n_head, yaml_fields=fields)
            for what, n in (("n_head", self.config.n_head), ("num_key_value_heads",
                                                             self.config.num_key_value_heads)):
                if n % self.mp:
                    raise ValueError(f"{path}: model-parallel degree {self.mp} does not divide {what}={n}; "
                                     f"MindFormers gives every rank whole heads, so these are not its shards")
            order = list(hf_shapes(self.config))
            self.tensors = {n: (tuple(shapes[n]), self._dtype[n]) for n in order}

    def _plan_merge(self, mp_hint, vocab_emb_dp, vocab) -> Dict[str, Tuple[int, ...]]:
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
        stages: Dict[frozenset, List[int]] = {}
        for r in sorted(weights):
            stages.setdefault(frozenset(weights[r]), []).append(r)
        groups = list(stages.items())
        for i, (a, ra) in enumerate(groups):          # pipeline stages hold disjoint tensors
            for b, rb in groups[i + 1:]:
                if a & b:
                    odd = sorted(a ^ b)[0]
                    has, lacks = (ra[0], rb[0]) if odd in a else (rb[0], ra[0])
                    raise KeyError(f"{self.path}: rank_{lacks} lacks {weights[has][odd]}, which "
                                   f"rank_{has} holds (ranks must hold the same tensors, or disjoint ones "
                                   f"for pipeline stages)")
        mp = int(mp_hint or self._infer_mp(weights, stages))
        self.mp = mp
        self._plan, self._dtype, shapes = {}, {}, {}
        for names, ranks in stages.items():
            if len(ranks) % mp:
                raise ValueError(f"{self.path}: ranks {ranks} hold the same tensors but are not a multiple "
                                 f"of the model-parallel degree {mp}")
            members = ranks[:mp]
            for hf in sorted(names):
                if hf in shapes:
                    raise ValueError(f"{self.path}: tensor {hf} is on ranks of two different stages")
                tag = weights[members[0]][hf]
                metas = [self._files[r].entries[weights[r][hf]] for r in members]
                if len({(m[0], m[1]) for m in metas}) != 1:
                    raise ValueError(f"{self.path}: ranks {members} disagree on {tag}: " +
                                     ", ".join(f"rank_{r} {m[0]} {m[1]}" for r, m in zip(members, metas)))
                shape, dtype = list(metas[0][0]), metas[0][1]
                if dtype not in WEIGHT_DTYPES:
                    raise ValueError(f"{self._files[members[0]].path}: {tag} is {dtype}, not a float weight")
                dim = split_dim(hf) if mp > 1 else None
                if dim is not None and leaf_key(hf) in ("word_embeddings", "lm_head"):
                    if vocab is not None:
                        dim = None if shape[0] == vocab else dim
                    elif vocab_emb_dp is not None:
                        dim = None if vocab_emb_dp else dim
                    else:
                        dim = None if self._same(members[0], members[1], weights, hf) else dim
                if dim is not None:
                    shape[dim] *= mp
                self._plan[hf] = (dim, [(self._files[r], weights[r][hf]) for r in members])
                self._dtype[hf], shapes[hf] = dtype, tuple(shape)
        return shapes

    def _infer_mp(self, weights, stages) -> int:
        """hidden_size / rows of a wq slice, the same in every stage; checks ranks differ."""
        found = {}
        for names, ranks in stages.items():
            r = ranks[0]
            for hf in sorted(names):
                if leaf_key(hf) != "query":
                    continue
                norm = hf_name(f"layers.{hf_layer(hf)}.input_layernorm")
                if norm in names:
                    hidden = self._files[r].entries[weights[r][norm]][0][0]
                    rows = self._files[r].entries[weights[r][hf]][0][0]
                    if hidden % rows:
                        raise ValueError(f"{self.path}: rank_{r} {weights[r][hf]} has {rows} rows, "
                                         f"which does not divide hidden_size {hidden}")
                    found[tuple(ranks)] = (hidden // rows, hf)
                    break
        degrees = {mp for mp, _ in found.values()}
        if len(degrees) > 1:
            raise ValueError(f"{self.path}: stages disagree on the model-parallel degree: {found}")
        mp = degrees.pop() if degrees else 1
        for ranks, (_, hf) in found.items():
            if mp > len(ranks):
                raise ValueError(f"{self.path}: {weights[ranks[0]][hf]} is 1/{mp} of the attention, but "
                                 f"only {len(ranks)} rank file(s) hold it: pass the directory holding all "
                                 f"rank_* folders of the run")
            if mp > 1 and self._same(ranks[0], ranks[1], weights, hf):
                raise ValueError(f"{self.path}: rank_{ranks[0]} and rank_{ranks[1]} hold the same slice of "
                                 f"{hf}: the ranks are not in tensor-parallel-fastest order")
        return mp

    def _same(self, r0: int, r1: int, weights, hf: str) -> bool:
        return np.array_equal(self._files[r0].read(weights[r0][hf]), self._files[r1].read(weights[r1][hf]))

    def read(self, name: str) -> np.ndarray:
        """The full tensor `name` (HF name), raw: bfloat16 as uint16 bits (see `tensors`)."""
        dim, parts = self._plan[name]
        if dim is None:
            file, tag = parts[0]
            return file.read(tag)
        return read_slices(parts, self.tensors[name][0], np_dtype(self._dtype[name]), dim)

    def close(self):
        for f in self._files.values():
            f.close()


# ---- the public pair ----------------------------------------------------------------------------
def load_mindformers(path_or_dir: str, *, n_head: Optional[int] = None, mf_yaml: Optional[str] = None,
                     config=None, pattern: str = "*.ckpt", dtype=ms.float32):
    """A MindFormers TeleChat2 `.ckpt` (or a directory of per-rank ones) -> (params, ModelConfig).

    The config comes from `config` (a ModelConfig or an HF config.json), else `mf_yaml` (a
    MindFormers yaml), else the tensor shapes plus `n_head` (optional for the released sizes).
    """
    with MindFormersCheckpoint(path_or_dir, n_head=n_head, mf_yaml=mf_yaml, config=config,
                               pattern=pattern) as ck:
        cfg = ck.config
        flat = {tc2_from_hf(h): ms.Tensor(to_float32(ck.read(h), d)).astype(dtype)
                for h, (_, d) in ck.tensors.items()}
    return tree_unflatten_from_names(param_specs(cfg), flat), cfg


def save_mindformers(params, cfg: ModelConfig, path: str, *, dtype: str = "float32") -> None:
    """Write params as a MindFormers TeleChat2 `.ckpt` (MF names, [out, in] weights, no transposes)."""
    write_ckpt(path, ((mf_name(h), a, "float32") for h, a in hf_arrays(params, cfg)), dtype=dtype)
