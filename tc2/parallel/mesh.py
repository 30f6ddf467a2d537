"""The device mesh and the parallel layout of a run, as plain data (no MindSpore imports).

`Mesh` numbers the processes of a dp x cp x tp x pp job (tp fastest, as Megatron: a tp group is
a run of consecutive ranks, i.e. one node's fast interconnect) and names their groups;
`ParallelConfig` is the layout a recipe asks for (the release's, spec §9), of which
`executable()` says what tc2 can run today.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Sequence, Tuple, Union

import numpy as np

MESH_AXES = ("dp", "cp", "tp", "pp")


class ShardingError(ValueError):
    """A mesh / rules / config combination that cannot be laid out (names the tensor and sizes)."""


@dataclass(frozen=True)
class Mesh:
    """dp x cp x tp x pp devices. Rank order (fastest first): tp, cp, dp, pp, as Megatron does,
    so a tp group is a run of consecutive ranks (one node's fast interconnect)."""
    dp: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ShardingError(f"Mesh.{f.name} must be a positive int, got {v!r}")

    @property
    def size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def shape(self) -> Dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}

    def axis_size(self, axes: Union[str, Sequence[str], None]) -> int:
        if axes is None:
            return 1
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        n = 1
        for a in axes:
            if a not in MESH_AXES:
                raise ShardingError(f"unknown mesh axis {a!r}; mesh axes are {MESH_AXES}")
            n *= getattr(self, a)
        return n

    # strides: tp fastest, then cp, dp, pp
    def _strides(self) -> Dict[str, int]:
        return {"tp": 1, "cp": self.tp, "dp": self.tp * self.cp, "pp": self.tp * self.cp * self.dp}

    def coords(self, rank: int) -> Dict[str, int]:
        """{"dp": i, "cp": j, "tp": k, "pp": s} of a global rank."""
        if not 0 <= rank < self.size:
            raise ShardingError(f"rank {rank} is outside a mesh of {self.size} devices ({self})")
        st = self._strides()
        return {a: (rank // st[a]) % getattr(self, a) for a in MESH_AXES}

    def rank(self, **coords: int) -> int:
        """Global rank at the given coordinates (missing axes: 0)."""
        st = self._strides()
        r = 0
        for a, i in coords.items():
            if a not in MESH_AXES:
                raise ShardingError(f"unknown mesh axis {a!r}; mesh axes are {MESH_AXES}")
            if not 0 <= i < getattr(self, a):
                raise ShardingError(f"{a}={i} is outside the mesh ({a} size {getattr(self, a)})")
            r += i * st[a]
        return r

    def group(self, axes: Union[str, Sequence[str]], rank: int) -> Tuple[int, ...]:
        """The ranks that differ from `rank` only along `axes` (sorted): its dp/cp/tp group."""
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        self.axis_size(axes)                       # validates the names
        c = self.coords(rank)
        members = []
        for r in range(self.size):
            rc = self.coords(r)
            if all(rc[a] == c[a] for a in MESH_AXES if a not in axes):
                members.append(r)
        return tuple(members)

    def groups(self, axes: Union[str, Sequence[str]]) -> Tuple[Tuple[int, ...], ...]:
        """Every group along `axes`, each once, in order of its first rank."""
        seen = []
        for r in range(self.size):
            g = self.group(axes, r)
            if g not in seen:
                seen.append(g)
        return tuple(seen)

    def group_name(self, axes: Union[str, Sequence[str]], rank: int) -> str:
        """A name every member of the group derives identically (for `create_group`)."""
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        return "tc2_" + "".join(axes) + "_" + "_".join(str(r) for r in self.group(axes, rank))

    def __str__(self):
        return "x".join(f"{a}{getattr(self, a)}" for a in MESH_AXES if getattr(self, a) > 1) or "single"




@dataclass(frozen=True)
class ParallelConfig:
    """A training layout (the release's, spec §9). `fit` executes dp x cp x tp x pp, ZeRO-1 and
    the three recompute modes; the rest is read by the memory plan and the Ascend layouts, and
    refused by `executable()`."""
    dp: int = 1                               # data parallel
    tp: int = 1                               # tensor (model) parallel
    pp: int = 1                               # pipeline stages
    cp: int = 1                               # context (sequence-sharded ring attention)
    micro_batches: int = 1                    # pipeline micro batches (MF micro_batch_num)
    sequence_parallel: bool = False           # shard norm/residual activations over tp
    recompute: str = "auto"                   # "none" (one unrolled graph) | "selective" | "full" (layer by
                                              # layer) | "auto": none for small models (tc2.step.resolve_recompute)
    zero: int = 0                             # optimizer-state sharding stage over dp (MF parallel optimizer: 1)

    def __post_init__(self):
        for name in ("dp", "tp", "pp", "cp", "micro_batches"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"parallel.{name} must be an int >= 1, got {v!r}")
        if self.recompute not in ("auto", "none", "selective", "full"):
            raise ValueError(f"parallel.recompute must be auto/none/selective/full, got {self.recompute!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero must be 0-3, got {self.zero}")

    @property
    def size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def describe(self) -> str:
        return f"dp={self.dp} tp={self.tp} pp={self.pp} cp={self.cp}"

    def mesh(self) -> Mesh:
        return Mesh(dp=self.dp, cp=self.cp, tp=self.tp, pp=self.pp)

    def executable(self) -> "ParallelConfig":
        """self, if tc2 executes this layout; else ValueError naming what is only planned."""
        planned = [(self.micro_batches > 1, f"micro_batches={self.micro_batches} (a pipeline runs the step's "
                                            "micro-batches: set train.micro_batch)"),
                   (self.zero > 1, f"zero={self.zero} (ZeRO-1 executes; stages 2 and 3 are planned only)"),
                   (self.sequence_parallel and self.tp > 1, "sequence_parallel=true with tp > 1")]
        named = [what for bad, what in planned if bad]
        if named:
            raise ValueError("not executed yet (the memory plan and the Ascend layouts model them): "
                             + ", ".join(named) + ".")
        if self.zero and self.dp * self.cp == 1:
            raise ValueError("parallel.zero=1 shards the optimizer state over dp x cp, which is 1 here")
        return self
