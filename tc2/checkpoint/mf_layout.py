"""Which rank of a MindFormers parallel run holds which block of each tensor.

A MindFormers run with `integrated_save: False` (every release finetune yaml) saves each rank's
parameters as that rank holds them, in `rank_r/*.ckpt`. Three things cut a tensor:

- pipeline stages: a stage's ranks hold only its layers (ranks holding the same names form a
  stage; stages hold disjoint names);
- model parallelism (`parallel_config.model_parallel` = mp): the Megatron split of
  `tc2.parallel.sharding.split_dim`, ranks running mp fastest within a stage (local rank
  i = dp_index * mp + mp_index); the embedding and lm_head stay whole when `vocab_emb_dp` is set
  or mp does not divide the vocabulary;
- MindSpore's optimizer parallelism (`parallel.enable_parallel_optimizer`, set by every release
  finetune yaml): a parameter held identically by R ranks of a stage (R = stage ranks / its mp
  split count) is saved as a dim-0 piece of that mp slice: the slice's rows are cut into
  k = R pieces (or `parallel_optimizer_config.optimizer_weight_shard_size`) and local rank i holds
  piece (i // step) % k, step being the number of distinct mp slices (mp, or 1 for a tensor mp does
  not split): the `opt_weight_shard_step` / `opt_weight_shard_size` a strategy file records.
  MindSpore skips parameters under `parallel_optimizer_threshold` KB or whose dim 0 does not
  divide; MindFormers' TeleChat2 skips norms and biases (`parallel_optimizer=False`) and the
  embedding unless `model_config.parallel_optimizer` is set.

Read from MindSpore 2.x: `mindspore/parallel/_tensor.py` `_construct_tensor_layout_for_opt_shard`
(the mp split of dim 0 is outer, the optimizer piece inner, its group right after the model-parallel
dims), `TensorLayout::GenerateOptShardSliceShape` and `OptParamMgrImpl::SplitParam` (which
parameters are cut); MindFormers `research/telechat2/*/finetune_*.yaml`, `llama_layer.py`,
`modules/layers.py`, `telechat.py`.

Which tensors the optimizer cut, and how many ways, is read from the shapes (a rank's slice
against the full shape the config or the yaml's model_config gives), not from the threshold
rule; the yaml must say `enable_parallel_optimizer: True` for such a cut to be undone. Ranks that
should hold the same block are compared (a few KB of each), so without the yaml an
optimizer-parallel checkpoint is refused, naming the tensor, rather than read as a model with
half the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tc2.checkpoint.names import hf_layer, hf_name, leaf_key
from tc2.checkpoint.safetensors import WEIGHT_DTYPES
from tc2.parallel.sharding import split_dim

SAMPLE_BYTES = 4096                   # per window (start, middle, end) when comparing copies


@dataclass(frozen=True)
class MFRun:
    """The parallel settings of a MindFormers run, from its yaml (None: the yaml does not say)."""
    path: str
    model_parallel: Optional[int] = None
    data_parallel: Optional[int] = None
    vocab_emb_dp: Optional[bool] = None
    parallel_optimizer: bool = False             # parallel.enable_parallel_optimizer
    optimizer_weight_shard_size: int = -1         # -1: every copy of a tensor takes a piece

    @classmethod
    def from_yaml(cls, doc: dict, path: str) -> "MFRun":
        """From a parsed MindFormers yaml: `parallel_config` and `parallel` (checked types)."""
        pc, par = doc.get("parallel_config") or {}, doc.get("parallel") or {}
        opt = par.get("parallel_optimizer_config") or {}
        if not isinstance(opt, dict):
            raise ValueError(f"{path}: parallel.parallel_optimizer_config must be a mapping")

        def value(section, d, key, kind):
            v = d.get(key)
            ok = v is None or (isinstance(v, bool) if kind == "bool" else type(v) is int and (
                v >= 1 or (kind == "size" and v == -1)))
            if not ok:
                want = "true or false" if kind == "bool" else "a positive int" + (" or -1" if kind == "size" else "")
                raise ValueError(f"{path}: {section}.{key} must be {want}, got {v!r}")
            return v
        ows = value("parallel.parallel_optimizer_config", opt, "optimizer_weight_shard_size", "size")
        return cls(path, value("parallel_config", pc, "model_parallel", "int"),
                   value("parallel_config", pc, "data_parallel", "int"),
                   value("parallel_config", pc, "vocab_emb_dp", "bool"),
                   bool(value("parallel", par, "enable_parallel_optimizer", "bool")),
                   -1 if ows is None else ows)


@dataclass(frozen=True)
class TensorPlan:
    """How to assemble one full tensor: blocks [(rank, tag, index into the full tensor)]."""
    shape: Tuple[int, ...]
    dtype: str
    blocks: Tuple[Tuple[int, str, Tuple[slice, ...]], ...]


class _Planner:
    """The merge plan of a run's rank files (see the module docstring); `plan()` does the work."""

    def __init__(self, files, weights, path: str, run: Optional[MFRun], expected: Optional[Dict[str, tuple]],
                 vocab: Optional[int], missing: Sequence[str]):
        self.files, self.weights, self.path, self.run = files, weights, path, run
        self.expected, self.vocab, self.missing = expected, vocab, list(missing)

    def plan(self) -> Tuple[Dict[str, TensorPlan], int]:
        stages = self._stages()
        mp = self.run.model_parallel if self.run and self.run.model_parallel else self._infer_mp(stages)
        self.mp, plans = mp, {}
        for names, ranks in stages:
            if len(ranks) % mp:
                raise ValueError(f"{self.path}: ranks {ranks} hold the same tensors but are not a multiple "
                                 f"of the model-parallel degree {mp}")
            dp = self.run.data_parallel if self.run else None
            if dp and len(ranks) != dp * mp:
                raise ValueError(f"{self.path}: {len(ranks)} ranks ({ranks[0]}..{ranks[-1]}) hold one pipeline "
                                 f"stage, but {self.run.path} says data_parallel {dp} x model_parallel {mp}")
            for hf in sorted(names):
                plans[hf] = self._plan_tensor(hf, ranks)
        return plans, mp

    # ---- stages and the model-parallel degree --------------------------------------------------
    def _stages(self) -> List[Tuple[frozenset, List[int]]]:
        stages: Dict[frozenset, List[int]] = {}
        for r in sorted(self.weights):
            stages.setdefault(frozenset(self.weights[r]), []).append(r)
        groups = list(stages.items())
        for i, (a, ra) in enumerate(groups):          # pipeline stages hold disjoint tensors
            for b, rb in groups[i + 1:]:
                if a & b:
                    odd = sorted(a ^ b)[0]
                    has, lacks = (ra[0], rb[0]) if odd in a else (rb[0], ra[0])
                    raise KeyError(f"{self.path}: rank_{lacks} lacks {self.weights[has][odd]}, which "
                                   f"rank_{has} holds (ranks must hold the same tensors, or disjoint ones "
                                   f"for pipeline stages)")
        return groups

    def _meta(self, r: int, hf: str):
        return self.files[r].entries[self.weights[r][hf]]

    def _infer_mp(self, stages) -> int:
        """hidden_size / columns of a wo (attention dense) slice, the same in every stage: the
        optimizer's cut, on rows, leaves columns alone. Checks the ranks differ."""
        found = {}
        for names, ranks in stages:
            for hf in sorted(names):
                norm = hf_name(f"layers.{hf_layer(hf)}.input_layernorm") if hf_layer(hf) is not None else None
                if leaf_key(hf) == "dense" and norm in names:
                    hidden, (rows, cols) = self._meta(ranks[0], norm)[0][0], self._meta(ranks[0], hf)[0]
                    tag = self.weights[ranks[0]][hf]
                    if hidden % cols:
                        raise ValueError(f"{self.path}: rank_{ranks[0]} {tag} has {cols} columns, which does not "
                                         f"divide hidden_size {hidden}")
                    if rows != hidden and not (self.run and self.run.parallel_optimizer):
                        raise ValueError(f"{self.path}: rank_{ranks[0]} holds {tag} with {rows} rows, not "
                                         f"hidden_size {hidden}: its rows are cut across data-parallel ranks "
                                         f"(MindSpore's optimizer parallel): pass the directory of all rank_* "
                                         f"folders and the run's MindFormers yaml (mf_yaml=, --mf_yaml)")
                    found[tuple(ranks)] = (hidden // cols, hf)
                    break
        degrees = {mp for mp, _ in found.values()}
        if len(degrees) > 1:
            raise ValueError(f"{self.path}: stages disagree on the model-parallel degree: {found}")
        mp = degrees.pop() if degrees else 1
        for ranks, (_, hf) in found.items():
            if mp > len(ranks):
                raise ValueError(f"{self.path}: {self.weights[ranks[0]][hf]} is 1/{mp} of the attention, but "
                                 f"only {len(ranks)} rank file(s) hold it: pass the directory holding all "
                                 f"rank_* folders of the run")
            if mp > 1 and self._same(ranks[0], ranks[1], hf):
                raise ValueError(f"{self.path}: rank_{ranks[0]} and rank_{ranks[1]} hold the same slice of "
                                 f"{hf}: the ranks are not in tensor-parallel-fastest order")
        return mp

    def _same(self, r0: int, r1: int, hf: str) -> bool:
        return np.array_equal(self.files[r0].read(self.weights[r0][hf]), self.files[r1].read(self.weights[r1][hf]))

    # ---- one tensor ------------------------------------------------------------------------------
    def _plan_tensor(self, hf: str, ranks: List[int]) -> TensorPlan:
        tag, metas = self.weights[ranks[0]][hf], [self._meta(r, hf) for r in ranks]
        if len({(m[0], m[1]) for m in metas}) != 1:
            raise ValueError(f"{self.path}: ranks {ranks} disagree on {tag}: " +
                             ", ".join(f"rank_{r} {m[0]} {m[1]}" for r, m in zip(ranks, metas)))
        shape, dtype = tuple(metas[0][0]), metas[0][1]
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"{self.files[ranks[0]].path}: {tag} is {dtype}, not a float weight")
        d = self._mp_dim(hf, shape, ranks)
        step = self.mp if d is not None else 1
        k = self._pieces(hf, tag, shape, d, len(ranks) // step, ranks[0]) if shape else 1
        full = list(shape)
        if d is not None:
            full[d] *= self.mp
        if k > 1:
            full[0] *= k
        blocks = []
        for i, r in enumerate(ranks[:step * k]):
            m, o = i % step, i // step              # mp slice, optimizer piece
            index = [slice(None)] * len(shape)
            if d is not None:
                index[d] = slice(m * shape[d], (m + 1) * shape[d])
            if k > 1:
                row = m * k + o if d == 0 else o
                index[0] = slice(row * shape[0], (row + 1) * shape[0])
            blocks.append((r, self.weights[r][hf], tuple(index)))
        self._check_copies(hf, tag, shape, ranks, step * k, k)
        return TensorPlan(tuple(full), dtype, tuple(blocks))

    def _mp_dim(self, hf: str, shape, ranks) -> Optional[int]:
        """The dim mp splits (None: whole on every rank); the vocabulary rows as MindFormers does."""
        d = split_dim(hf) if self.mp > 1 else None
        if d is None or leaf_key(hf) not in ("word_embeddings", "lm_head"):
            return d
        run, vocab = self.run, self.vocab
        if run is not None and run.vocab_emb_dp is not None:
            return None if run.vocab_emb_dp or (vocab is not None and vocab % self.mp) else 0
        if vocab is not None:
            if vocab % self.mp or shape[0] == vocab:
                return None
            if shape[0] * self.mp != vocab and run is not None and run.parallel_optimizer:
                raise ValueError(f"{self.path}: {self.weights[ranks[0]][hf]} holds {shape[0]} of {vocab} vocabulary "
                                 f"rows per rank, which fits both a model-parallel split and a replicated table: "
                                 f"{run.path} must set parallel_config.vocab_emb_dp")
            return 0
        return None if self._same(ranks[0], ranks[1], hf) else 0

    def _pieces(self, hf: str, tag: str, shape, d, copies: int, r0: int) -> int:
        """How many optimizer-parallel pieces the dim-0 rows of `hf` are cut into (1: none)."""
        if self.expected is None or hf not in self.expected:
            return 1                                  # unknown: _check_copies guards
        want = list(self.expected[hf])
        if d is not None and len(want) > d and want[d] % self.mp == 0:
            want[d] //= self.mp
        want = tuple(want)
        if shape == want:
            return 1
        if len(shape) != len(want) or shape[1:] != want[1:] or not shape[0] or want[0] % shape[0]:
            return 1                                  # no layout tc2 knows: the config check names it
        k, run = want[0] // shape[0], self.run
        if copies % k:                                # no optimizer cut either (a wrong config?): as above
            return 1
        what = (f"rank_{r0} holds {tag} as {shape}: 1/{k} of the rows of the {want} each of its {copies} "
                f"data-parallel copies would hold (model_parallel {self.mp}), i.e. cut on dim 0 by MindSpore's "
                f"optimizer parallel")
        if run is None or not run.parallel_optimizer:
            how = ("pass the run's MindFormers yaml (mf_yaml=, --mf_yaml), whose parallel section gives the "
                   "layout" if run is None else f"but {run.path} does not set parallel.enable_parallel_optimizer: "
                                                f"True (is it this run's yaml?)")
            raise ValueError(f"{self.path}: {what}; {how}")
        group = copies if run.optimizer_weight_shard_size == -1 else run.optimizer_weight_shard_size
        if k != group:
            raise ValueError(f"{self.path}: {what} into {k} pieces, but {run.path} gives optimizer groups of "
                             f"{group} ({copies} copies, optimizer_weight_shard_size "
                             f"{run.optimizer_weight_shard_size})")
        return k

    def _check_copies(self, hf: str, tag: str, shape, ranks: List[int], n: int, k: int) -> None:
        """Rank i (i >= n) holds the block of rank i % n: compare a few KB of each."""
        for i in range(n, len(ranks)):
            r, p = ranks[i], ranks[i % n]
            if self._sample(r, hf) == self._sample(p, hf):
                continue
            if self.run is None:
                how = ("pass the run's MindFormers yaml (mf_yaml=, --mf_yaml): its parallel and model_config "
                       "sections give the layout and the full shapes")
            elif self.expected is None:
                how = (f"{self.run.path} lacks model.model_config.{'/'.join(self.missing) or 'keys'}, needed "
                       f"for the full shapes")
            else:
                how = "the rank files are not one run's (different steps or runs?)"
            raise ValueError(f"{self.path}: rank_{r} holds a different {tag} {shape} from rank_{p}, although with "
                             f"model_parallel {self.mp}{f' and {k} optimizer pieces' if k > 1 else ''} both would "
                             f"hold the same block: the tensor is cut across data-parallel ranks (MindSpore's "
                             f"optimizer parallel: enable_parallel_optimizer, set in every release finetune "
                             f"yaml) or the files differ; {how}")

    def _sample(self, r: int, hf: str) -> bytes:
        f, tag = self.files[r], self.weights[r][hf]
        total = sum(n for _, n in f.entries[tag][2])
        if total <= 3 * SAMPLE_BYTES:
            return f.read_span(tag, 0, total)
        mid = total // 2
        return b"".join(f.read_span(tag, a, a + SAMPLE_BYTES) for a in (0, mid, total - SAMPLE_BYTES))


def plan_rank_merge(files, weights, path: str, *, run: Optional[MFRun] = None,
                    expected: Optional[Dict[str, tuple]] = None, vocab: Optional[int] = None,
                    missing: Sequence[str] = ()) -> Tuple[Dict[str, TensorPlan], int]:
    """({HF name: TensorPlan}, model-parallel degree) for a run's rank files.

    files: {rank: CkptFile}; weights: {rank: {HF name: MF tag}} (the weights each rank holds);
    run: the yaml's settings; expected: {HF name: full shape} when a config (or the yaml's
    model_config) gives them, `missing` naming the yaml keys that kept them unknown; vocab:
    the vocabulary size if known. Raises naming the tensor and what is missing when the files
    do not fit a layout this module knows.
    """
    return _Planner(files, weights, path, run, expected, vocab, missing).plan()
