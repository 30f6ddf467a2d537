"""The parallel context: what one process's compiled functions know about the other processes.

It is a value passed to `forward`, `train_step`, `generate`, `fit` (`ctx=`), never global state.
`LOCAL` (one process) has every size 1 and identity collectives, so the single-process path IS
the parallel path with nothing to exchange: one model, one step, one loop at every scale.

* tensor parallel (tp, Megatron): a rank holds whole heads / ffn columns / vocab rows;
  `copy_tp` (f: identity forward, sum over tp backward) enters a column-parallel region and
  `reduce_tp` (g: sum forward, identity backward) leaves a row-parallel one;
* context parallel (cp): a rank holds a share of each sequence with its GLOBAL positions;
  attention becomes the ring loop over `rotate`;
* data parallel (dp): a rank holds some rows; gradients and loss sums meet in `sum_dpcp`;
  with ZeRO-1 (`zero_size` > 1) each rank of the dp x cp group also keeps only its slice of the
  optimizer state and updates only that slice of each parameter;
* pipeline parallel (pp): a rank holds a contiguous range of layers (the embedding on the first
  stage, the final norm and lm_head on the last); activations and their gradients pass between
  neighbouring stages through `pp_pass`, loss and norm sums meet in `sum_pp`.

Built under msrun by `tc2.parallel.collectives.spmd_context(mesh)` (process groups, the custom-bprop
collectives); `tc2.parallel.collectives.local_context(cp)` simulates a ring in one process with the cp
ranks folded into the batch. Host-side, `local_batch` cuts this process's share out of a
global batch, so every process can be handed the same global batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np

from tc2.cache import PAD_POS
from tc2.config import IGNORE_INDEX
from tc2.nn.ring import fold_ranks


def _identity(x):
    return x


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class ParallelContext:
    dp: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    rank: int = 0                       # global rank (rank 0 logs and writes shared files)
    dp_rank: int = 0
    cp_rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    zero_size: int = 1                  # ZeRO-1: ranks the optimizer state is split over (dp x cp)
    zero_rank: int = 0                  # this rank's index in that group
    layout: str = "zigzag"              # how sequences are dealt to cp ranks (tc2.nn.ring)
    folded: bool = False                # cp ranks simulated in one process, stacked in the batch
    copy_tp: Callable = _identity       # f: identity forward, sum over tp backward
    reduce_tp: Callable = _identity     # g: sum over tp forward, identity backward
    gather_tp: Callable = _identity     # concatenate tp shards along axis 0 (replicated consumer)
    sum_tp: Callable = _identity        # plain sum over tp (no gradient semantics)
    max_tp: Callable = _identity        # elementwise max over tp (no gradient)
    sum_dpcp: Callable = _identity      # plain sum over dp x cp (gradients, loss sums)
    rotate: Optional[Callable] = None   # ring rotation over cp: block -> previous rank's block
    sum_pp: Callable = _identity        # plain sum over the pipeline stages (loss, norm)
    pp_pass: Optional[Callable] = None  # host: (lower stage of a neighbour pair, tensor) -> the pair's sum
    barrier: Callable = _nothing        # host: wait for every process
    host_sum: Callable = _identity      # host: a float numpy array summed over every process

    @property
    def size(self) -> int:
        """Processes in the job (a folded simulation is one process)."""
        return 1 if self.folded else self.dp * self.cp * self.tp * self.pp

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def writes_shard(self) -> bool:
        """Whether this rank writes its tp shard of shared state (one replica per tp rank)."""
        return self.dp_rank == 0 and self.cp_rank == 0

    def local_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """This process's rows (dp) and sequence share (cp) of a global [B, T] batch (host numpy).

        batch: "tokens", "labels" (shifted, -100 = no loss), optional "positions" (default
        arange) and "segment_ids". Returns int32 arrays plus "seq_len" [B/dp]: each row's global
        length, which dynamic-NTK RoPE needs and a sequence share cannot know. Under cp the
        sequence is padded to the layout's chunk multiple with token 0 (any id: the slot has
        position PAD_POS, so nothing attends to it), label -100 and segment -1.
        """
        tokens = np.asarray(batch["tokens"])
        B, T = tokens.shape
        if B % self.dp:
            raise ValueError(f"a batch of {B} rows does not split over dp={self.dp}")
        positions = batch.get("positions")
        if positions is None:
            positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
        positions = np.asarray(positions)
        fields = {"tokens": (tokens, 0), "labels": (np.asarray(batch["labels"]), IGNORE_INDEX),
                  "positions": (positions, PAD_POS)}
        if batch.get("segment_ids") is not None:
            fields["segment_ids"] = (np.asarray(batch["segment_ids"]), -1)
        rows = slice(self.dp_rank * (B // self.dp), (self.dp_rank + 1) * (B // self.dp))
        out = {}
        for name, (a, pad) in fields.items():
            if a.shape != (B, T):
                raise ValueError(f"batch[{name!r}] has shape {a.shape}, tokens have {(B, T)}")
            a = a[rows]
            if self.cp > 1:
                a = fold_ranks(a, self.cp, self.layout, pad)                # [cp*B', T/cp]
                if not self.folded:
                    n = a.shape[0] // self.cp
                    a = a[self.cp_rank * n:(self.cp_rank + 1) * n]
            out[name] = np.ascontiguousarray(a, dtype=np.int32)
        seq_len = (np.where(positions < PAD_POS, positions, -1).max(axis=1) + 1)[rows]
        if self.folded:
            seq_len = np.tile(seq_len, self.cp)
        out["seq_len"] = seq_len.astype(np.int32)
        return out


LOCAL = ParallelContext()
