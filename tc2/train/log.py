"""What a run tells its user: metrics.jsonl records and one-line progress reports.

Every `log_every` steps `fit` appends a train record (step, token-weighted loss over the
window, lr, grad norm, tokens/s, tokens seen, elapsed) to `out_dir/metrics.jsonl` and prints
the same as a progress line with an ETA; eval records go to the same file. Only the main
process (rank 0) writes and prints; every process keeps the records (`FitResult.history`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional

from tc2.files import write_atomic

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl: one JSON record per line, appended and flushed as written. On resume the
    records past the resumed step are dropped first (they belong to the abandoned continuation).
    With `write=False` (processes other than rank 0) records are only kept in memory."""

    def __init__(self, out_dir: str, resume_step: Optional[int], *, write: bool = True):
        self.path = os.path.join(out_dir, METRICS_FILE)
        self.write_file = write
        self.records: List[dict] = []
        if not write:
            return
        kept = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue                  # a torn last line from a crash
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        write_atomic(self.path, "".join(kept))

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.write_file:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


@dataclass
class Window:
    """What the steps since the last train record add up to."""
    loss_sum: float = 0.0
    loss_tokens: int = 0
    tokens: int = 0
    time: float = 0.0
    steps: int = 0
    skipped: int = 0

    def add(self, m: dict, seconds: float) -> None:
        """One step's metrics (a skipped step counts its time and tokens, not its loss)."""
        if not m["skipped"]:
            self.loss_sum += m["loss"] * m["loss_tokens"]
            self.loss_tokens += m["loss_tokens"]
        self.tokens += m["tokens"]
        self.time += seconds
        self.steps += 1
        self.skipped += int(m["skipped"])

    def record(self, step: int, m: dict, tokens_seen: int, elapsed: float) -> dict:
        """The train record of this window, ending at `step` whose metrics are `m`."""
        rec = {"kind": "train", "step": step,
               "loss": self.loss_sum / self.loss_tokens if self.loss_tokens else float("nan"),
               "lr": m["lr"], "grad_norm": m["grad_norm"],
               "tokens_per_s": self.tokens / self.time if self.time else 0.0, "tokens": tokens_seen,
               "loss_tokens": self.loss_tokens, "steps": self.steps, "skipped": self.skipped,
               "elapsed_s": elapsed}
        if "loss_scale" in m:
            rec["loss_scale"] = m["loss_scale"]
        return rec


def format_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(rec: dict, total: int, eta: float, first_step_s: Optional[float] = None) -> str:
    """`step 20/700 | loss 2.3141 | lr 1.50e-04 | gnorm 0.912 | 9,812 tok/s | elapsed | ETA`."""
    width = len(str(total))
    parts = [f"step {rec['step']:>{width}}/{total}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}",
             f"gnorm {rec['grad_norm']:.3f}", f"{rec['tokens_per_s']:,.0f} tok/s",
             f"elapsed {format_time(rec['elapsed_s'])}", f"ETA {format_time(eta)}"]
    if "loss_scale" in rec:
        parts.append(f"scale {rec['loss_scale']:g}")
    if rec["skipped"]:
        parts.append(f"skipped {rec['skipped']}")
    line = " | ".join(parts)
    if first_step_s is not None:
        line += f" (first step of this run: {first_step_s:.1f}s, including any compilation)"
    return line


def eval_line(rec: dict) -> str:
    return (f"eval  step {rec['step']:>6} | eval loss {rec['eval_loss']:.4f} | "
            f"perplexity {rec['eval_ppl']:.3f} | {rec['eval_tokens']} tokens")
